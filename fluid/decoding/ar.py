"""Greedy autoregressive decoding with a KV cache, batched over left-padded prompts: the one AR
loop, used for evaluation (:func:`greedy_generate`) and as every benchmark's baseline
(``decode.algorithm=ar``).

Explicit position ids and a 4-D float mask, so padding never leaks and a batched result equals
the unbatched one. NFE rule (:class:`fluid.decoding.state.RowStats`): the forward that writes a
token's KV commits it, so AR takes one forward per generated token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from fluid.decoding.config import DecodeConfig
from fluid.decoding.state import Context, DecodeBatch, RowStats, StopRule

ONE_PROMPT_AT_A_TIME = False


def prefill_lane(cfg: DecodeConfig, n_rows: int, mask_id: int | None = None) -> int:
    return 0


def ar_step(batch: DecodeBatch, stats: list[RowStats], rule: StopRule) -> None:
    """One forward: every row commits its argmax token; finished rows leave the batch."""
    tok = batch.pending.argmax(-1)
    logits, hidden = batch.forward(tok[:, None], batch.next_pos[:, None])
    batch.pending, batch.h_anchor = logits[:, -1], hidden[:, -1]
    batch.next_pos = batch.next_pos + 1
    alive = torch.ones(batch.size, dtype=torch.bool, device=batch.device)
    for i, (r, t) in enumerate(zip(batch.rows.tolist(), tok.tolist())):
        stats[r].nfe += 1
        alive[i] = rule.commit(stats[r], [t], block_done=True, block_acc=1)
    batch.keep(alive)
    batch.compact()


def start(batch: DecodeBatch, cfg: DecodeConfig | None, ctx: Context) -> None:
    """AR keeps no state beyond the batch's own (the pending logits and positions)."""
    return None


def step(batch: DecodeBatch, state, stats, cfg: DecodeConfig | None, ctx: Context) -> None:
    ar_step(batch, stats, ctx.rule)


def extend(state, new, ctx: Context) -> None:
    return None


def keep(state, m) -> None:
    return None


def decode(batch: DecodeBatch, stats: list[RowStats], cfg: DecodeConfig | None, ctx: Context) -> None:
    while batch.size:
        ar_step(batch, stats, ctx.rule)


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    nfe: int = 0                 # forwards of the batch (each serves every active row)
    wall_time_s: float = 0.0


@torch.inference_mode()
def greedy_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_token_id: int | None,
                    pad_token_id: int) -> GenerationResult:
    """Greedy decoding; returns the new tokens of each row (up to and including EOS)."""
    t0 = time.perf_counter()
    stats = [RowStats() for _ in prompts]
    decode(DecodeBatch(model, prompts, pad_token_id), stats, None,
           Context(horizon=None, rule=StopRule(max_new_tokens, eos_token_id), mask_id=None))
    return GenerationResult([s.tokens for s in stats], nfe=max(s.nfe for s in stats),
                            wall_time_s=time.perf_counter() - t0)
