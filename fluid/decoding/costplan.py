"""Sizing a cost window (:mod:`fluid.decoding.costwin`): the acceptance estimates a run keeps
(:class:`Acceptance`), the expected committed tokens of a window of ``d`` drafts and ``m`` lane
slots (:func:`window_totals`, :func:`net_lane_gain`), and the choice of each row's window, alone
(:func:`plan`) or with the rows it shares a forward with (:func:`plan_batch`). Pure numpy: the
decoding loop, the model and the cache are in :mod:`fluid.decoding.costwin`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fluid.decoding.config import DecodeConfig
from fluid.decoding.ngram import NgramIndex

DEPTHS = 32


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
