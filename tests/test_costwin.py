"""Cost-sized windows and n-gram drafts (``decode.window=cost``, ``decode.ngram``): lossless against
greedy AR at batch 1 and in ragged batches, training-free on a checkpoint without MASK, and the
window rule, the n-gram index and the cost curve each against a direct computation."""

import numpy as np
import pytest
import torch

from fluid.decoding import DecodeConfig, FluidDecoder
from fluid.decoding.cost import ForwardCost, measure_curve
from fluid.decoding.costplan import Acceptance, Draft, RowState, best_window, net_lane_gain, plan, plan_batch, window_totals
from fluid.decoding.ngram import NgramIndex
from tests.conftest import DECODE_VOCAB as VOCAB
from tests.conftest import Tok, ar_reference, constant_model, random_prompts, tiny_model

CHEAP = [1.0 + 0.02 * i for i in range(40)]   # a device where a wide window costs little: drafts ride along
STEEP = [1.0, 1.9, 2.8, 3.7]                  # one where every extra token costs almost a forward


def decoder(model, eos=None, mask=True, **cfg):
    tok = Tok(eos)
    if not mask:
        tok.mask_token_id = None
    return FluidDecoder(model, tok, config=DecodeConfig(window="cost", **cfg))


def repetitive_prompts(n, seed=0):
    """Prompts that repeat a phrase, as GSM8K answers repeat the question's numbers."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        phrase = torch.randint(4, VOCAB, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        out.append((phrase * 4)[: int(torch.randint(5, 16, (1,), generator=g))])
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_cost_windows_are_lossless(arch, batch_size):
    model = tiny_model(arch, vocab_size=VOCAB, seed=1)
    ps = random_prompts(3, VOCAB, seed=2) + repetitive_prompts(3, seed=3)
    ref = ar_reference(model, ps, 32)
    for setting in ({"ngram": True}, {}, {"ngram": True, "lane_len": 4}, {"ngram": True, "ngram_max": 1},
                    {"ngram": True, "lane_len": 4, "explore": 1.0}):
        for curve in (CHEAP, STEEP):
            out = decoder(model, batch_size=batch_size, max_new_tokens=32, cost_curve=curve, **setting).generate(ps)
            assert out["tokens"] == ref, (setting, curve)
            for row in out["rows"]:
                assert sum(row.accepted) == len(row.tokens) == 32 and row.finished == "max_new_tokens"
                assert row.nfe == len(row.accepted)


def test_ngram_drafts_are_accepted_when_the_model_repeats_itself():
    """A tiny random model soon repeats itself: n-gram drafts of its own text are accepted, so it
    takes fewer forwards than tokens; with a steep cost curve the same drafts are not worth carrying."""
    model = tiny_model("llama", vocab_size=VOCAB, seed=1)
    ps = repetitive_prompts(4, seed=5)
    ref = ar_reference(model, ps, 48)
    cheap = decoder(model, mask=False, ngram=True, batch_size=1, max_new_tokens=48, cost_curve=CHEAP).generate(ps)
    steep = decoder(model, mask=False, ngram=True, batch_size=1, max_new_tokens=48, cost_curve=STEEP).generate(ps)
    assert cheap["tokens"] == steep["tokens"] == ref
    assert cheap["tpf"] > 1.3
    assert steep["tpf"] < cheap["tpf"]


def test_training_free_ngram_on_a_checkpoint_without_mask():
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=4)
    ps = random_prompts(5, VOCAB, seed=6)
    ref = ar_reference(model, ps, 20)
    out = decoder(model, mask=False, ngram=True, batch_size=3, max_new_tokens=20, cost_curve=CHEAP).generate(ps)
    assert out["tokens"] == ref
    with pytest.raises(ValueError, match="no MASK token"):
        decoder(model, mask=False, batch_size=3, max_new_tokens=20).generate(ps)
    with pytest.raises(ValueError, match="decode.window=cost"):
        DecodeConfig(ngram=True).validate()


def test_lanes_draft_when_drafts_are_good():
    """Every token embeds alike: a lane's drafts are all right, so a cheap device carries long lanes
    and commits many tokens a forward (the prefill's lane drafts the first one)."""
    model = constant_model()
    ps = random_prompts(3, VOCAB, seed=4)
    ref = ar_reference(model, ps, 40)
    out = decoder(model, batch_size=3, max_new_tokens=40, k_max=8, cost_curve=CHEAP, explore=0.0).generate(ps)
    assert out["tokens"] == ref
    assert out["tpf"] > 4
    # exploration's optimism carries full lanes from the first forward, before the lane's (low
    # probability) drafts are trusted: forwards of lane slots without drafts first (at batch 3,
    # rows sized together, the transient costs more of 40 tokens: TPF 2.5 measured)
    explore = decoder(model, batch_size=3, max_new_tokens=40, k_max=8, cost_curve=CHEAP, explore=1.0).generate(ps)
    assert explore["tokens"] == ref and explore["tpf"] > 2


def test_exploration_tries_a_lane_again_after_early_misses():
    """Ten early misses at lane depth 1 put its plain estimate below break-even: without
    exploration no lane is carried again however long the run (its count never moves); with it
    the estimate rises with the forwards planned until a lane is tried, and a depth whose count is
    large is estimated at its mean."""
    cost = (np.array([np.inf, 1.0, 1.3, 1.6, 1.9, 2.2]), None)
    cfg = DecodeConfig(window="cost", lane_len=4, k_max=4)
    first = {}
    for explore in (0.0, 1.0):
        acc = Acceptance(explore)
        for _ in range(10):
            acc.record([Draft(1, "lane", 0.9, 1)], [2])
        for t in range(2000):
            row = RowState(exact=0, pos=0, ngram=None)
            plan(row, cfg, acc, 4, cost, room=100)
            if row.m:
                first[explore] = t
                break
    assert 0.0 not in first
    assert 0 < first[1.0] < 2000
    acc = Acceptance(1.0)
    acc.t = 10_000
    for i in range(100_000):  # three hits in four
        acc.record([Draft(1, "lane", 0.9, 1)], [1 if i % 4 else 2])
    n, a = acc.depth_n[1], acc.depth_a[1]
    assert acc.lane_depth(1)[1] == pytest.approx(a / n + np.sqrt(np.log(10_000) / n), rel=1e-12)
    assert acc.lane_depth(1)[1] == pytest.approx(0.75, abs=0.015)  # the bonus has shrunk to 0.01
    with pytest.raises(ValueError, match="decode.explore"):
        DecodeConfig(explore=-1.0).validate()


def test_eos_inside_drafts_and_ragged_rows():
    model = tiny_model("llama", vocab_size=VOCAB, seed=5)
    ps = repetitive_prompts(5, seed=6)
    free = ar_reference(model, ps, 30)
    eos = free[0][6]
    ref = ar_reference(model, ps, 30, eos=eos)
    assert ref[0][-1] == eos and len(ref[0]) <= 7
    out = decoder(model, eos=eos, ngram=True, batch_size=5, max_new_tokens=30, cost_curve=CHEAP).generate(ps)
    assert out["tokens"] == ref
    assert [r.finished for r in out["rows"]] == ["eos" if t[-1] == eos else "max_new_tokens" for t in ref]


def test_best_window_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        est = rng.uniform(0, 1, rng.integers(0, 6)).tolist()
        lane_gain = np.concatenate([[0.0], np.cumsum(rng.uniform(0, 0.6, rng.integers(0, 5)))])
        cost = np.concatenate([[np.inf], np.cumsum(rng.uniform(0.01, 1, 12)) + 1])
        d, m, rate = best_window(est, lane_gain, cost)
        best = -1.0
        for dd in range(len(est) + 1):
            p = np.prod(est[:dd]) if dd else 1.0
            gain = 1 + sum(np.prod(est[:j]) for j in range(1, dd + 1))
            for mm in range(len(lane_gain)):
                best = max(best, (gain + p * lane_gain[mm]) / cost[1 + dd + mm])
        assert rate == pytest.approx(best)
    assert best_window([0.9, 0.9], np.zeros(1), np.array([np.inf, 1.0, 1.01, 1.02]))[:2] == (2, 0)
    assert best_window([0.2, 0.2], np.zeros(1), np.array([np.inf, 1.0, 1.9, 2.8]))[:2] == (0, 0)


def test_a_lane_is_worth_its_drafts_less_the_cost_of_verifying_them():
    """Against a direct computation; and on the 2-core CPU's curve a lane whose first draft is
    accepted half the time or less is not carried (its draft costs a slot twice: as a lane slot
    and as the draft the next forward verifies), one accepted 0.9 of the time is."""
    rng = np.random.default_rng(2)
    for _ in range(50):
        gain = np.concatenate([[0.0], np.cumsum(rng.uniform(0, 0.9, rng.integers(0, 6)))])
        cost = np.concatenate([[np.inf], np.cumsum(rng.uniform(0.05, 1, 10)) + rng.uniform(0.5, 2)])
        want = [max([0.0] + [gain[j] - (cost[1 + j] - cost[1]) / cost[1] for j in range(m + 1)])
                for m in range(len(gain))]
        assert net_lane_gain(gain, cost) == pytest.approx(want)
    cpu = np.array([np.inf, 1.0, 1.25, 1.42, 1.56, 1.63])
    cfg = DecodeConfig(window="cost", lane_len=4, k_max=4)
    for rate, carried in ((0.3, False), (0.45, False), (0.9, True)):
        acc = Acceptance()
        acc.depth_a[:] = rate * acc.depth_n
        row = RowState(exact=0, pos=0, ngram=None)
        plan(row, cfg, acc, 4, (cpu, None), room=100)
        assert (row.m > 0) == carried, rate


def _rows(rng, n):
    """Rows with a lane of 0-5 drafts of random confidence, some with an n-gram index that drafts."""
    rows = []
    for _ in range(n):
        ngram = NgramIndex([7, 8, 9, 7, 8, 9, 7], 1, 3) if rng.uniform() < 0.5 else None
        r = RowState(exact=8, pos=0, ngram=ngram)
        r.lane = [Draft(1, "lane", float(rng.uniform(0, 1)), s) for s in range(1, int(rng.integers(0, 6)) + 1)]
        rows.append(r)
    return rows


def _direct(rows, rooms, cfg, acc, lane_max, plain, lane):
    """The best batch rate by enumeration: every width q, regime (lanes or not) and, per row,
    every source, d and m that fit q, k_max, lane_max and the row's room."""
    want = -1.0
    gain = net_lane_gain(acc.lane_depth(lane_max), plain)
    for lanes, cc in (((False, plain), (True, lane)) if lane_max else ((False, plain),)):
        for q in range(1, len(plain)):
            tot = 0.0
            for r, room in zip(rows, rooms):
                width = min(cfg.k_max - 1, room - 1)
                chains = ([r.lane[:width]] if r.lane else []) + (
                    [[Draft(t, "ngram") for t in r.ngram.lookup(r.exact, min(cfg.ngram_draft, width))[0]]]
                    if r.ngram is not None and r.ngram.lookup(r.exact, width)[0] else [])
                best = -np.inf
                for chain in chains or [[]]:
                    est = [acc.estimate(dr.src, dr.p, j) for j, dr in enumerate(chain, 1)]
                    p = np.concatenate([[1.0], np.cumprod(est)])
                    for d in range(len(chain) + 1):
                        for m in range(min(lane_max, max(0, room - 1)) + 1):
                            if d + m <= q - 1 and (lanes or m == 0) and m <= max(0, room - 1 - d):
                                best = max(best, 1 + p[1: d + 1].sum() + p[d] * gain[m])
                tot += best
            want = max(want, tot / cc[q])
    return want


def test_rows_sharing_a_forward_are_sized_together():
    """plan_batch against an enumeration: the widest window sets the cost of every row's forward,
    so the chosen width q maximises the rows' best expected tokens within q, together, per unit of
    cost(q); every window fits k_max, lane_len and its row's room; one row alone gets the rate
    plan gives it."""
    rng = np.random.default_rng(3)
    for trial in range(40):
        lane_max = int(rng.integers(0, 4))
        cfg = DecodeConfig(window="cost", lane_len=lane_max, k_max=6, ngram=True)
        acc = Acceptance(0.0)
        acc.lane_a[:] = rng.uniform(0.1, 0.9, acc.bins) * acc.lane_n
        acc.depth_a[:] = rng.uniform(0.1, 0.9, len(acc.depth_n)) * acc.depth_n
        acc.ngram_a[:] = rng.uniform(0.1, 0.9, len(acc.ngram_n)) * acc.ngram_n
        plain = np.concatenate([[np.inf], 1 + np.cumsum(rng.uniform(0.02, 0.8, 1 + cfg.k_max + lane_max))])
        plain[1] = 1.0
        lane = plain * rng.uniform(1.0, 1.3)
        n = int(rng.integers(1, 5))
        rows, rooms = _rows(rng, n), [int(x) for x in rng.integers(1, 9, n)]
        gain = net_lane_gain(acc.lane_depth(lane_max), plain)
        plan_batch(rows, cfg, acc, lane_max, (plain, lane), rooms)
        got = 0.0
        for r, room in zip(rows, rooms):
            d, m = len(r.chain), r.m
            assert d <= min(cfg.k_max - 1, room - 1) and m <= lane_max and m <= max(0, room - 1 - d)
            est = [acc.estimate(dr.src, dr.p, j) for j, dr in enumerate(r.chain, 1)]
            got += window_totals(est, gain)[d, m]
        c = lane if any(r.m for r in rows) else plain
        want = _direct(rows, rooms, cfg, acc, lane_max, plain, lane)
        assert got / c[max(1 + len(r.chain) + r.m for r in rows)] == pytest.approx(want), trial
        if n == 1:
            alone = RowState(exact=8, pos=0, ngram=rows[0].ngram)
            alone.lane = rows[0].lane
            plan(alone, cfg, acc, lane_max, (plain, lane), rooms[0])
            est = [acc.estimate(dr.src, dr.p, j) for j, dr in enumerate(alone.chain, 1)]
            q = 1 + len(alone.chain) + alone.m
            rate = window_totals(est, gain)[len(alone.chain), alone.m] / (lane if alone.m else plain)[q]
            assert rate == pytest.approx(want), trial


def test_ngram_index_against_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(200):
        toks = rng.integers(0, 5, rng.integers(0, 25)).tolist()
        nxt = int(rng.integers(0, 5))
        idx = NgramIndex(toks[:3], 1, 3)
        idx.extend(toks[3:])
        got, n = idx.lookup(nxt, 4)
        text = toks + [nxt]
        want = ([], 0)
        for size in (3, 2, 1):  # longest n-gram ending in nxt, latest earlier occurrence with a continuation
            if size > len(text):
                continue
            key = text[-size:]
            ends = [e for e in range(size, len(text)) if text[e - size: e] == key]
            if ends:
                want = (text[ends[-1]: ends[-1] + 4], size)
                break
        assert (got, n) == want, (toks, nxt)


def test_forward_cost_curve():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    curve, lane = measure_curve(model, 1, cache=16, tokens=(1, 2, 4), repeats=1, mask_id=3)
    assert len(curve) == len(lane) == 4 and curve[0] == 1.0 and all(b >= a for a, b in zip(curve, curve[1:]))
    assert measure_curve(model, 1, cache=16, tokens=(1, 2), repeats=1)[1] is None
    table = ForwardCost(curve=[2.0, 3.0, 5.0]).table(1, 6)
    assert table[1:].tolist() == [1.0, 1.5, 2.5, 3.5, 4.5, 5.5]
    with pytest.raises(ValueError, match="positive"):
        ForwardCost(curve=[1.0, -1.0])
