"""The published decoding loop, re-implemented as a baseline (one prompt at a time).

Per block: a horizon; draft forwards until every slot is filled (the first empty slot takes
its argmax, later ones when confident); one verify forward over the block; after a mismatch the
accepted prefix plus the AR correction are run once more to rebuild their KV entries (the
published code re-commits instead of reusing the verify forward's cache).
"""

from __future__ import annotations

import torch

from fluid.decoding.config import DecodeConfig
from fluid.decoding.state import Context, DecodeBatch, RowStats, top_token

ONE_PROMPT_AT_A_TIME = True


def prefill_lane(cfg: DecodeConfig, n_rows: int, mask_id: int | None = None) -> int:
    return 0


def fill_drafts(block: torch.Tensor, need: torch.Tensor, logits: torch.Tensor, confidence: float) -> None:
    """Fill empty slots in place. Slot ``s`` (>= 1) is predicted by ``logits[:, s - 1]``.

    The first empty slot of each row takes its argmax; later empty slots only when their
    top probability exceeds ``confidence``.
    """
    w = block.shape[1]
    top_p, top = top_token(logits[:, : w - 1].float())  # (B, W-1) for slots 1..W-1
    slots_need = need[:, 1:]
    first = slots_need & (torch.cumsum(slots_need.long(), -1) == 1)
    take = slots_need & (first | (top_p > confidence))
    block[:, 1:] = torch.where(take, top, block[:, 1:])
    need[:, 1:] &= ~take


def draft(batch: DecodeBatch, stats: list[RowStats], cfg: DecodeConfig, k: torch.Tensor, mask_id: int) -> torch.Tensor:
    """A filled block (B, W) by draft forwards until full; slots >= k of a row stay MASK."""
    w = int(k.max())
    block = torch.full((batch.size, w), mask_id, dtype=torch.long, device=batch.device)
    block[:, 0] = batch.pending.argmax(-1)
    need = torch.arange(w, device=batch.device)[None, :] < k[:, None]
    need[:, 0] = False
    pos = batch.next_pos[:, None] + torch.arange(w, device=batch.device)[None, :]
    while bool(need.any()):
        active = need.any(-1)
        logits, _ = batch.forward(block, pos)
        batch.crop(w)
        for r in batch.rows[active].tolist():
            stats[r].nfe += 1
            stats[r].draft_forwards += 1
        sub_need = need.clone()
        fill_drafts(block, sub_need, logits, cfg.fill_threshold)
        need = torch.where(active[:, None], sub_need, need)
    return block


def published_step(batch: DecodeBatch, stats: list[RowStats], cfg: DecodeConfig, ctx: Context) -> None:
    """One block of one row: draft until full, verify, re-commit after a mismatch."""
    k = torch.from_numpy(ctx.horizon(batch)).to(batch.device)
    block = draft(batch, stats, cfg, k, ctx.mask_id)
    w = block.shape[1]
    pos = batch.next_pos[:, None] + torch.arange(w, device=batch.device)[None, :]
    logits, hidden = batch.forward(block, pos)
    row = stats[batch.rows[0].item()]
    row.nfe += 1
    m = w
    if cfg.verify:
        ar = logits[:, : w - 1].argmax(-1)
        ok = torch.cat([torch.ones_like(block[:, :1], dtype=torch.bool), block[:, 1:] == ar], dim=1)
        m = int(torch.cumprod(ok[0].long(), -1).sum())
    if m == w:
        committed = block
        batch.pending, batch.h_anchor = logits[:, -1], hidden[:, -1]
        batch.next_pos = batch.next_pos + w
    else:  # mismatch: accepted prefix + the AR correction, recomputed from scratch
        committed = torch.cat([block[:, :m], ar[:, m - 1: m]], dim=1)
        batch.crop(w)
        pos = batch.next_pos[:, None] + torch.arange(m + 1, device=batch.device)[None, :]
        logits, hidden = batch.forward(committed, pos)
        row.nfe += 1
        batch.pending, batch.h_anchor = logits[:, -1], hidden[:, -1]
        batch.next_pos = batch.next_pos + m + 1
    toks = committed[0].tolist()
    alive = ctx.rule.commit(row, toks, block_done=True, block_acc=len(toks), horizon=int(k[0]))
    batch.keep(torch.tensor([alive], device=batch.device))
    batch.compact()


def decode(batch: DecodeBatch, stats: list[RowStats], cfg: DecodeConfig, ctx: Context) -> None:
    if batch.size != 1:
        raise ValueError("the published loop decodes one prompt at a time")
    while batch.size:
        published_step(batch, stats, cfg, ctx)
