"""Exact mode (``lora.scope=lanes``): main tokens run the original weights, before and after
training, through export and reload, and lossless decoding returns the original model's
greedy output."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid.backbones.spec import BackboneSpec
from fluid.checkpoint import load_fluid
from fluid.data.arith import ArithTask
from fluid.data.sft import SFTDataset, _encoded, collate_sft
from fluid.exact import LANE_ADAPTER_DIR, gate_of
from fluid.modules.hybrid import HybridDiffusionModule, combine, lane_losses
from tests.conftest import assert_model_generate_is_fluid_and_greedy, tiny_model

MASKING = {"_target_": "fluid.lanes.FluidSchedule", "anchor_prob": 0.5, "horizon": 4, "noise_prob": 0.1,
           "restore": "none"}
LANES = {"enabled": True, "scope": "lanes", "r": 8}


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def original(request, tmp_path_factory, arith_tokenizer):
    """A tiny random model of each architecture saved with the arith tokenizer (no MASK yet)."""
    out = tmp_path_factory.mktemp(f"orig-{request.param}")
    tiny_model(request.param, vocab_size=len(arith_tokenizer), tie_word_embeddings=request.param != "qwen2",
               seed=2).save_pretrained(out)
    arith_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def drafting_original(request, tmp_path_factory, arith_tokenizer):
    """Every token embeds alike and the untied LM head favours one token: the greedy output is
    that token again and again, so well-trained lanes draft it and whole blocks are accepted."""
    out = tmp_path_factory.mktemp(f"drafting-{request.param}")
    model = tiny_model(request.param, vocab_size=len(arith_tokenizer), tie_word_embeddings=False, seed=1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb[5].expand_as(emb))
        h = model(torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states[-1][0, -1]
        model.lm_head.weight[arith_tokenizer.convert_tokens_to_ids("7")] += 10 * h / h.square().sum()
    model.save_pretrained(out)
    arith_tokenizer.save_pretrained(out)
    return out


def module(ckpt):
    spec = BackboneSpec(name="tiny-test", path=str(ckpt), mask_token="<|newmask|>", dtype="float32")
    m = HybridDiffusionModule(spec, AutoTokenizer.from_pretrained(ckpt), masking=MASKING, lora=LANES,
                              optim={"lr": 3e-2, "warmup_ratio": 0.0}, attention="dense", seed=0)
    m.configure_model()
    return m


def batch(tok, n=4):
    ds = SFTDataset(ArithTask(seed=0).examples("train", n), tok, 256)
    return collate_sft([ds[i] for i in range(n)], tok.pad_token_id)


def original_logits(ckpt, ids, am):
    """The original checkpoint's logits on right-padded ``ids``."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am, position_ids=pos).logits


def main_token_logits(m, b, seed=0):
    """Logits of the main tokens inside a lane-expanded forward, gathered back to ``(B, N, V)``,
    and the logits of the lane slots."""
    lb = m.expand(b, torch.Generator().manual_seed(seed))
    logits = m.forward_lanes(lb)
    idx = lb.main_index.clamp(min=0)
    main = torch.gather(logits, 1, idx[..., None].expand(-1, -1, logits.shape[-1]))
    return main, logits[~lb.is_main & lb.valid], lb, logits


