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
(:func:`net_lane_gain`); rows that share a forward are sized together, since the widest sets its
cost (:func:`plan_batch`). ``cost`` is the model's measured forward-cost curve
(:mod:`fluid.decoding.cost`); the acceptance of each draft is estimated from what this run has
seen so far (:class:`Acceptance`: lane drafts by their probability, n-gram drafts by depth, a
lane's depth rates raised by an exploration bonus that shrinks as their counts grow,
``decode.explore``). Without a MASK token (a plain checkpoint) there is no lane and this is
training-free n-gram drafting with windows sized by their cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fluid.decoding.config import DecodeConfig
from fluid.decoding.ngram import NgramIndex
from fluid.decoding.state import Context, DecodeBatch, RowStats, top_token

ONE_PROMPT_AT_A_TIME = False
DEPTHS = 32


def lane_length(cfg: DecodeConfig, mask_id: int | None) -> int:
    """The deepest lane a forward may carry (0: no lanes, e.g. a checkpoint without MASK)."""
    if mask_id is None or not cfg.share_verify_draft:
        return 0
    return cfg.lane_len if cfg.lane_len is not None else cfg.k_max - 1


def prefill_lane(cfg: DecodeConfig, n_rows: int, mask_id: int | None = None) -> int:
    return lane_length(cfg, mask_id)


class Acceptance:
    """Running acceptance estimates, with priors that the run's own counts soon outweigh.

    ``estimate('lane', p, j)``: a lane draft of top probability ``p`` (10 bins, prior: ``p``);
    ``estimate('ngram', p, j)``: an n-gram draft at depth ``j``; ``lane_depth(m)``: the expected
    accepted drafts of a lane of ``m`` slots not yet run, from the depth rates. Each is the chance
    that the draft is right given the ones before it were. Every candidate chain is scored against
    the tokens the forward revealed, whether it was carried or not, so a source that is never
    carried is still measured. Lane slots are the exception: a lane's drafts exist only if the
    previous forward carried MASK slots, so a few early misses could keep lanes out for the rest of
    a run. Their depth rates are therefore optimistic (UCB): the mean plus
    ``explore * sqrt(ln t / n)``, with ``n`` the depth's count (prior included) and ``t`` the
    row-forwards planned so far (every row of every forward, across calls), capped at 1. While no
    lane is carried its count stays and ``t`` grows, so the estimate rises until a lane is tried
    again; a depth tried often converges to its mean.
    ``explore=0``: the plain means."""

    PRIOR_W = 2.0

    def __init__(self, explore: float = 0.0):
        self.explore = float(explore)
        self.t = 0  # row-forwards planned with these estimates
        self.bins = 10
        self.lane_n = np.full(self.bins, self.PRIOR_W)
        self.lane_a = (np.arange(self.bins) + 0.5) / self.bins * self.PRIOR_W
        self.ngram_n = np.full(DEPTHS + 1, self.PRIOR_W)
        self.ngram_a = np.full(DEPTHS + 1, 0.5 * self.PRIOR_W)
        self.depth_n = np.full(DEPTHS + 1, self.PRIOR_W)
        self.depth_a = np.full(DEPTHS + 1, 0.5 * self.PRIOR_W)

    def _bin(self, p: float) -> int:
        return min(self.bins - 1, max(0, int(p * self.bins)))

    def _rate(self, a, n):
        """``a / n`` plus the exploration bonus, capped at 1 (arrays or scalars)."""
        if not self.explore:
            return a / n
        return np.minimum(1.0, a / n + self.explore * np.sqrt(np.log(max(self.t, 2)) / n))

    def estimate(self, src: str, p: float, j: int) -> float:
        if src == "lane":
            b = self._bin(p)
            return float(self.lane_a[b] / self.lane_n[b])
        j = min(j, DEPTHS)
        return float(self.ngram_a[j] / self.ngram_n[j])

    def lane_depth(self, m: int) -> np.ndarray:
        """Expected accepted drafts of a lane of ``0..m`` slots (cumulative)."""
        rate = self._rate(self.depth_a[1: m + 1], self.depth_n[1: m + 1])
        return np.concatenate([[0.0], np.cumsum(np.cumprod(rate))])

    def record(self, chain: list["Draft"], truth: list[int]) -> None:
        """Score ``chain`` (drafts of the tokens after an exact token) against ``truth``, the tokens
        that followed it as far as the forward revealed them: up to and including its first miss."""
        for j, (dr, t) in enumerate(zip(chain, truth), start=1):
            hit = dr.tok == t
            jj = min(j, DEPTHS)
            if dr.src == "lane":
                b = self._bin(dr.p)
                self.lane_n[b] += 1
                self.lane_a[b] += hit
                self.depth_n[jj] += 1
                self.depth_a[jj] += hit
            else:
                self.ngram_n[jj] += 1
                self.ngram_a[jj] += hit
            if not hit:
                break


