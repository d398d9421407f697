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


def _first(mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of ``mask``'s True entries in order, padded to ``width``, and which are real."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    return order, torch.gather(mask, 1, order)


def split_main_slots(batch: LaneBatch) -> dict[str, torch.Tensor]:
    """The expanded batch as two forwards that together give the same slot outputs: the main tokens
    alone (plain causal, the original sequence), then every lane slot after their cache.

    Returns ``main_idx``/``main_ok`` (B, M) and ``slot_idx``/``slot_ok`` (B, S): expanded indices of the
    main tokens and slots in order, padded; ``main_allowed`` (B, M, M) and ``slot_allowed`` (B, S, M+S):
    the rule of :func:`dense_allowed` restricted to those queries and keys (padding queries see
    themselves, so no row is fully blocked). A main token's output never depends on a slot, so the
    first forward needs nothing of the second."""
    is_slot = batch.valid & ~batch.is_main
    m, s = int(batch.is_main.sum(1).max()), max(1, int(is_slot.sum(1).max()))
    main_idx, main_ok = _first(batch.is_main, m)
    slot_idx, slot_ok = _first(is_slot, s)
    allowed = dense_allowed(batch)
    cols = torch.cat([main_idx, slot_idx], 1)
    col_ok = torch.cat([main_ok, slot_ok], 1)
    rows = torch.arange(batch.input_ids.shape[0], device=cols.device)[:, None, None]
    main_allowed = allowed[rows, main_idx[:, :, None], main_idx[:, None, :]] & main_ok[:, None, :] & main_ok[:, :, None]
    slot_allowed = allowed[rows, slot_idx[:, :, None], cols[:, None, :]] & col_ok[:, None, :] & slot_ok[:, :, None]
    eye_m = torch.eye(m, dtype=torch.bool, device=cols.device)[None]
    eye_s = torch.eye(s, dtype=torch.bool, device=cols.device)[None]
    main_allowed |= eye_m & ~main_ok[:, :, None]
    slot_allowed[:, :, m:] |= eye_s & ~slot_ok[:, :, None]
    return {"main_idx": main_idx, "main_ok": main_ok, "slot_idx": slot_idx, "slot_ok": slot_ok,
            "main_allowed": main_allowed, "slot_allowed": slot_allowed}
