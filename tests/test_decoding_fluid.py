"""Elastic-horizon decoding is lossless: token-identical to greedy AR, whatever the head."""

import pytest
import torch

from fluid.decoding import DecodeConfig
from fluid.decoding.published import fill_drafts
from tests.conftest import DECODE_VOCAB as VOCAB
from tests.conftest import MASK_ID as MASK
from tests.conftest import ar_reference, constant_model, random_prompts, tiny_model
from tests.conftest import fluid_decoder as decoder


def prompts(n, seed=0):
    return random_prompts(n, VOCAB, seed=seed)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_lossless_against_greedy_ar(arch, batch_size):
    model = tiny_model(arch, vocab_size=VOCAB, seed=1)
    ps = prompts(6, seed=2)
    ref = ar_reference(model, ps, 24)
    for horizon in ("head", "fixed"):
        out = decoder(model, horizon=horizon, fixed_k=5, k_min=2, k_max=8, batch_size=batch_size,
                      max_new_tokens=24, confidence=0.0).generate(ps)
        assert out["tokens"] == ref, horizon
        for row in out["rows"]:
            assert sum(row.accepted) == len(row.tokens) == 24  # max_new_tokens hit exactly
            assert row.finished == "max_new_tokens"


def test_lossless_when_drafts_are_good():
    """A model whose prediction ignores its input drafts perfectly: whole blocks are accepted,
    the verify forward doubles as the next draft (the prefill as the first), and the output is still
    exactly AR."""
    model = constant_model()
    ps = prompts(3, seed=4)
    ref = ar_reference(model, ps, 40)
    out = decoder(model, horizon="fixed", fixed_k=8, k_min=1, k_max=8, max_new_tokens=40, batch_size=3,
                  confidence=0.0).generate(ps)
    assert out["tokens"] == ref
    # 8 tokens per verify forward: the prefill drafts the first block, every verify forward the next
    assert out["tpf"] == 8
    assert all(r.draft_forwards == 0 for r in out["rows"]), [(r.draft_forwards, r.nfe) for r in out["rows"]]


def test_eos_inside_a_block_and_ragged_rows():
    model = tiny_model("llama", vocab_size=VOCAB, seed=5)
    ps = prompts(5, seed=6)
    free = ar_reference(model, ps, 30)
    eos = free[0][6]  # a token that appears mid-generation in row 0
    ref = ar_reference(model, ps, 30, eos=eos)
    assert len(ref[0]) <= 7 and ref[0][-1] == eos
    out = decoder(model, eos=eos, horizon="fixed", fixed_k=8, k_min=1, k_max=8, batch_size=5,
                  max_new_tokens=30, confidence=0.0).generate(ps)
    assert out["tokens"] == ref
    # each row ends for its own reason: at its EOS, else at max_new_tokens
    assert [r.finished for r in out["rows"]] == ["eos" if t[-1] == eos else "max_new_tokens" for t in ref]
    assert out["rows"][0].finished == "eos"
    assert all(len(t) == 30 for t in ref if t[-1] != eos)


def test_statistics_add_up():
    model = tiny_model("llama", vocab_size=VOCAB, seed=7)
    ps = prompts(4, seed=8)
    out = decoder(model, horizon="fixed", fixed_k=4, k_min=1, k_max=8, max_new_tokens=20, batch_size=4,
                  confidence=0.5).generate(ps)
    for row in out["rows"]:
        assert sum(row.accepted) == len(row.tokens)
        assert len(row.horizons) == len(row.accepted)  # one horizon per block
        # every forward commits at least the exact token after the cached prefix, and ends at most one block
        assert len(row.accepted) <= row.nfe <= len(row.tokens)
        assert row.draft_forwards < row.nfe
        assert all(1 <= a <= h for a, h in zip(row.accepted, row.horizons))
    assert out["generated_tokens"] == sum(len(t) for t in out["tokens"])
    assert out["tpf"] == pytest.approx(out["generated_tokens"] / out["nfe"])
    ar = decoder(model, algorithm="ar", max_new_tokens=20, batch_size=4).generate(ps)
    assert ar["tpf"] == pytest.approx(1.0)
    assert ar["tokens"] == out["tokens"]


def test_every_horizon_source_verify_off_and_published_loop():
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=9)
    ps = prompts(3, seed=10)
    ref = ar_reference(model, ps, 16)
    dec = decoder(model, k_min=2, k_max=6, max_new_tokens=16, batch_size=3, fixed_k=3)
    for horizon in ("head", "fixed", "oracle"):
        assert dec.generate(ps, horizon=horizon)["tokens"] == ref, horizon
    pub = dec.generate(ps, algorithm="published", horizon="fixed")
    assert pub["tokens"] == ref
    lossy = dec.generate(ps, verify=False, horizon="fixed")
    assert all(len(t) == 16 for t in lossy["tokens"])
    assert lossy["nfe"] < pub["nfe"]


def test_random_heads_never_break_losslessness():
    model = tiny_model("llama", vocab_size=VOCAB, seed=11)
    ps = prompts(4, seed=12)
    ref = ar_reference(model, ps, 20)
    for seed in range(4):
        out = decoder(model, seed=seed, k_min=1, k_max=16, max_new_tokens=20, batch_size=2,
                      confidence=0.3, lane_len=[None, 1, 3, 16][seed]).generate(ps)
        assert out["tokens"] == ref


