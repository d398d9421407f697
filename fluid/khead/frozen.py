"""The frozen forward of stage 2: per-slot losses of full-length lanes, two ways.

Both return, for every lane of a :class:`LaneBatch` in (row, anchor) order, the anchor's final
hidden state ``(A, H)``, the per-slot losses ``(A, K)`` and which slots count ``(A, K)``.

* ``expanded``: one forward over the expanded batch with the lane attention rule (dense
  float mask, or flex on CUDA), then :func:`lane_slot_losses` gathers the slots. Memory is
  that of one training-style forward; this is the path for big models on GPUs.
* ``prefix``: the two properties of docs/method.md sections 1-3 used directly. By *invisibility* the
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

from fluid.backbones.compat import kv_cache
from fluid.khead.targets import lane_slot_losses, lane_slots
from fluid.lanes.attention import AttentionBackend, attention_mask_for
from fluid.lanes.expand import LaneBatch
from fluid.nn import IGNORE, decoder_and_lm_head, to_float_mask, token_ce

# prefix forward sizes (measured on CPU with the tiny backbone): each chunk copies its rows' KV cache
# once per sequence, so lanes of a row share a sequence of up to SEQ_TOKENS slots, LANE_CHUNK lanes a forward
LANE_CHUNK = 64
SEQ_TOKENS = 64


def resolve_lane_forward(name: str, device) -> str:
    from fluid.validate import check

    check("stage.module.lane_forward", name)
    if name == "auto":
        return "expanded" if torch.device(device).type == "cuda" else "prefix"
    return name


@torch.no_grad()
def expanded_lane_losses(model, lb: LaneBatch, horizon: int, backend: AttentionBackend = AttentionBackend.DENSE):
    decoder, lm_head = decoder_and_lm_head(model)
    mask = attention_mask_for(lb, backend, next(model.parameters()).dtype)
    hidden = decoder(input_ids=lb.input_ids, attention_mask=mask, position_ids=lb.position_ids,
                     use_cache=False).last_hidden_state
    ce = token_ce(lm_head(hidden), lb.targets)
    losses, valid, (rows, idx) = lane_slot_losses(ce, lb, horizon)
    return hidden[rows, idx], losses, valid


def lanes_of(lb: LaneBatch, horizon: int, pad_input: int):
    """Every lane of ``lb`` as a row of exactly ``horizon`` slots: (row, anchor position,
    inputs, targets, number of slots it has); missing slots get ``pad_input`` and no target."""
    rows, cols, lane_no, j, (a_rows, a_cols) = lane_slots(lb)
    n = len(a_rows)
    dev = lb.input_ids.device
    inputs = torch.full((n, horizon), pad_input, dtype=torch.long, device=dev)
    targets = torch.full((n, horizon), IGNORE, dtype=torch.long, device=dev)
    inputs[lane_no, j] = lb.input_ids[rows, cols]
    targets[lane_no, j] = lb.targets[rows, cols]
    lengths = torch.bincount(lane_no, minlength=n)
    anchor_pos = lb.position_ids[a_rows, a_cols - 1]  # the anchor's main token directly precedes slot 1
    return a_rows, anchor_pos, inputs, targets, lengths


def pack_lanes(rows: torch.Tensor, lengths: torch.Tensor, seq_tokens: int) -> list[list[int]]:
    """Greedy packing of each row's lanes (in anchor order) into sequences of at most
    ``seq_tokens`` slots (a longer lane gets a sequence of its own). Returns lane indices per sequence."""
    seqs: list[list[int]] = []
    cur_row, used = -1, seq_tokens + 1
    for a, (r, n) in enumerate(zip(rows.tolist(), lengths.tolist())):
        if r != cur_row or used + n > seq_tokens:
            seqs.append([])
            cur_row, used = r, 0
        seqs[-1].append(a)
        used += n
    return seqs


@torch.no_grad()
def prefix_lane_losses(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, lb: LaneBatch, horizon: int,
                       mask_token_id: int, lane_chunk: int = LANE_CHUNK, seq_tokens: int = SEQ_TOKENS):
    """Per-slot losses of ``lb``'s lanes from a causal forward of the unexpanded right-padded
    batch, then short forwards over copies of the rows' caches (see the module docstring).

    Lanes of one row are packed (anchor order, ``seq_tokens`` slots at most) into sequences
    that share one copy of the row's cache (block-diagonal mask between lanes); sequences are
    sorted by their last anchor and sent about ``lane_chunk`` lanes at a time, each chunk cut
    to the keys up to its last anchor and to its longest sequence.
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
                  **kv_cache(cache), use_cache=True)
    main_hidden = out.last_hidden_state
    rows, anchor_pos, inputs, targets, lengths = lanes_of(lb, horizon, mask_token_id)
    a = len(rows)
    losses = torch.zeros((a, horizon), device=dev)
    if a == 0:
        return main_hidden[rows, anchor_pos], losses, targets != IGNORE
    seqs = pack_lanes(rows, lengths, max(seq_tokens, horizon))
    # flat description of every slot: (sequence, column, lane, slot j)
    seq_of = torch.tensor([i for i, q in enumerate(seqs) for _ in q], dtype=torch.long, device=dev)
    lane_ids = torch.tensor([x for q in seqs for x in q], dtype=torch.long, device=dev)
    seq_len = torch.zeros(len(seqs), dtype=torch.long, device=dev).index_add_(0, seq_of, lengths[lane_ids])
    seq_last = torch.zeros(len(seqs), dtype=torch.long, device=dev).scatter_reduce(0, seq_of, anchor_pos[lane_ids],
                                                                                    "amax", include_self=False)
    offset = torch.cumsum(lengths[lane_ids], 0) - lengths[lane_ids]
    offset = offset - offset[torch.searchsorted(seq_of, seq_of)]            # column of each lane in its sequence
    seq_lanes = torch.bincount(seq_of, minlength=len(seqs))
    seq_row = rows[torch.tensor([q[0] for q in seqs], dtype=torch.long, device=dev)]
    order = torch.argsort(seq_last)
    start = 0
    while start < len(seqs):  # chunks of about lane_chunk lanes
        stop, count = start, 0
        while stop < len(seqs) and (count == 0 or count + int(seq_lanes[order[stop]]) <= lane_chunk):
            count += int(seq_lanes[order[stop]])
            stop += 1
        chunk = order[start:stop]
        start = stop
        c = len(chunk)
        width, nc = int(seq_len[chunk].max()), int(seq_last[chunk].max()) + 1
        local = torch.full((len(seqs),), -1, dtype=torch.long, device=dev)
        local[chunk] = torch.arange(c, device=dev)
        pick = local[seq_of] >= 0                               # lanes of this chunk
        ln, sq, off = lane_ids[pick], local[seq_of[pick]], offset[pick]
        lens = lengths[ln]
        # one entry per slot of these lanes
        tok_lane = torch.repeat_interleave(torch.arange(len(ln), device=dev), lens)
        j = torch.arange(int(lens.sum()), device=dev) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        r_seq, col = sq[tok_lane], off[tok_lane] + j
        ids = torch.full((c, width), mask_token_id, dtype=torch.long, device=dev)
        pos = torch.zeros((c, width), dtype=torch.long, device=dev)
        tgt = torch.full((c, width), IGNORE, dtype=torch.long, device=dev)
        q_lane = torch.full((c, width), -1, dtype=torch.long, device=dev)   # -1: padding
        q_slot = torch.zeros((c, width), dtype=torch.long, device=dev)
        q_anchor = torch.full((c, width), -1, dtype=torch.long, device=dev)
        ids[r_seq, col] = inputs[ln[tok_lane], j]
        pos[r_seq, col] = anchor_pos[ln[tok_lane]] + 1 + j
        tgt[r_seq, col] = targets[ln[tok_lane], j]
        q_lane[r_seq, col] = tok_lane
        q_slot[r_seq, col] = j
        q_anchor[r_seq, col] = anchor_pos[ln[tok_lane]]
        g_row = seq_row[chunk]
        main_allowed = (idx[None, None, :nc] <= q_anchor[:, :, None]) & key_ok[g_row, None, :nc]
        same = (q_lane[:, :, None] == q_lane[:, None, :]) & (q_slot[:, None, :] <= q_slot[:, :, None])
        same |= torch.eye(width, dtype=torch.bool, device=dev)[None]  # padding queries see themselves
        allowed = torch.cat([main_allowed, same], dim=-1)
        sub = DynamicCache()
        for layer_idx, layer in enumerate(cache.layers):
            sub.update(layer.keys[g_row, :, :nc], layer.values[g_row, :, :nc], layer_idx)
        h = decoder(input_ids=ids, attention_mask=to_float_mask(allowed, dtype), position_ids=pos,
                    **kv_cache(sub), use_cache=True).last_hidden_state
        keep = tgt != IGNORE                                    # the LM head only where a slot has a target
        ce = torch.zeros((c, width), device=dev)
        ce[keep] = torch.nn.functional.cross_entropy(lm_head(h[keep]).float(), tgt[keep], reduction="none")
        losses[ln[tok_lane], j] = ce[r_seq, col]
    return main_hidden[rows, anchor_pos], losses, targets != IGNORE
