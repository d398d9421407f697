"""The strictly causal attention rule, in one place, with two back-ends.

Query ``q`` may attend key ``k`` iff ``k <= q`` and ``k`` is a real token and (``k`` is a
main token or ``k`` and ``q`` are slots of the same lane). Main tokens therefore never see
any slot; a slot sees the clean prefix up to its anchor and the earlier slots of its lane.

* ``dense``: a 4-D float mask ``(B, 1, L, L)`` for SDPA/eager (CPU, and the test oracle);
* ``flex``: a flex-attention ``BlockMask`` built from ``mask_mod`` without materialising
  ``L x L`` (CUDA training). ``auto`` picks flex on CUDA, dense elsewhere.
"""

from __future__ import annotations

from enum import Enum

import torch

from fluid.lanes.expand import LaneBatch
from fluid.nn import to_float_mask


class AttentionBackend(str, Enum):
    AUTO = "auto"
    DENSE = "dense"
    FLEX = "flex"

    def resolve(self, device: torch.device | str) -> "AttentionBackend":
        if self is AttentionBackend.AUTO:
            return AttentionBackend.FLEX if torch.device(device).type == "cuda" else AttentionBackend.DENSE
        return self


def dense_allowed(batch: LaneBatch) -> torch.Tensor:
    """Boolean ``(B, L, L)``: the rule, materialised (the oracle)."""
    n = batch.length
    idx = torch.arange(n, device=batch.input_ids.device)
    causal = idx[None, :] <= idx[:, None]
    same_lane = batch.lane[:, :, None] == batch.lane[:, None, :]
    allowed = causal[None] & batch.valid[:, None, :] & (batch.is_main[:, None, :] | same_lane)
    return allowed


def dense_float_mask(batch: LaneBatch, dtype: torch.dtype) -> torch.Tensor:
    return to_float_mask(dense_allowed(batch), dtype)


def lane_mask_mod(batch: LaneBatch):
    is_main, lane, valid = batch.is_main, batch.lane, batch.valid

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & valid[b, kv_idx] & (is_main[b, kv_idx] | (lane[b, kv_idx] == lane[b, q_idx]))

    return mask_mod


# flex attention's tile size (its default): the BlockMask records which 128 x 128 tiles hold any allowed pair
FLEX_BLOCK_SIZE = 128


def block_mask(batch: LaneBatch, block_size: int = FLEX_BLOCK_SIZE):
    """Flex-attention ``BlockMask`` of the rule (compiled block construction on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, n = batch.input_ids.shape
    dev = batch.input_ids.device
    return create_block_mask(lane_mask_mod(batch), B=b, H=None, Q_LEN=n, KV_LEN=n, device=dev,
                             BLOCK_SIZE=block_size, _compile=dev.type == "cuda")


def attention_mask_for(batch: LaneBatch, backend: AttentionBackend, dtype: torch.dtype):
    backend = backend.resolve(batch.input_ids.device)
    if backend is AttentionBackend.FLEX:
        return block_mask(batch)
    return dense_float_mask(batch, dtype)