@pytest.mark.parametrize("good_drafts", [False, True])
def test_a_row_decodes_the_same_alone_and_in_a_batch(good_drafts):
    """Rows are independent: a row's tokens and statistics (forwards, draft forwards, blocks,
    horizons, why it finished) are the same decoded alone and in a batch of four, forward for
    forward. (No token budget here: it narrows blocks by the number of active rows.)"""
    model = constant_model() if good_drafts else tiny_model("qwen3", vocab_size=VOCAB, seed=13)
    ps = prompts(4, seed=14)
    free = ar_reference(model, ps[:1], 12)
    settings = [dict(horizon="head", k_min=1, k_max=16, confidence=0.3),
                dict(horizon="fixed", fixed_k=5, k_min=1, k_max=8, confidence=0.0, lane_len=2),
                dict(horizon="fixed", fixed_k=6, k_min=1, k_max=8, confidence=0.9, share_verify_draft=False),
                dict(horizon="head", k_min=2, k_max=8, confidence=0.0, verify=False)]
    for cfg in settings:
        for eos in (None, free[0][7]):
            alone = decoder(model, eos=eos, max_new_tokens=21, batch_size=1, token_budget=None, **cfg).generate(ps)
            batched = decoder(model, eos=eos, max_new_tokens=21, batch_size=4, token_budget=None, **cfg).generate(ps)
            assert alone["tokens"] == batched["tokens"], cfg
            assert [vars(r) for r in alone["rows"]] == [vars(r) for r in batched["rows"]], cfg
            if cfg.get("verify", True):
                assert alone["tokens"] == ar_reference(model, ps, 21, eos=eos)
    budget = decoder(model, max_new_tokens=21, batch_size=1, horizon="head", k_min=1, k_max=16, confidence=0.5,
                     token_budget=10).generate(ps)
    assert budget["tokens"] == ar_reference(model, ps, 21)
    assert all(h <= 5 for r in budget["rows"] for h in r.horizons)  # 10 // (2 * 1 row)


def test_token_budget_caps_blocks_while_the_batch_is_large():
    model = constant_model()
    ps = prompts(4, seed=15)
    ref = ar_reference(model, ps, 40)
    # 4 rows, 32 tokens a forward: blocks of at most 32 // (2 * 4) = 4 slots (lanes of 3)
    out = decoder(model, horizon="fixed", fixed_k=16, k_min=1, k_max=16, max_new_tokens=40, batch_size=4,
                  confidence=0.0, token_budget=32).generate(ps)
    assert out["tokens"] == ref
    assert all(h == 4 for r in out["rows"] for h in r.horizons)
    assert out["tpf"] == 4
    one = decoder(model, horizon="fixed", fixed_k=16, k_min=1, k_max=16, max_new_tokens=40, batch_size=1,
                  confidence=0.0, token_budget=32).generate(ps)
    assert one["tokens"] == ref
    assert all(r.horizons == [16, 16, 8] for r in one["rows"])  # one row: 32 // 2 = 16, the cap is k_max


def test_fill_rule():
    block = torch.tensor([[7, MASK, MASK, MASK]])
    need = torch.tensor([[False, True, True, True]])
    logits = torch.zeros((1, 4, 10))
    logits[0, 0, 5] = 0.5    # slot 1: not confident, but it is the first empty slot
    logits[0, 1, 6] = 10.0   # slot 2: confident
    logits[0, 2, 7] = 0.5    # slot 3: not confident
    fill_drafts(block, need, logits, confidence=0.9)
    assert block.tolist() == [[7, 5, 6, MASK]] and need.tolist() == [[False, False, False, True]]


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="horizon"):
        DecodeConfig(horizon="nope").validate()
    with pytest.raises(ValueError, match="k_min"):
        DecodeConfig(k_min=5, k_max=4).validate()
    with pytest.raises(ValueError, match="token_budget"):
        DecodeConfig(token_budget=1).validate()


def test_fill_threshold_follows_verification_unless_set():
    assert DecodeConfig().fill_threshold == 0.3                  # lossless: drafting eagerly pays
    assert DecodeConfig(verify=False).fill_threshold == 0.9      # lossy: the method's reference
    assert DecodeConfig(confidence=0.5, verify=False).fill_threshold == 0.5


@pytest.mark.slow
def test_compiled_body_gives_the_same_tokens():
    """decode.compile runs a torch.compile of the transformer body: same tokens, every algorithm."""
    model = tiny_model("llama", vocab_size=VOCAB, seed=16)
    ps = prompts(3, seed=17)
    ref = ar_reference(model, ps, 12)
    dec = decoder(model, k_min=2, k_max=6, max_new_tokens=12, confidence=0.3, compile=True)
    for bs in (1, 3):
        for kw in (dict(algorithm="ar"), dict(horizon="head"), dict(algorithm="published", horizon="fixed")):
            assert dec.generate(ps, batch_size=bs, **kw)["tokens"] == ref, (bs, kw)
    assert dec._compiled is not None
