"""Greedy autoregressive decoding with a KV cache, batched over left-padded prompts.

This is the AR baseline every FLUID comparison is made against: explicit position ids
and a 4-D float mask, so that padding never leaks and the result equals unbatched greedy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import DynamicCache

from fluid.decoding.masks import left_padded_causal, to_float_mask


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    nfe: int = 0
    wall_time_s: float = 0.0
    stats: dict = field(default_factory=dict)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), n), dtype=torch.bool, device=device)
    for r, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("empty prompt")
        ids[r, n - len(p):] = torch.tensor(list(p), device=device)
        valid[r, n - len(p):] = True
    return ids, valid


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_token_id: int | None,
                    pad_token_id: int) -> GenerationResult:
    """Greedy decoding; returns the new tokens of each row (up to and including EOS)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids, valid = left_pad(prompts, pad_token_id, device)
    b = ids.shape[0]
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    mask = to_float_mask(left_padded_causal(valid, ids.shape[1]), dtype)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True).logits[:, -1]
    next_pos = pos[:, -1] + 1
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    nfe = 0
    for step in range(max_new_tokens):
        tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        for r in torch.nonzero(~done).flatten().tolist():
            out[r].append(int(tok[r]))
        if eos_token_id is not None:
            done |= tok == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        valid = torch.cat([valid, torch.ones((b, 1), dtype=torch.bool, device=device)], dim=1)
        mask = to_float_mask(left_padded_causal(valid, 1), dtype)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_pos = next_pos + 1
        nfe += 1
    return GenerationResult(out, nfe=nfe, wall_time_s=time.perf_counter() - t0)
