"""Float attention masks in the form transformers expects: 0 = attend, finfo.min = blocked."""

from __future__ import annotations

import torch


def to_float_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``(B, Q, K)`` -> float ``(B, 1, Q, K)``; never -inf (fully blocked rows give NaN)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    out.masked_fill_(~allowed, torch.finfo(dtype).min)
    return out.unsqueeze(1)


def left_padded_causal(key_valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean ``(B, q_len, K)``: the last ``q_len`` keys are the queries; causal + key validity.

    A query on a padding slot is allowed to see itself so that no row is fully blocked.
    """
    b, k = key_valid.shape
    q_idx = torch.arange(k - q_len, k, device=key_valid.device)
    k_idx = torch.arange(k, device=key_valid.device)
    causal = k_idx[None, :] <= q_idx[:, None]
    allowed = causal[None] & key_valid[:, None, :]
    allowed |= (k_idx[None, :] == q_idx[:, None])[None]
    return allowed
