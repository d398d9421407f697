"""``Linear(h, h/4) -> GELU -> Linear(h/4, K)`` on the final hidden state; class c = horizon c+1."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fluid.checkpoint import HEAD_FILE


class KHead(nn.Module):
    def __init__(self, hidden_size: int, horizon: int):
        super().__init__()
        self.hidden_size, self.horizon = hidden_size, horizon
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size // 4), nn.GELU(),
                                 nn.Linear(hidden_size // 4, horizon))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)

    @torch.no_grad()
    def predict_k(self, hidden: torch.Tensor, k_min: int = 1, k_max: int | None = None) -> torch.Tensor:
        k = self.forward(hidden).argmax(-1) + 1
        return k.clamp(min=k_min, max=k_max or self.horizon)

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, out / HEAD_FILE,
                  metadata={"hidden_size": str(self.hidden_size), "horizon": str(self.horizon)})
        return out / HEAD_FILE

    @classmethod
    def load(cls, path: str | Path) -> "KHead":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        head = cls(int(meta["hidden_size"]), int(meta["horizon"]))
        head.load_state_dict(load_file(str(path)))
        return head
