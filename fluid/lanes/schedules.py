"""Masking schedules (the ``masking`` config group): where lanes go, how long they are and
how many of their slots are restored. A new schedule is a new subclass and a new YAML file
(``conf/masking/<name>.yaml``: ``_target_`` plus the constructor's arguments, nothing else)."""

from __future__ import annotations

import torch


class LaneSchedule:
    """Base: anchors i.i.d. with ``anchor_prob`` on supervised positions; subclasses choose
    lane lengths and the per-lane restoration ratio."""

    def __init__(self, anchor_prob: float, horizon: int, noise_prob: float = 0.0):
        if not 0.0 <= anchor_prob <= 1.0:
            raise ValueError(f"masking.anchor_prob must be in [0, 1], got {anchor_prob}")
        if horizon < 1:
            raise ValueError(f"masking.horizon must be >= 1, got {horizon}")
        if not 0.0 <= noise_prob <= 1.0:
            raise ValueError(f"masking.noise_prob must be in [0, 1], got {noise_prob}")
        self.anchor_prob, self.horizon, self.noise_prob = anchor_prob, horizon, noise_prob

    def anchors(self, supervised: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(supervised.shape, generator=g, device=supervised.device)
        return supervised & (u < self.anchor_prob)

    def lengths(self, n: int, g: torch.Generator, device) -> torch.Tensor:
        raise NotImplementedError

    def restore_ratio(self, n: int, g: torch.Generator, device) -> torch.Tensor:
        raise NotImplementedError


class FluidSchedule(LaneSchedule):
    """The method (docs/method.md section 1): ``k ~ U{1..K}``, ``r ~ U(0, 1)`` per lane."""

    def __init__(self, anchor_prob: float = 0.5, horizon: int = 16, restore: str = "uniform",
                 noise_prob: float = 0.1):
        super().__init__(anchor_prob, horizon, noise_prob)
        if restore not in ("uniform", "none"):
            raise ValueError(f"masking.restore must be 'uniform' or 'none', got {restore!r}")
        self.restore = restore

    def lengths(self, n, g, device):
        return torch.randint(1, self.horizon + 1, (n,), generator=g, device=device)

    def restore_ratio(self, n, g, device):
        if self.restore == "none":
            return torch.zeros(n, device=device)
        return torch.rand(n, generator=g, device=device)


class FixedSchedule(LaneSchedule):
    """Every lane has exactly ``horizon`` slots and the same restoration ratio."""

    def __init__(self, anchor_prob: float = 0.25, horizon: int = 8, restore_ratio: float = 0.3,
                 noise_prob: float = 0.0):
        super().__init__(anchor_prob, horizon, noise_prob)
        if not 0.0 <= restore_ratio <= 1.0:
            raise ValueError(f"masking.restore_ratio must be in [0, 1], got {restore_ratio}")
        self.ratio = restore_ratio

    def lengths(self, n, g, device):
        return torch.full((n,), self.horizon, dtype=torch.long, device=device)

    def restore_ratio(self, n, g, device):
        return torch.full((n,), self.ratio, device=device)


class FullLanes(FixedSchedule):
    """Stage 2 (docs/method.md section 4): every lane has all K slots, no restoration, no noise."""

    def __init__(self, anchor_prob: float = 0.5, horizon: int = 16):
        super().__init__(anchor_prob, horizon, restore_ratio=0.0, noise_prob=0.0)
