"""Cost-sized windows (``decode.window=cost``): per row and per forward, as many draft tokens and
lane slots as maximise the expected committed tokens per unit of forward cost; lossless.

A row's forward carries ``[exact, d drafts, m MASK lane slots]``:

* ``exact`` is the AR token after the committed text (the argmax of the previous forward), so it
  is always committed.
* The ``d`` drafts come from one of two sources, whichever promises more: the lane of the previous
  forward (its MASK slots predicted the tokens after its block, ``decode.lane_len`` deep) or an
  n-gram lookup in the prompt and the text so far (``decode.ngram``, :mod:`fluid.decoding.ngram`).
  Draft ``j`` is committed when it equals the AR argmax after draft ``j - 1`` and every draft before
  it was (verification inside the same forward, as in :mod:`fluid.decoding.fluid`).
* The ``m`` lane slots follow the last draft: if every draft is accepted they draft the next
  forward (a lane anchored on a wrong draft is discarded).

``d`` and ``m`` maximise ``(1 + E[accepted drafts] + P[all accepted] * V[lane]) / cost(1 + d + m)``,
with ``V`` a lane's expected accepted drafts less the cost of verifying them next forward
(:func:`~fluid.decoding.costplan.net_lane_gain`); rows that share a forward are sized together, since the
widest sets its cost (:func:`~fluid.decoding.costplan.plan_batch`). ``cost`` is the model's measured forward-cost curve
(:mod:`fluid.decoding.cost`); the acceptance of each draft is estimated from what this run has
seen so far (:class:`~fluid.decoding.costplan.Acceptance`: lane drafts by their probability, n-gram drafts by depth, a
lane's depth rates raised by an exploration bonus that shrinks as their counts grow,
``decode.explore``). Without a MASK token (a plain checkpoint) there is no lane and this is
training-free n-gram drafting with windows sized by their cost.
"""

from __future__ import annotations

import numpy as np
import torch

from fluid.decoding.config import DecodeConfig
from fluid.decoding.costplan import Acceptance, Draft, RowState, plan, plan_batch
from fluid.decoding.ngram import NgramIndex
from fluid.decoding.state import Context, DecodeBatch, RowStats, top_token

ONE_PROMPT_AT_A_TIME = False


def lane_length(cfg: DecodeConfig, mask_id: int | None) -> int:
    """The deepest lane a forward may carry (0: no lanes, e.g. a checkpoint without MASK)."""
    if mask_id is None or not cfg.share_verify_draft:
        return 0
    return cfg.lane_len if cfg.lane_len is not None else cfg.k_max - 1


def prefill_lane(cfg: DecodeConfig, n_rows: int, mask_id: int | None = None) -> int:
    return lane_length(cfg, mask_id)


def start(batch: DecodeBatch, cfg: DecodeConfig, ctx: Context) -> list[RowState]:
    """The per-row state for the rows of a freshly prefilled ``batch`` (``ctx.prompts``: their prompts)."""
    exact = batch.pending.argmax(-1).tolist()
    rows = [RowState(exact=e, pos=int(p), ngram=NgramIndex(ctx.prompts[i], cfg.ngram_min, cfg.ngram_max)
                     if cfg.ngram else None)
            for i, (e, p) in enumerate(zip(exact, batch.next_pos.tolist()))]
    if batch.lane_logits is not None:  # the prefill's lane drafted the first forward
        p, t = top_token(batch.lane_logits[:, 1:])
        for i, r in enumerate(rows):
            r.lane = [Draft(int(tt), "lane", float(pp), s) for s, (pp, tt) in
                      enumerate(zip(p[i].tolist(), t[i].tolist()), start=1)]
        batch.lane_logits = None
    return rows


def extend(rows: list[RowState], new: list[RowState], ctx: Context) -> list[RowState]:
    return rows + new


def keep(rows: list[RowState], m: np.ndarray) -> list[RowState]:
    return [r for r, a in zip(rows, m.tolist()) if a]


def step(batch: DecodeBatch, rows: list[RowState], stats, cfg: DecodeConfig, ctx: Context) -> list[RowState]:
    """One forward: size every row's window, verify and draft, commit; finished rows leave."""
    dev, mask_id = batch.device, ctx.mask_id
    lane_max = lane_length(cfg, mask_id)
    if ctx.acceptance is None:
        ctx.acceptance = Acceptance()
    acc = ctx.acceptance
    q_cap = 1 + cfg.k_max + lane_max
    n = batch.size
    cost = ((ctx.cost.table(n, q_cap), ctx.cost.table(n, q_cap, lane=True) if lane_max else None)
            if ctx.cost is not None else (np.arange(q_cap + 1, dtype=float), None))
    rooms = [ctx.rule.room(stats[int(ri)]) for ri in batch.rows.tolist()]
    if n == 1:
        plan(rows[0], cfg, acc, lane_max, cost, rooms[0])
    else:
        plan_batch(rows, cfg, acc, lane_max, cost, rooms)
    qlen = np.array([1 + len(r.chain) + r.m for r in rows])
    q = int(qlen.max())
    ids = np.full((n, q), mask_id if mask_id is not None else 0, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : 1 + len(r.chain)] = [r.exact] + [dr.tok for dr in r.chain]
    pos = np.array([r.pos for r in rows])[:, None] + np.arange(q)[None, :]
    new_valid = None if qlen.min() == q else torch.from_numpy(np.arange(q)[None, :] < qlen[:, None]).to(dev)
    logits, _ = batch.forward(torch.from_numpy(ids).to(dev), torch.from_numpy(pos).to(dev), new_valid=new_valid)
    top_p, ar = (x.cpu().numpy() for x in top_token(logits))
    c = np.ones(n, dtype=np.int64)
    for i, r in enumerate(rows):
        d = len(r.chain)
        a = 0
        while a < d and r.chain[a].tok == ar[i, a]:
            a += 1
        truth = ar[i, : a + 1].tolist()  # the tokens after the exact one, as far as now known
        for chain in r.options:
            acc.record(chain, truth)
        c[i] = 1 + a
    if n > 1:
        batch.hide_tail(torch.from_numpy(np.arange(q)[None, :] < c[:, None]).to(dev))
    batch.crop(q - int(c.max()))
    alive = np.ones(n, dtype=bool)
    for i, r in enumerate(rows):
        ri, d, k = int(batch.rows[i]), len(r.chain), int(c[i])
        committed = [r.exact] + [dr.tok for dr in r.chain[: k - 1]]
        st = stats[ri]
        st.nfe += 1
        alive[i] = ctx.rule.commit(st, committed, block_done=True, block_acc=k, horizon=int(qlen[i]))
        if r.ngram is not None:
            r.ngram.extend(committed)
        r.exact, r.pos = int(ar[i, k - 1]), r.pos + k
        # a lane anchored on the last draft drafts the next forward only if every draft held
        r.lane = [Draft(int(ar[i, d + s]), "lane", float(top_p[i, d + s]), s) for s in range(1, r.m + 1)] \
            if k == d + 1 and r.m else []
    if not alive.all():
        batch.next_pos = torch.tensor([r.pos for r in rows], device=dev)
        batch.keep(torch.from_numpy(alive).to(dev))
        rows = keep(rows, alive)
    batch.compact()
    return rows


def decode(batch: DecodeBatch, stats: list[RowStats], cfg: DecodeConfig, ctx: Context) -> None:
    rows = start(batch, cfg, ctx)
    while batch.size:
        rows = step(batch, rows, stats, cfg, ctx)
