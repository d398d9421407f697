"""AdamW + linear warm-up + cosine decay, from config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.1
    scheduler: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float, cosine: bool = True) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params, cfg: OptimConfig, total_steps: int):
    from fluid.validate import check

    check("stage.module.optim.scheduler", cfg.scheduler)
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    warmup = int(cfg.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total_steps, warmup, cfg.min_lr_ratio, cfg.scheduler == "cosine"))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
