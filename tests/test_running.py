"""Continuous batching (fluid/decoding/running.py): rows that join a running batch between
forwards, or leave it, decode exactly what they decode alone (greedy AR, lossless)."""

from __future__ import annotations

import pytest

from fluid.decoding.running import RunningBatch
from fluid.decoding.state import StopRule
from fluid.utils.errors import FluidConfigError
from tests.conftest import DECODE_VOCAB, ar_reference, constant_model, fluid_decoder, random_prompts, tiny_model

SETTINGS = {
    "ar": dict(algorithm="ar"),
    "head": dict(horizon="head"),
    "lanes": dict(horizon="fixed", fixed_k=8, k_min=1, k_max=8, confidence=0.0),
    # a fixed cost curve (a device where a wide window costs little, as for this tiny model; the
    # measured one moves with the machine's load) and no exploration (its transient over 40 tokens
    # costs more than the drafts bring: TPF 1.8 against 6.9 without): TPF measures the joins only
    "cost_ngram": dict(window="cost", ngram=True, explore=0.0, cost_curve=[1.0 + 0.02 * i for i in range(40)]),
}


@pytest.mark.parametrize("good_drafts", [False, True], ids=["random", "perfect_drafts"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_rows_that_join_and_leave_decode_as_alone(name, good_drafts):
    model = constant_model() if good_drafts else tiny_model("llama", vocab_size=DECODE_VOCAB, seed=1)
    prompts = random_prompts(6, DECODE_VOCAB, seed=2)
    ref = ar_reference(model, prompts, 40)
    rb = RunningBatch(fluid_decoder(model, max_new_tokens=40, **SETTINGS[name]))
    ids = rb.add(prompts[:2])
    rb.step()
    rb.step()
    ids += rb.add(prompts[2:5])          # join a batch whose rows are mid-block
    rb.step()
    assert set(ids[2:5]) <= set(rb.active)
    rb.remove([ids[3]])                  # a cancelled row leaves at once
    assert ids[3] not in rb.active and set(ids[2:5]) - {ids[3]} <= set(rb.active)
    ids += rb.add(prompts[5:])
    rb.run()
    out = [rb.stats[i].tokens for i in ids]
    assert [o for i, o in enumerate(out) if i != 3] == [r for i, r in enumerate(ref) if i != 3]
    assert ref[3][: len(out[3])] == out[3] and len(out[3]) < len(ref[3])
    tpf = sum(len(rb.stats[i].tokens) for i in ids) / sum(rb.stats[i].nfe for i in ids)
    if good_drafts and name in ("lanes", "cost_ngram"):
        assert tpf > 2.0, tpf            # the lanes and n-grams still draft across the joins


def test_each_row_keeps_its_own_limit():
    model = tiny_model("llama", vocab_size=DECODE_VOCAB, seed=1)
    prompts = random_prompts(3, DECODE_VOCAB, seed=3)
    ref = ar_reference(model, prompts, 24)
    dec = fluid_decoder(model, max_new_tokens=24, horizon="fixed", fixed_k=8)
    rb = RunningBatch(dec)
    ids = rb.add(prompts, rules=[StopRule(n, None) for n in (5, 24, 11)])
    rb.run()
    assert [rb.stats[i].tokens for i in ids] == [ref[0][:5], ref[1], ref[2][:11]]
    assert [rb.stats[i].finished for i in ids] == ["max_new_tokens"] * 3


def test_algorithms_that_cannot_take_rows_are_refused():
    model = tiny_model("llama", vocab_size=DECODE_VOCAB, seed=1)
    with pytest.raises(FluidConfigError, match="decode.algorithm"):
        RunningBatch(fluid_decoder(model, algorithm="published"))


def test_a_joining_row_never_sees_the_padding_of_the_shorter_cache():
    """Equal-length prompts leave no hole in either cache; the join itself pads one of them."""
    model = tiny_model("llama", vocab_size=DECODE_VOCAB, seed=1)
    prompts = [p[:6] for p in random_prompts(2, DECODE_VOCAB, seed=5, lo=6, hi=7)]
    ref = ar_reference(model, prompts, 12)
    rb = RunningBatch(fluid_decoder(model, max_new_tokens=12, algorithm="ar"))
    ids = rb.add(prompts[:1])
    for _ in range(4):
        rb.step()
    ids += rb.add(prompts[1:])
    rb.run()
    assert [rb.stats[i].tokens for i in ids] == ref


def test_the_engine_fails_a_bad_request_alone_and_goes_on():
    """A prompt that cannot be prefilled and a receiver that raises fail their own request; the
    requests beside them get their tokens."""
    import threading

    from fluid.serve.engine import Engine, Request

    model = tiny_model("llama", vocab_size=DECODE_VOCAB, seed=1)
    prompts = random_prompts(3, DECODE_VOCAB, seed=4)
    ref = ar_reference(model, prompts, 10)
    engine = Engine(fluid_decoder(model, max_new_tokens=10, horizon="fixed", fixed_k=4), max_rows=8).start()
    results: dict = {}
    done = threading.Semaphore(0)

    def receiver(key, raises=False):
        def on_event(kind, payload):
            if raises and kind == "tokens":
                raise RuntimeError("the client is gone")
            if kind in ("done", "error"):
                results[key] = (kind, payload.tokens if kind == "done" else payload)
                done.release()
        return on_event

    try:
        reqs = [Request(prompts[0], StopRule(10, None), receiver("good0")),
                Request([10 ** 6], StopRule(10, None), receiver("bad_prompt")),
                Request(prompts[1], StopRule(10, None), receiver("raises", raises=True)),
                Request(prompts[2], StopRule(10, None), receiver("good2"))]
        with engine._cv:  # all four arrive before the engine's next look at its queue
            for r in reqs:
                engine.submit(r)
        for _ in range(4):
            assert done.acquire(timeout=30)
        assert results["good0"] == ("done", ref[0]) and results["good2"] == ("done", ref[2])
        assert results["bad_prompt"][0] == "error" and results["raises"][0] == "error"
        assert engine.active_rows == 0 and engine.alive
    finally:
        engine.stop()
