"""K-head targets as pure functions (docs/method.md section 4).

per-slot losses of full-length lanes -> ``K* = max{k : mean(l_1..l_k) < tau}`` (at least 1;
a slot past the end of the response counts as loss 0)
-> Gaussian soft labels centred on class ``K*-1`` -> KL(q || softmax(head)).
"""

from __future__ import annotations

import torch

from fluid.lanes.expand import LaneBatch


def lane_slots(lb: LaneBatch):
    """Where the lanes of ``lb`` are: every slot's ``(row, col)``, its lane number (lanes are
    contiguous, numbered in (row, column) order) and slot index ``j`` (0-based), and each lane's
    ``(row, col)`` of slot 1."""
    slot_mask = lb.valid & ~lb.is_main & (lb.slot >= 1)
    rows, cols = torch.nonzero(slot_mask, as_tuple=True)
    first = slot_mask & (lb.slot == 1)
    a_rows, a_cols = torch.nonzero(first, as_tuple=True)
    lane_no = torch.cumsum(first[rows, cols].long(), 0) - 1
    return rows, cols, lane_no, lb.slot[rows, cols] - 1, (a_rows, a_cols)


def lane_slot_losses(ce: torch.Tensor, lb: LaneBatch, horizon: int):
    """Gather per-token losses ``ce (B, L)`` into lanes.

    Returns ``losses (A, K)``, ``valid (A, K)`` (slot exists and has a target), the
    ``(row, expanded index)`` of each lane's anchor main token, for every lane in the batch.
    """
    rows, cols, lane_no, j, (a_rows, a_cols) = lane_slots(lb)
    n = len(a_rows)
    losses = torch.zeros((n, horizon), dtype=ce.dtype, device=ce.device)
    valid = torch.zeros((n, horizon), dtype=torch.bool, device=ce.device)
    losses[lane_no, j] = ce[rows, cols]
    valid[lane_no, j] = lb.targets[rows, cols] >= 0
    return losses, valid, (a_rows, a_cols - 1)  # the anchor's main token directly precedes slot 1


def k_star(losses: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """``max{k : mean(l_1..l_k) < tau}``, at least 1, where a slot without a target (past the end
    of the response) counts as loss 0, as in the reference code: under verification running into
    EOS costs nothing, so a lane near the end is not capped by the tokens left (docs/method.md
    section 4)."""
    k = torch.arange(1, losses.shape[-1] + 1, device=losses.device)
    means = torch.cumsum(torch.where(valid, losses, torch.zeros_like(losses)), -1) / k
    best = torch.where(means < tau, k, torch.zeros_like(k)).max(-1).values
    return best.clamp(min=1)


def soft_labels(kstar: torch.Tensor, horizon: int, sigma: float = 1.5) -> torch.Tensor:
    """``q_c ∝ exp(-(c - (K*-1))^2 / (2 sigma^2))`` over classes ``c = 0..K-1``."""
    c = torch.arange(horizon, device=kstar.device, dtype=torch.float32)
    logits = -((c[None, :] - (kstar[:, None].float() - 1)) ** 2) / (2 * sigma**2)
    return torch.softmax(logits, -1)


def kl_to_soft_labels(head_logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over lanes of KL(q || softmax(head_logits))."""
    logp = torch.log_softmax(head_logits.float(), -1)
    return (q * (torch.log(q.clamp(min=1e-12)) - logp)).sum(-1).mean()
