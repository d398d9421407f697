"""Batch expansion with lanes (docs/method.md sections 1-3), as a pure function.

Row layout: main token 0, [lane of 0], main token 1, [lane of 1], ...  Slot ``j`` (1..k) of
the lane after anchor ``i`` has position id ``i + j`` and target ``x[i+j+1]`` (the label of
position ``i + j``); its input is MASK, or the true token ``x[i+j]`` when restored, or a
random non-special token when a restored slot is noised. Main tokens keep position ``i``
and target ``x[i+1]``. Lanes stop at the last supervised position, so no target ever points
past the end of the sequence. All randomness comes from the given ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from fluid.lanes.schedules import LaneSchedule
from fluid.nn import IGNORE

MAIN, PAD = -1, -2  # lane ids of main tokens and padding; slots carry their anchor's position


@dataclass
class LaneBatch:
    input_ids: torch.Tensor     # (B, L)
    position_ids: torch.Tensor  # (B, L)
    targets: torch.Tensor       # (B, L), IGNORE where there is none
    is_main: torch.Tensor       # (B, L) bool
    lane: torch.Tensor          # (B, L) MAIN, PAD or the anchor position of the slot's lane
    slot: torch.Tensor          # (B, L) 0 for main tokens, j = 1..k in a lane, -1 for padding
    valid: torch.Tensor         # (B, L) bool, False on padding
    restored: torch.Tensor      # (B, L) bool: slot input is the true token (possibly noised)
    noised: torch.Tensor        # (B, L) bool: slot input is a random token
    main_index: torch.Tensor    # (B, N) expanded index of original token i (-1 beyond the row)

    def to(self, device) -> "LaneBatch":
        return LaneBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def _fit_budget(lengths: torch.Tensor, room: int, g: torch.Generator) -> torch.Tensor:
    """Drop (in random order) and finally shorten lanes so that their slots fit in ``room``."""
    if int(lengths.sum()) <= room:
        return lengths
    order = torch.randperm(len(lengths), generator=g, device=lengths.device)
    kept = torch.zeros_like(lengths)
    csum = torch.cumsum(lengths[order], 0)
    fits = csum <= room
    kept[order[fits]] = lengths[order[fits]]
    n_fit = int(fits.sum())
    if n_fit < len(order):  # the first lane that does not fit gets what is left
        kept[order[n_fit]] = room - (int(csum[n_fit - 1]) if n_fit else 0)
    return kept


def expand_row(x: torch.Tensor, labels: torch.Tensor, schedule: LaneSchedule, g: torch.Generator, mask_id: int,
               noise_ids: torch.Tensor, max_len: int | None) -> dict[str, torch.Tensor]:
    n, dev = x.shape[0], x.device
    if max_len is not None and n > max_len:
        raise ValueError(f"a row has {n} tokens, more than lanes.max_expanded_len={max_len}; "
                         "raise it or lower data.max_length (main tokens are never truncated)")
    supervised = labels != IGNORE
    sup_pos = torch.nonzero(supervised).flatten()
    last_sup = int(sup_pos[-1]) if len(sup_pos) else -1
    anchors = torch.nonzero(schedule.anchors(supervised, g)).flatten()
    k = schedule.lengths(len(anchors), g, dev).clamp(max=last_sup - anchors)  # no slot past the last target
    ratio = schedule.restore_ratio(len(anchors), g, dev)
    if max_len is not None:
        k = _fit_budget(k, max_len - n, g)
    counts = torch.ones(n, dtype=torch.long, device=dev)
    counts[anchors] += k
    ratio_at = torch.zeros(n, device=dev)
    ratio_at[anchors] = ratio.to(ratio_at.dtype)
    starts = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    src = torch.repeat_interleave(torch.arange(n, device=dev), counts)  # anchor (or own) position
    j = torch.arange(total, device=dev) - starts[src]
    pos = src + j
    is_main = j == 0
    targets = labels[pos]
    inputs = torch.where(is_main, x[src], torch.full_like(src, mask_id))
    restored = ~is_main & (torch.rand(total, generator=g, device=dev) < ratio_at[src])
    inputs = torch.where(restored, x[pos], inputs)
    noised = restored & (torch.rand(total, generator=g, device=dev) < schedule.noise_prob)
    if schedule.noise_prob > 0:
        pick = torch.randint(len(noise_ids), (total,), generator=g, device=dev)
        inputs = torch.where(noised, noise_ids.to(dev)[pick], inputs)
    return {"input_ids": inputs, "position_ids": pos, "targets": targets, "is_main": is_main,
            "lane": torch.where(is_main, torch.full_like(src, MAIN), src), "slot": j, "restored": restored,
            "noised": noised, "main_index": starts}


def expand_lanes(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                 schedule: LaneSchedule, *, mask_token_id: int, noise_token_ids: torch.Tensor, pad_token_id: int,
                 generator: torch.Generator, max_expanded_len: int | None = None,
                 pad_to_multiple: int = 1) -> LaneBatch:
    """Expand a right-padded batch ``(input_ids, labels)`` into a :class:`LaneBatch`."""
    rows = []
    lengths = attention_mask.sum(-1).tolist()
    for r, n in enumerate(lengths):
        rows.append(expand_row(input_ids[r, :n], labels[r, :n], schedule, generator, mask_token_id,
                               noise_token_ids, max_expanded_len))
    b = len(rows)
    width = max(len(row["input_ids"]) for row in rows)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    dev = input_ids.device
    fill = {"input_ids": pad_token_id, "position_ids": 0, "targets": IGNORE, "is_main": False, "lane": PAD,
            "slot": -1, "restored": False, "noised": False}
    out = {}
    for key, value in fill.items():
        dtype = torch.bool if isinstance(value, bool) else torch.long
        t = torch.full((b, width), value, dtype=dtype, device=dev)
        for r, row in enumerate(rows):
            t[r, : len(row[key])] = row[key]
        out[key] = t
    valid = torch.zeros((b, width), dtype=torch.bool, device=dev)
    main_index = torch.full((b, input_ids.shape[1]), -1, dtype=torch.long, device=dev)
    for r, row in enumerate(rows):
        valid[r, : len(row["input_ids"])] = True
        main_index[r, : len(row["main_index"])] = row["main_index"]
    return LaneBatch(valid=valid, main_index=main_index, **out)
