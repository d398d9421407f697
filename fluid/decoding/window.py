"""The FLUID window rules as pure numpy functions (no model, no cache).

A row's *window* holds its current block from the first token whose KV is not yet cached:
``win (n, W)`` are the slot tokens, ``filled (n, W)`` which slots hold a token (slot 0, the
exact token after the cached prefix, always does; the others are drafts or MASK), ``blen (n,)``
how many slots the block still has. One forward over the window gives, for each slot ``s``,
the model's argmax ``ar[:, s]`` and its probability ``top_p[:, s]``, which predict slot ``s + 1``.
"""

from __future__ import annotations

import numpy as np


def seed_blocks(exact: np.ndarray, k: np.ndarray, width: int, mask_id: int, lane_p: np.ndarray | None = None,
                lane_tok: np.ndarray | None = None, threshold: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """New blocks of ``k`` slots: slot 0 is ``exact``; slots ``1..k-1`` take the drafts a lane made
    for them (``lane_p``/``lane_tok`` (n, W), probability -1 where there is none) above ``threshold``,
    the rest are MASK. Returns ``(win, filled)``."""
    slot = np.arange(width)[None, :]
    win = np.where(slot == 0, exact[:, None], mask_id)
    filled = np.broadcast_to(slot == 0, win.shape).copy()
    if lane_p is not None:
        take = (lane_p > threshold) & (slot > 0) & (slot < k[:, None])
        win = np.where(take, lane_tok, win)
        filled |= take
    return win, filled


def window_inputs(win: np.ndarray, blen: np.ndarray, lane: np.ndarray, mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The forward's input ``(n, q)``: each row's block followed by ``lane`` MASK slots (a lane
    drafts the next block); slots past a row's block + lane are padding. Returns (ids, lengths)."""
    n, width = win.shape
    qlen = blen + lane
    q = int(qlen.max())
    ids = np.full((n, max(q, width)), mask_id, dtype=np.int64)
    ids[:, :width] = np.where(np.arange(width)[None, :] < blen[:, None], win, mask_id)
    return ids[:, :q], qlen


def verified_run(win: np.ndarray, filled: np.ndarray, blen: np.ndarray, ar: np.ndarray, verify: bool = True) -> np.ndarray:
    """How many slots the forward commits per row: the leading run of filled slots that equal the
    AR argmax before them (nothing in their context is a guess, so this is exact); at least slot 0.
    Without ``verify`` every filled slot of the run counts, whatever the model predicts."""
    w = min(ar.shape[1], win.shape[1])
    ok = filled[:, :w] & (np.arange(w)[None, :] < blen[:, None])
    if verify:
        ok[:, 1:] &= win[:, 1:w] == ar[:, : w - 1]
    ok[:, 0] = True
    return np.cumprod(ok, -1).sum(-1)


def block_outcome(filled: np.ndarray, c: np.ndarray, blen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(complete, mismatch, cont)`` per row after committing ``c`` slots: the block was accepted
    whole; the run stopped at a filled slot that is not the AR argmax (the block ends, the method's
    verification mismatch); or it stopped at the block's first empty slot (drafting goes on)."""
    complete = c >= blen
    at = np.clip(np.minimum(c, blen - 1), 0, None)
    mismatch = ~complete & filled[np.arange(len(c)), at]
    return complete, mismatch, ~complete & ~mismatch


def fill_later(win: np.ndarray, filled: np.ndarray, c: np.ndarray, blen: np.ndarray, top_p: np.ndarray,
               ar: np.ndarray, threshold: float, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drafts for the rest of a continuing block (``rows``): empty slots after ``c`` take the
    argmax before them when its probability exceeds ``threshold`` (slot ``c`` itself, the first
    empty one, becomes the exact token when the window shifts). Returns new ``(win, filled)``."""
    win, filled = win.copy(), filled.copy()
    w = min(ar.shape[1], win.shape[1])
    slot = np.arange(1, w)[None, :]
    later = (slot > c[:, None]) & (slot < blen[:, None]) & ~filled[:, 1:w]
    take = later & (top_p[:, : w - 1] > threshold) & rows[:, None]
    win[:, 1:w] = np.where(take, ar[:, : w - 1], win[:, 1:w])
    filled[:, 1:w] |= take
    return win, filled


def shift_window(win: np.ndarray, filled: np.ndarray, c: np.ndarray, nxt: np.ndarray,
                 mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop the ``c`` committed slots: slot ``c`` moves to slot 0 and becomes ``nxt``, the exact
    token after the committed run; the window's tail is refilled with MASK."""
    width = win.shape[1]
    idx = np.arange(width)[None, :] + c[:, None]
    inside = idx < width
    idx = np.minimum(idx, width - 1)
    win = np.where(inside, np.take_along_axis(win, idx, 1), mask_id)
    filled = inside & np.take_along_axis(filled, idx, 1)
    win[:, 0], filled[:, 0] = nxt, True
    return win, filled


def lane_drafts(top_p: np.ndarray, ar: np.ndarray, c: np.ndarray, rows: np.ndarray, lane_len: int,
                width: int) -> tuple[np.ndarray, np.ndarray]:
    """Drafts for the next block from this forward's lane: for ``rows`` (those that carried a
    lane and accepted their whole block) slot ``s`` of the next block is predicted at column
    ``c - 1 + s``; elsewhere no draft (probability -1). Returns ``(lane_p, lane_tok)`` (n, width)."""
    li = c[:, None] - 1 + np.arange(width)[None, :]
    has = rows[:, None] & (li < (c + lane_len)[:, None])
    li = np.minimum(li, top_p.shape[1] - 1)
    return np.where(has, np.take_along_axis(top_p, li, 1), -1.0), np.take_along_axis(ar, li, 1)


def prefill_drafts(top_p: np.ndarray, tok: np.ndarray, width: int, mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Drafts for the first block from the prefill's lane (column ``s`` predicts slot ``s``)."""
    n, m = top_p.shape[0], min(top_p.shape[1], width)
    lane_p = np.full((n, width), -1.0)
    lane_p[:, :m] = top_p[:, :m]
    lane_tok = np.full((n, width), mask_id, dtype=np.int64)
    lane_tok[:, :m] = tok[:, :m]
    return lane_p, lane_tok
