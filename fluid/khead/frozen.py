"""The frozen forward of stage 2: per-slot losses of full-length lanes, two ways.

Both return, for every lane of a :class:`LaneBatch` in (row, anchor) order, the anchor's final
hidden state ``(A, H)``, the per-slot losses ``(A, K)`` and which slots count ``(A, K)``.

* ``expanded``: one forward over the expanded batch with the lane attention rule (dense
  float mask, or flex on CUDA), then :func:`lane_slot_losses` gathers the slots. Memory is
  that of one training-style forward; this is the path for big models on GPUs.
* ``prefix``: the two properties of DESIGN section 1 used directly. By *invisibility* the
  main tokens' states are those of a plain causal forward of ``x``; by *lane equivalence* a
  lane's logits are those of ``x[0..i]`` followed by the lane. So: one causal forward over the
  unexpanded batch fills a KV cache, then every lane runs as its own short sequence over
  its row's cache (keys after the anchor masked). Attention costs ``K * (N + K)`` per lane
  instead of rows of ``L ~ 9N`` keys, and no ``L x L`` mask is built; the cache is copied
  per lane, so lanes go in chunks (``lane_chunk``). The default on CPU.

Under no-grad only: stage 2 never backpropagates into the backbone.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from fluid.data.sft import IGNORE
from fluid.decoding.engine import decoder_and_lm_head
from fluid.decoding.masks import to_float_mask
from fluid.khead.targets import lane_slot_losses
from fluid.lanes.attention import AttentionBackend, attention_mask_for
from fluid.lanes.expand import LaneBatch

LANE_FORWARDS = ("auto", "prefix", "expanded")


def resolve_lane_forward(name: str, device) -> str:
    if name not in LANE_FORWARDS:
        raise ValueError(f"stage.module.lane_forward: unknown {name!r} (choose from {', '.join(LANE_FORWARDS)})")
    if name == "auto":
        return "expanded" if torch.device(device).type == "cuda" else "prefix"
    return name


def _slot_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    return torch.where(targets == IGNORE, torch.zeros_like(ce), ce)


@torch.no_grad()
def expanded_lane_losses(model, lb: LaneBatch, horizon: int, backend: AttentionBackend = AttentionBackend.DENSE):
    decoder, lm_head = decoder_and_lm_head(model)
    mask = attention_mask_for(lb, backend, next(model.parameters()).dtype)
    hidden = decoder(input_ids=lb.input_ids, attention_mask=mask, position_ids=lb.position_ids,
                     use_cache=False).last_hidden_state
    ce = _slot_ce(lm_head(hidden), lb.targets)
    losses, valid, (rows, idx) = lane_slot_losses(ce, lb, horizon)
    return hidden[rows, idx], losses, valid


def lanes_of(lb: LaneBatch, horizon: int, pad_input: int):
    """Every lane of ``lb`` as a row of exactly ``horizon`` slots: (row, anchor position,
    inputs, targets, number of slots it has); missing slots get ``pad_input`` and no target."""
    slot_mask = lb.valid & ~lb.is_main & (lb.slot >= 1)
    rows, cols = torch.nonzero(slot_mask, as_tuple=True)
    first = slot_mask & (lb.slot == 1)
    a_rows, a_cols = torch.nonzero(first, as_tuple=True)
    lane_no = torch.cumsum(first[rows, cols].long(), 0) - 1
    n = len(a_rows)
    dev = lb.input_ids.device
    inputs = torch.full((n, horizon), pad_input, dtype=torch.long, device=dev)
    targets = torch.full((n, horizon), IGNORE, dtype=torch.long, device=dev)
    j = lb.slot[rows, cols] - 1
    inputs[lane_no, j] = lb.input_ids[rows, cols]
    targets[lane_no, j] = lb.targets[rows, cols]
    lengths = torch.bincount(lane_no, minlength=n)
    anchor_pos = lb.position_ids[a_rows, a_cols - 1]  # the anchor's main token directly precedes slot 1
    return a_rows, anchor_pos, inputs, targets, lengths


@torch.no_grad()
def prefix_lane_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, lb: LaneBatch, horizon: int,
                       mask_token_id: int, lane_chunk: int = 64, group: int = 4):
    """Per-slot losses of ``lb``'s lanes from a causal forward of the unexpanded right-padded
    batch, then short forwards over copies of the rows' caches (see the module docstring).

    ``group`` lanes of one row (neighbouring anchors) share one copy of the row's cache as one
    sequence (block-diagonal mask); groups are sorted by anchor and sent ``lane_chunk`` lanes
    at a time, each chunk cut to the keys up to its last anchor and to its longest lane.
    """
    decoder, lm_head = decoder_and_lm_head(model)
    dtype = next(model.parameters()).dtype
    dev = input_ids.device
    b, n = input_ids.shape
    key_ok = attention_mask.bool()
    idx = torch.arange(n, device=dev)
    allowed = (idx[None, :] <= idx[:, None])[None] & key_ok[:, None, :]
    allowed |= torch.eye(n, dtype=torch.bool, device=dev)[None]  # padding queries: never a fully blocked row
    cache = DynamicCache()
    out = decoder(input_ids=input_ids, attention_mask=to_float_mask(allowed, dtype), position_ids=idx.expand(b, n),
                  past_key_values=cache, use_cache=True)
    main_hidden = out.last_hidden_state
    rows, anchor_pos, inputs, targets, lengths = lanes_of(lb, horizon, mask_token_id)
    a = len(rows)
    losses = torch.zeros((a, horizon), device=dev)
    if a == 0:
        return main_hidden[rows, anchor_pos], losses, targets != IGNORE
    # groups: `group` consecutive lanes of a row (lanes come in (row, anchor) order)
    lane_idx = torch.arange(a, device=dev)
    row_start = torch.searchsorted(rows, rows)                 # index of the row's first lane
    rank = lane_idx - row_start
    new_group = (rank % group == 0)
    gid = torch.cumsum(new_group.long(), 0) - 1
    member = rank % group
    n_groups = int(gid[-1]) + 1
    lane_of = torch.full((n_groups, group), -1, dtype=torch.long, device=dev)
    lane_of[gid, member] = lane_idx
    g_row = rows[lane_of[:, 0]]
    g_last = torch.zeros(n_groups, dtype=torch.long, device=dev).scatter_reduce(0, gid, anchor_pos, "amax")
    order = torch.argsort(g_last)
    per_chunk = max(1, lane_chunk // group)
    for s in range(0, n_groups, per_chunk):
        gs = order[s: s + per_chunk]
        c = len(gs)
        lanes = lane_of[gs]                                    # (c, G), -1 where a group is short
        has = lanes >= 0
        li = lanes.clamp(min=0)
        kc = int(lengths[li][has].max())
        nc = int(g_last[gs].max()) + 1
        anc = anchor_pos[li]                                   # (c, G)
        slot = torch.arange(kc, device=dev)
        q_lane = torch.arange(group, device=dev).repeat_interleave(kc)   # (G*kc,) lane of each query
        q_slot = slot.repeat(group)
        ids = torch.where(has[:, :, None], inputs[li][:, :, :kc], mask_token_id).reshape(c, group * kc)
        pos = torch.where(has[:, :, None], anc[:, :, None] + 1 + slot, 0).reshape(c, group * kc)
        q_anchor = torch.where(has, anc, -1)[:, q_lane]         # (c, G*kc); -1: no such lane, sees no main key
        main_allowed = (idx[None, None, :nc] <= q_anchor[:, :, None]) & key_ok[g_row[gs], None, :nc]
        lane_allowed = (q_lane[:, None] == q_lane[None, :]) & (q_slot[None, :] <= q_slot[:, None])
        allowed = torch.cat([main_allowed, lane_allowed[None].expand(c, -1, -1)], dim=-1)
        sub = DynamicCache()
        for layer_idx, layer in enumerate(cache.layers):
            sub.update(layer.keys[g_row[gs], :, :nc], layer.values[g_row[gs], :, :nc], layer_idx)
        h = decoder(input_ids=ids, attention_mask=to_float_mask(allowed, dtype), position_ids=pos,
                    past_key_values=sub, use_cache=True).last_hidden_state
        tg = torch.where(has[:, :, None], targets[li][:, :, :kc], IGNORE).reshape(c, group * kc)
        keep = tg != IGNORE                                    # the LM head only where a slot has a target
        ce = torch.zeros((c, group * kc), device=dev)
        ce[keep] = torch.nn.functional.cross_entropy(lm_head(h[keep]).float(), tg[keep], reduction="none")
        ce = ce.reshape(c, group, kc)
        losses[lanes[has], :kc] = ce[has]
    return main_hidden[rows, anchor_pos], losses, targets != IGNORE
