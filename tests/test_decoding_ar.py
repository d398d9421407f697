"""Greedy AR (fluid.decoding.ar): batched equals unbatched, equals a cache-free argmax and HF generate."""

import pytest
import torch

from fluid.decoding.ar import greedy_generate
from tests.conftest import random_prompts, tiny_model


def _prompts(n, vocab, seed=0):
    return random_prompts(n, vocab, seed=seed, lo=3, hi=12)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batched_greedy_equals_unbatched(arch):
    model = tiny_model(arch)
    prompts = _prompts(5, 128, seed=1)
    batched = greedy_generate(model, prompts, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    for p, toks in zip(prompts, batched.tokens):
        single = greedy_generate(model, [p], max_new_tokens=12, eos_token_id=None, pad_token_id=0)
        assert single.tokens[0] == toks
        assert len(toks) == 12


def test_greedy_matches_full_forward_argmax():
    """Each generated token is the argmax of a cache-free forward over the whole prefix."""
    model = tiny_model("llama")
    p = _prompts(1, 128, seed=2)[0]
    out = greedy_generate(model, [p], max_new_tokens=8, eos_token_id=None, pad_token_id=0).tokens[0]
    seq = list(p)
    with torch.no_grad():
        for t in out:
            ids = torch.tensor([seq])
            logits = model(input_ids=ids, position_ids=torch.arange(len(seq))[None]).logits[0, -1]
            assert int(logits.argmax()) == t
            seq.append(t)


def test_greedy_matches_hf_generate():
    model = tiny_model("llama")
    model.generation_config.pad_token_id = 0
    for p in _prompts(3, 128, seed=3):
        ours = greedy_generate(model, [p], max_new_tokens=10, eos_token_id=None, pad_token_id=0).tokens[0]
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
        assert ours == ref[0, len(p):].tolist()


def test_eos_stops_each_row_and_counts_nfe():
    model = tiny_model("llama")
    prompts = _prompts(4, 128, seed=4)
    free = greedy_generate(model, prompts, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    eos = free.tokens[0][3]  # make row 0 stop at its 4th token
    res = greedy_generate(model, prompts, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    for full, got in zip(free.tokens, res.tokens):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert got == full[:cut]
    # one NFE rule for every algorithm: the forward that writes a token's KV commits it, so the
    # batch runs one forward per token of its longest row (the first token's included)
    assert res.nfe == max(len(t) for t in res.tokens)
