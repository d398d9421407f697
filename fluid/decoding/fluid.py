"""Elastic-horizon decoding (the FLUID loop), lossless with verification, batched and ragged.

The method's step, per row: a horizon ``K_t``; a block whose slot 0 is the exact AR token and
whose other slots are drafted from MASK (a slot is filled once its predicted token is the
block's first empty one or its probability exceeds ``confidence``); verification accepts the
longest prefix equal to the AR argmax and emits the AR token at the first mismatch.

How this loop runs it, one forward per :func:`fluid_step`:

* **Every forward verifies and drafts.** A slot's logits depend only on the slots before it and
  filled slots never change, so in any draft forward the leading run of filled slots already
  gets the AR argmax that a separate verify forward would compute: that run is committed at
  once (its KV entries are exact and kept), a mismatch ends the block at once, and the first
  empty slot gets its exact token. Accepted tokens and horizons are those of the
  draft-then-verify loop for the same drafts; only forwards spent after a block's fate is known
  disappear.
* **Verify t and draft t+1 share one forward:** a fully drafted block carries ``lane_len`` MASK
  slots; if it is accepted whole they draft the next block. The prefill carries such a lane too.
* **Token budget:** ``DecodeConfig.caps`` narrows blocks (and lanes) while many rows are active.
* **Ragged rows:** every row has its own window; committed entries stay in the cache, the rest
  become masked holes; finished rows leave the batch.

The window rules are the pure functions of :mod:`fluid.decoding.window`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from fluid.decoding import window as W
from fluid.decoding.config import DecodeConfig
from fluid.decoding.state import Context, DecodeBatch, RowStats, top_token

ONE_PROMPT_AT_A_TIME = False


def prefill_lane(cfg: DecodeConfig, n_rows: int, mask_id: int | None = None) -> int:
    """MASK slots the prefill carries after every prompt: they draft the first block."""
    return cfg.caps(n_rows)[1]


@dataclass
class Rows:
    """Per-row state of the loop (numpy: a torch op costs microseconds of dispatch on CPU)."""

    win: np.ndarray        # (n, k_max) window tokens; slot 0 is the exact token after the cache
    filled: np.ndarray     # (n, k_max) which slots hold a token
    blen: np.ndarray       # slots of the current block left in the window
    block_k: np.ndarray    # horizon of the current block
    block_acc: np.ndarray  # its tokens committed so far
    n_tok: np.ndarray      # tokens generated
    exact: np.ndarray      # slot 0 of the next new block
    next_pos: np.ndarray   # position of each window's slot 0
    start: np.ndarray      # which rows start a new block at the next forward
    lane_p: np.ndarray | None = None    # next-block drafts from a lane: probability (-1: none)
    lane_tok: np.ndarray | None = None  # and token

    def keep(self, m: np.ndarray) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                setattr(self, f.name, v[m])

    def extend(self, other: "Rows", mask_id: int) -> None:
        """Append ``other``'s rows (rows that joined the batch); a side without lane drafts gets none."""
        for name in ("lane_p", "lane_tok"):
            if (getattr(self, name) is None) != (getattr(other, name) is None):
                for side in (self, other):
                    if side.lane_p is None:
                        n, w = side.win.shape
                        side.lane_p, side.lane_tok = np.full((n, w), -1.0), np.full((n, w), mask_id, dtype=np.int64)
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is not None:
                setattr(self, f.name, np.concatenate([a, b]))


def initial_rows(batch: DecodeBatch, cfg: DecodeConfig, mask_id: int) -> Rows:
    n, kmax = batch.size, cfg.k_max
    zeros = np.zeros(n, dtype=np.int64)
    rows = Rows(win=np.full((n, kmax), mask_id, dtype=np.int64), filled=np.zeros((n, kmax), dtype=bool),
                blen=zeros.copy(), block_k=zeros.copy(), block_acc=zeros.copy(), n_tok=zeros.copy(),
                exact=batch.pending.argmax(-1).cpu().numpy(), next_pos=batch.next_pos.cpu().numpy(),
                start=np.ones(n, dtype=bool))
    if batch.lane_logits is not None:  # the prefill drafted the first block
        p, t = top_token(batch.lane_logits)
        rows.lane_p, rows.lane_tok = W.prefill_drafts(p.cpu().numpy(), t.cpu().numpy(), kmax, mask_id)
        batch.lane_logits = None
    return rows