@dataclass
class Draft:
    tok: int
    src: str       # lane | ngram
    p: float = 0.0  # the lane's top probability
    depth: int = 0  # the lane slot it came from


@dataclass
class RowState:
    exact: int
    pos: int
    ngram: NgramIndex | None
    lane: list[Draft] = field(default_factory=list)  # drafts for the tokens after ``exact``
    chain: list[Draft] = field(default_factory=list)  # what this forward carries
    options: list[list[Draft]] = field(default_factory=list)  # every source's drafts (scored afterwards)
    m: int = 0


def window_totals(est: list[float], lane_gain: np.ndarray, room: int | None = None) -> np.ndarray:
    """Expected committed tokens of a window of ``d`` drafts (estimates ``est``) and ``m`` lane
    slots, ``1 + sum_j prod_{i<=j} est_i + P_d * lane_gain[m]``, as a ``(d+1, m+1)`` array; with
    ``room`` (tokens the row may still generate) a window whose lane could only draft past the
    row's end, ``m > max(0, room - 1 - d)``, is ``-inf`` (never chosen)."""
    p = np.concatenate([[1.0], np.cumprod(est)]) if est else np.ones(1)
    gain = 1 + np.concatenate([[0.0], np.cumsum(p[1:])])           # (d+1,)
    total = gain[:, None] + p[:, None] * lane_gain[None, :]
    if room is not None:
        dd, mm = np.indices(total.shape)
        total = np.where(mm <= np.maximum(0, room - 1 - dd), total, -np.inf)
    return total


def best_window(est: list[float], lane_gain: np.ndarray, cost: np.ndarray,
                cost_lane: np.ndarray | None = None, room: int | None = None) -> tuple[int, int, float]:
    """``(d, m, rate)`` maximising ``(1 + sum_j prod_{i<=j} est_i + P_d * lane_gain[m]) / cost[1+d+m]``
    over ``d <= len(est)`` and ``m < len(lane_gain)`` (``cost_lane`` for windows with ``m > 0``;
    ``room``: see :func:`window_totals`)."""
    total = window_totals(est, lane_gain, room)
    q = 1 + np.arange(total.shape[0])[:, None] + np.arange(total.shape[1])[None, :]
    q = np.minimum(q, len(cost) - 1)
    c = cost[q]
    if cost_lane is not None:
        c = np.where(np.arange(total.shape[1])[None, :] > 0, cost_lane[q], c)
    rate = total / c
    d, m = np.unravel_index(int(np.argmax(rate)), rate.shape)
    return int(d), int(m), float(rate[d, m])


