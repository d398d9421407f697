"""Greedy autoregressive decoding with a KV cache, batched over left-padded prompts.

The plain AR loop on the shared decoding state (:class:`fluid.decoding.engine.DecodeBatch`):
explicit position ids and a 4-D float mask, so padding never leaks and a batched result
equals the unbatched one. ``FluidDecoder(..., algorithm="ar")`` is the same loop with
per-row statistics; this function is the light-weight form used for evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fluid.decoding.engine import DecodeBatch


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    nfe: int = 0
    wall_time_s: float = 0.0
    stats: dict = field(default_factory=dict)


@torch.inference_mode()
def greedy_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_token_id: int | None,
                    pad_token_id: int) -> GenerationResult:
    """Greedy decoding; returns the new tokens of each row (up to and including EOS)."""
    t0 = time.perf_counter()
    batch = DecodeBatch(model, prompts, pad_token_id)
    out: list[list[int]] = [[] for _ in prompts]
    nfe = 0
    while batch.size:
        tok = batch.pending.argmax(-1)
        alive = torch.ones(batch.size, dtype=torch.bool, device=batch.device)
        for i, r in enumerate(batch.rows.tolist()):
            out[r].append(int(tok[i]))
            if int(tok[i]) == eos_token_id or len(out[r]) >= max_new_tokens:
                alive[i] = False
        batch.keep(alive)
        if not batch.size:
            break
        logits, _ = batch.forward(tok[alive][:, None], batch.next_pos[:, None])
        batch.pending, batch.next_pos = logits[:, -1], batch.next_pos + 1
        nfe += 1
    return GenerationResult(out, nfe=nfe, wall_time_s=time.perf_counter() - t0)