def train_step(m, b, seed=0):
    opt = torch.optim.AdamW([p for p in m.model.parameters() if p.requires_grad], lr=3e-2)
    lb = m.expand(b, torch.Generator().manual_seed(seed))
    loss = combine(lane_losses(m.forward_lanes(lb), lb))
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_main_tokens_are_the_original_model_before_and_after_training(original, tmp_path):
    m = module(original)
    tok = m.tokenizer
    assert m.mask_token_id == len(tok) - 1  # added: the original has no such column
    trainable = [n for n, p in m.model.named_parameters() if p.requires_grad]
    assert any("lora_B" in n for n in trainable) and any("mask_delta" in n for n in trainable)
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)
    b = batch(tok)
    ref = original_logits(original, b["input_ids"], b["attention_mask"])
    v = ref.shape[-1]  # the original vocabulary (the MASK row was added after it)
    real = b["attention_mask"].bool()

    with torch.no_grad():
        main0, lane0, lb, _ = main_token_logits(m, b)
    torch.testing.assert_close(main0[..., :v][real], ref[real], rtol=1e-5, atol=1e-5)
    for s in range(3):
        train_step(m, b, seed=s)
    m.model.eval()
    gate = gate_of(m.model)
    assert gate.mask_delta.abs().sum() > 0  # the MASK offset trained
    with torch.no_grad():
        main1, lane1, _, _ = main_token_logits(m, b)
        plain = m.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        position_ids=(b["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(main1[..., :v][real], ref[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[..., :v][real], ref[real], rtol=1e-5, atol=1e-5)
    assert (plain[..., m.mask_token_id] == torch.finfo(plain.dtype).min).all()  # the added row is never emitted
    assert (lane1 - lane0).abs().max() > 1e-2  # while the lanes did learn


def test_two_pass_training_step_has_the_expanded_forwards_losses_and_gradients(original):
    """Exact mode trains with the main tokens in a no-grad forward and the slots after its cache
    (``lane_parts``); its losses and every gradient are those of the one expanded forward."""
    m = module(original)
    m.schedule = instantiate_schedule(restore="uniform", noise_prob=0.3)  # restored and noised slots too
    b = batch(m.tokenizer, n=3)
    train_step(m, b, seed=7)  # LoRA B is zero at init: make every gradient non-trivial first
    assert m.two_pass()
    params = [(n, p) for n, p in m.model.named_parameters() if p.requires_grad]

    def grads(parts):
        m.model.zero_grad()
        combine(parts).backward()
        return [p.grad.clone() for _, p in params]

    lb = m.expand(b, torch.Generator().manual_seed(3))
    ref = lane_losses(m.forward_lanes(lb), lb)
    g_ref = grads(ref)
    got = m.lane_parts(lb)
    g_got = grads(got)
    assert int(got["diff_n"]) == int(ref["diff_n"]) > 0 and int(got["ar_n"]) == int(ref["ar_n"]) > 0
    assert bool(lb.restored[lb.valid & ~lb.is_main].any())
    for key in ("ar_sum", "diff_sum"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-4)
    for (name, _), a, r in zip(params, g_got, g_ref):
        assert r.abs().sum() > 0, name
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6, msg=name)
    m.backend = type(m.backend)("flex")  # the flex path keeps the single expanded forward
    assert not m.two_pass()


def instantiate_schedule(**overrides):
    from hydra.utils import instantiate

    return instantiate({**MASKING, **overrides})


def test_export_keeps_the_original_weights_and_reload_restores_the_lanes(original, tmp_path):
    m = module(original)
    b = batch(m.tokenizer)
    for s in range(3):
        train_step(m, b, seed=s)
    m.model.eval()
    with torch.no_grad():
        _, _, lb, lanes_before = main_token_logits(m, b)
    out = m.export_hf(tmp_path / "checkpoint")
    assert (out / LANE_ADAPTER_DIR / "adapter_config.json").exists()
    meta = (out / "fluid.json").read_text()
    assert '"lane_adapter": "lane_adapter"' in meta and "adapter_dir" not in meta
    # the saved weights are the original ones (plus the added MASK row), unmerged
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    orig = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).state_dict()
    for k, w in orig.items():
        got = saved[k]
        if got.shape != w.shape:  # the embedding (and an untied head) gained the MASK row
            got = got[: w.shape[0]]
        assert torch.equal(got, w), k
    fm = load_fluid(out)
    assert gate_of(fm.model) is not None
    from fluid.lanes.attention import attention_mask_for

    with torch.no_grad():
        reloaded = fm.model(input_ids=lb.input_ids, attention_mask=attention_mask_for(lb, m.backend, torch.float32),
                            position_ids=lb.position_ids, use_cache=False).logits
    slots = ~lb.is_main & lb.valid
    torch.testing.assert_close(reloaded[slots], lanes_before[slots], rtol=1e-5, atol=1e-5)
    assert_model_generate_is_fluid_and_greedy(out)  # transformers' generate: FLUID with the gated lanes


def decode_against_original(ckpt, tmp_path, steps):
    """Train exact-mode lanes on the original model's own greedy continuations (self-distilled,
    so they draft what verification accepts), export, reload, decode: FLUID's tokens and the
    original model's greedy tokens."""
    from fluid.decoding import DecodeConfig, FluidDecoder
    from fluid.decoding.ar import greedy_generate

    torch.manual_seed(0)  # the adapter's initialisation: independent of the tests that ran before
    m = module(ckpt)
    tok = m.tokenizer
    prompts = [tok(f"{a} + {a + 1} =", add_special_tokens=False)["input_ids"] for a in range(6)]
    ref = greedy_generate(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval(), prompts,
                          max_new_tokens=24, eos_token_id=None, pad_token_id=tok.pad_token_id).tokens
    b = collate_sft([_encoded(tok, p, r) for p, r in zip(prompts, ref)], tok.pad_token_id)
    for s in range(steps):
        train_step(m, b, seed=s)
    fm = load_fluid(m.export_hf(tmp_path / "checkpoint"))
    dec = FluidDecoder(fm.model, tok, mask_token_id=fm.mask_token_id,
                       config=DecodeConfig(horizon="fixed", fixed_k=4, k_max=4, max_new_tokens=24, batch_size=3))
    dec.eos_id = None  # the full length: more blocks to verify
    return dec.generate(prompts), ref


def test_fluid_decoding_returns_the_original_models_greedy_output(original, tmp_path):
    got, ref = decode_against_original(original, tmp_path, steps=5)
    assert got["tokens"] == ref


def test_accepted_drafts_of_exact_lanes_are_the_original_models_tokens(drafting_original, tmp_path):
    got, ref = decode_against_original(drafting_original, tmp_path, steps=10)
    assert got["tokens"] == ref
    assert got["nfe"] < sum(len(t) for t in ref) / 2  # blocks were accepted: the gated lanes drafted them


def test_lanes_scope_needs_lora():
    from fluid.modules.lora import LoraSettings

    with pytest.raises(ValueError, match="scope=lanes needs stage.module.lora.enabled=true"):
        LoraSettings(enabled=False, scope="lanes")
    with pytest.raises(ValueError, match=r"must be one of all \| lanes, got 'some'"):
        LoraSettings(scope="some")