def net_lane_gain(gain: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """What a lane of ``0..m`` slots is worth, in tokens, to the forward that carries it.

    ``gain[j]``: the expected accepted drafts of a lane's first ``j`` slots. Those drafts are
    committed only by the next forward, which pays for the ``j`` slots that carry them: a lane is
    worth the best ``j <= m`` of its expected accepted drafts less the tokens that extra cost would
    have bought at a plain forward's rate, ``(cost[1 + j] - cost[1]) / cost[1]`` (never below 0).
    Counting the drafts at full value would credit them once here and again when verified."""
    j = np.arange(len(gain))
    extra = (cost[np.minimum(1 + j, len(cost) - 1)] - cost[1]) / cost[1]
    return np.maximum.accumulate(np.maximum(0.0, gain - extra))


def _menu(row: RowState, cfg: DecodeConfig, acc: Acceptance, lane_max: int, cost: tuple,
          room: int) -> tuple[list[tuple[list[Draft], list[float]]], np.ndarray]:
    """What ``row`` may carry this forward: each draft source's chain with its acceptance
    estimates (the empty chain if there is none), and the worth of a lane of ``0..m`` slots;
    ``room``: tokens the row may still generate. Sets ``row.options`` (scored after the forward)."""
    acc.t += 1
    width = min(cfg.k_max - 1, room - 1)
    lane_max = min(lane_max, max(0, room - 1))
    lane_gain = net_lane_gain(acc.lane_depth(lane_max), cost[0])
    options = []
    if row.lane:
        options.append(row.lane[:width])
    if row.ngram is not None:
        toks, _ = row.ngram.lookup(row.exact, min(cfg.ngram_draft, width))
        if toks:
            options.append([Draft(t, "ngram") for t in toks])
    row.options = options
    menu = [(chain, [acc.estimate(dr.src, dr.p, j) for j, dr in enumerate(chain, start=1)])
            for chain in options or [[]]]
    return menu, lane_gain


def plan(row: RowState, cfg: DecodeConfig, acc: Acceptance, lane_max: int, cost: tuple, room: int) -> None:
    """Pick this forward's drafts and lane length for a row alone in its forward (sets ``row.chain``
    and ``row.m``): the window of the highest expected committed tokens per unit of its cost."""
    menu, lane_gain = _menu(row, cfg, acc, lane_max, cost, room)
    best = (0, 0, -1.0, [])
    for chain, est in menu:
        d, m, rate = best_window(est, lane_gain, *cost, room=room)
        if rate > best[2]:
            best = (d, m, rate, chain)
    d, m, _, chain = best
    row.chain, row.m = chain[:d], m


def _best_within(totals: np.ndarray, width: int, lanes: bool) -> tuple[np.ndarray, np.ndarray]:
    """For each ``k < width``: the most expected tokens of a window with ``d + m <= k`` (``m = 0``
    unless ``lanes``; the narrowest of equals), and its flat index in ``totals``."""
    dd, mm = np.indices(totals.shape)
    k = (dd + mm).ravel()
    order = np.argsort(k, kind="stable")                       # narrowest first: argmax keeps the first
    v = np.where(lanes | (mm == 0), totals, -np.inf).ravel()[order]
    fits = k[order][None, :] <= np.arange(width)[:, None]      # (width, entries)
    masked = np.where(fits, v[None, :], -np.inf)
    j = masked.argmax(1)
    return masked[np.arange(width), j], order[j]


def plan_batch(rows: list[RowState], cfg: DecodeConfig, acc: Acceptance, lane_max: int, cost: tuple,
               rooms: list[int]) -> None:
    """Pick the drafts and lane slots of rows that share a forward. Its cost is set by the widest
    row (the others are padded to it), so the rows are sized together: the width ``q`` (and whether
    any row carries a lane, which in exact mode costs the whole forward the adapter) maximising the
    rows' expected committed tokens together per unit of the batch forward's cost, each row taking
    the window of most expected tokens that fits in ``q``. Alone (one row) this is :func:`plan`."""
    plain, with_lane = cost
    q_cap = len(plain) - 1
    menus = [_menu(r, cfg, acc, lane_max, cost, room) for r, room in zip(rows, rooms)]
    totals = [[window_totals(est, gain, room) for _, est in menu] for (menu, gain), room in zip(menus, rooms)]
    best = (-1.0, None, None)
    for lanes in ((False, True) if lane_max else (False,)):
        c = with_lane if lanes and with_lane is not None else plain
        value, choice = np.zeros(q_cap), []
        for (menu, _), row_totals in zip(menus, totals):
            row_best, row_arg = np.full(q_cap, -np.inf), [None] * q_cap
            for (chain, _), t in zip(menu, row_totals):
                b, a = _best_within(t, q_cap, lanes)
                for k in np.flatnonzero(b > row_best):
                    row_best[k], row_arg[k] = b[k], (chain, *divmod(int(a[k]), t.shape[1]))
            value += row_best
            choice.append(row_arg)
        rate = value / c[1: q_cap + 1]
        k = int(np.argmax(rate))
        if rate[k] > best[0]:
            best = (float(rate[k]), k, [ch[k] for ch in choice])
    for r, (chain, d, m) in zip(rows, best[2]):
        r.chain, r.m = chain[: int(d)], int(m)


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
