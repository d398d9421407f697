"""Float attention masks in the form transformers expects: 0 = attend, finfo.min = blocked."""

from __future__ import annotations

import torch


def to_float_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``(B, Q, K)`` -> float ``(B, 1, Q, K)``; never -inf (fully blocked rows give NaN)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    out.masked_fill_(~allowed, torch.finfo(dtype).min)
    return out.unsqueeze(1)