def fluid_step(batch: DecodeBatch, rows: Rows, stats: list[RowStats], cfg: DecodeConfig, ctx: Context) -> None:
    """One forward: verify what can be verified, draft the rest, commit, drop finished rows."""
    dev, mask_id, n = batch.device, ctx.mask_id, batch.size
    k_cap, lane_len = cfg.caps(n)
    # 1. new blocks: a horizon per row, slot 0 exact, later slots from the previous lane's drafts
    if rows.start.any():
        k = ctx.horizon(batch)
        room = np.array([ctx.rule.room(stats[r]) for r in batch.rows.tolist()])
        k = np.maximum(np.minimum(np.minimum(k, k_cap), room), 1)
        win, filled = W.seed_blocks(rows.exact, k, cfg.k_max, mask_id, rows.lane_p, rows.lane_tok, cfg.fill_threshold)
        s = rows.start
        rows.win, rows.filled = np.where(s[:, None], win, rows.win), np.where(s[:, None], filled, rows.filled)
        rows.blen, rows.block_k = np.where(s, k, rows.blen), np.where(s, k, rows.block_k)
        rows.block_acc = np.where(s, 0, rows.block_acc)
    # 2. a fully drafted block carries a lane for the next block
    full = (rows.filled | (np.arange(cfg.k_max)[None, :] >= rows.blen[:, None])).all(-1)
    rows.blen = ctx.horizon.trim(batch, stats, rows.win, rows.blen, full)
    lane = np.where(full, lane_len, 0)
    ids, qlen = W.window_inputs(rows.win, rows.blen, lane, mask_id)
    q = ids.shape[1]
    # 3. the forward over every row's window (right-padded)
    logits, hidden = batch.forward(torch.from_numpy(ids).to(dev),
                                   torch.from_numpy(rows.next_pos[:, None] + np.arange(q)[None, :]).to(dev),
                                   new_valid=None if qlen.min() == q else
                                   torch.from_numpy(np.arange(q)[None, :] < qlen[:, None]).to(dev))
    for r, f in zip(batch.rows.tolist(), full.tolist()):
        stats[r].nfe += 1
        stats[r].draft_forwards += not f
    p, t = top_token(logits)
    top_p, ar = p.cpu().numpy(), t.cpu().numpy()  # ar[:, j]: the AR token for slot j + 1
    # 4. verification: commit the leading run of drafts equal to the AR argmax before them
    c = W.verified_run(rows.win, rows.filled, rows.blen, ar, cfg.verify)
    complete, mismatch, cont = W.block_outcome(rows.filled, c, rows.blen)
    nxt = ar[np.arange(n), c - 1]  # the exact token after the committed run
    # 5. the committed run's KV entries are exact: keep them, the rest become holes (trailing ones cropped)
    if n > 1:  # (one row: everything left after the crop is committed and valid)
        batch.hide_tail(torch.from_numpy(np.arange(q)[None, :] < c[:, None]).to(dev))
    batch.crop(q - int(c.max()))
    committed = [w[:m] for w, m in zip(rows.win.tolist(), c.tolist())]
    # 6. continuing blocks draft their later empty slots; every window shifts past its committed run
    rows.win, rows.filled = W.fill_later(rows.win, rows.filled, c, rows.blen, top_p, ar, cfg.fill_threshold, cont)
    rows.win, rows.filled = W.shift_window(rows.win, rows.filled, c, nxt, mask_id)
    rows.next_pos, rows.blen = rows.next_pos + c, rows.blen - c
    rows.block_acc, rows.n_tok = rows.block_acc + c, rows.n_tok + c
    ended = complete | mismatch
    if ended.any():  # the K-head input for the next block: the last committed token's state
        batch.h_anchor = hidden[torch.arange(n, device=dev), torch.from_numpy(c - 1).to(dev)]
    # 7. next-block drafts from the lane of rows that accepted their whole block
    rows.lane_p = rows.lane_tok = None
    if lane_len and (complete & full).any():
        rows.lane_p, rows.lane_tok = W.lane_drafts(top_p, ar, c, complete & full, lane_len, cfg.k_max)
    # 8. commit; finished rows leave the batch
    alive = np.array([ctx.rule.commit(stats[r], committed[i], block_done=bool(ended[i]), block_acc=int(acc),
                                      horizon=int(k))
                      for i, (r, acc, k) in enumerate(zip(batch.rows.tolist(), rows.block_acc, rows.block_k))])
    rows.exact, rows.start = nxt, ended
    if not alive.all():
        batch.next_pos = torch.from_numpy(rows.next_pos).to(dev)
        batch.keep(torch.from_numpy(alive).to(dev))
        rows.keep(alive)
    batch.compact()


def start(batch: DecodeBatch, cfg: DecodeConfig, ctx: Context) -> Rows:
    """The loop's state for the rows of a freshly prefilled ``batch``."""
    return initial_rows(batch, cfg, ctx.mask_id)


def step(batch: DecodeBatch, rows: Rows, stats, cfg: DecodeConfig, ctx: Context) -> Rows:
    fluid_step(batch, rows, stats, cfg, ctx)
    return rows


def extend(rows: Rows, new: Rows, ctx: Context) -> Rows:
    rows.extend(new, ctx.mask_id)
    return rows


def keep(rows: Rows, m: np.ndarray) -> Rows:
    rows.keep(m)
    return rows


def decode(batch: DecodeBatch, stats: list[RowStats], cfg: DecodeConfig, ctx: Context) -> None:
    rows = start(batch, cfg, ctx)
    while batch.size:
        rows = step(batch, rows, stats, cfg, ctx)
