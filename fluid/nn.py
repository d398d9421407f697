"""Tensor helpers that training and decoding both reach: the ignore index, the float attention
mask, the transformer-body / LM-head split and the masked cross-entropy (float32 maths)."""

from __future__ import annotations

import torch

IGNORE = -100  # a label with no target (prompt tokens, padding, slots past the end)


def to_float_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``(B, Q, K)`` -> float ``(B, 1, Q, K)`` as transformers expects it: 0 attends,
    ``finfo(dtype).min`` is blocked; never -inf (a fully blocked row would give NaN)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    out.masked_fill_(~allowed, torch.finfo(dtype).min)
    return out.unsqueeze(1)


def decoder_and_lm_head(model):
    """``(transformer body, LM head)`` of a Hugging Face causal LM: the body gives hidden states
    (the K-head's input), the head turns only the positions that need it into logits."""
    return getattr(model, model.base_model_prefix), model.get_output_embeddings()


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``(...,)`` of ``logits (..., V)`` in float32; 0 where the target is IGNORE."""
    ce = torch.nn.functional.cross_entropy(logits.float().movedim(-1, 1), targets.clamp(min=0), reduction="none")
    return torch.where(targets == IGNORE, torch.zeros_like(ce), ce)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies over non-ignored labels, and their count (float32 maths)."""
    flat = labels.reshape(-1)
    keep = flat != IGNORE
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1])[keep].float(), flat[keep],
                                             reduction="sum")
    return loss, keep.sum()
