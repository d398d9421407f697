"""Where a block's horizon ``K_t`` comes from: the K-head, a fixed value, or an oracle.

Each source gives one horizon per active row, clamped to ``[k_min, k_max]``; the oracle also
trims a fully drafted block to the prefix that matches a reference (analysis only).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fluid.decoding.config import DecodeConfig


class HorizonSource:
    def __init__(self, cfg: DecodeConfig):
        self.k_min, self.k_max = cfg.k_min, cfg.k_max

    @classmethod
    def build(cls, cfg: DecodeConfig, head, reference) -> "HorizonSource":
        return cls(cfg)

    def raw(self, batch) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, batch) -> np.ndarray:
        """Horizons ``(n,)`` for the active rows of ``batch`` (a :class:`DecodeBatch`)."""
        return np.clip(self.raw(batch), self.k_min, self.k_max)

    def trim(self, batch, stats, win: np.ndarray, blen: np.ndarray, full: np.ndarray) -> np.ndarray:
        """Block lengths after the source has seen the drafts (only the oracle changes them)."""
        return blen


class HeadHorizon(HorizonSource):
    """The K-head on the anchor's final hidden state (docs/method.md section 5)."""

    def __init__(self, cfg: DecodeConfig, head: torch.nn.Module):
        super().__init__(cfg)
        self.head = head
        self.dtype = next(head.parameters()).dtype

    @classmethod
    def build(cls, cfg, head, reference):  # a missing head is refused before decoding (decoding/setup.py)
        return cls(cfg, head)

    def raw(self, batch) -> np.ndarray:
        return self.head.predict_k(batch.h_anchor.to(self.dtype)).cpu().numpy()


class FixedHorizon(HorizonSource):
    def __init__(self, cfg: DecodeConfig):
        super().__init__(cfg)
        self.k = cfg.fixed_k

    def raw(self, batch) -> np.ndarray:
        return np.full(batch.size, self.k, dtype=np.int64)


class OracleHorizon(HorizonSource):
    """Analysis only: blocks of ``k_max`` that, once fully drafted, are cut to the prefix that
    matches the reference continuation (what a perfect K-head would have picked for this draft)."""

    def __init__(self, cfg: DecodeConfig, reference: Sequence[Sequence[int]]):
        super().__init__(cfg)
        self.reference = reference

    @classmethod
    def build(cls, cfg, head, reference):
        if reference is None:
            raise ValueError("decode.horizon=oracle needs the reference continuations")
        return cls(cfg, reference)

    def raw(self, batch) -> np.ndarray:
        return np.full(batch.size, self.k_max, dtype=np.int64)

    def trim(self, batch, stats, win, blen, full):
        blen = blen.copy()
        for i in np.nonzero(full)[0].tolist():
            r = int(batch.rows[i])
            done = len(stats[r].tokens)
            ref = self.reference[r][done: done + int(blen[i])]
            match = 0
            for a, b in zip(win[i, : int(blen[i])].tolist(), ref):
                if a != b:
                    break
                match += 1
            blen[i] = min(max(match, self.k_min, 1), int(blen[i]))
        return blen


SOURCES: dict[str, type[HorizonSource]] = {"head": HeadHorizon, "fixed": FixedHorizon, "oracle": OracleHorizon}


def horizon_source(cfg: DecodeConfig, head=None, reference=None) -> HorizonSource:
    """The source ``cfg.horizon`` names; ``head`` / ``reference`` for the sources that need them."""
    return SOURCES[cfg.horizon].build(cfg, head, reference)
