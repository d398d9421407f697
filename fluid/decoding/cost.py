"""The cost of one decoding forward against the new tokens it carries, relative to a one-token
forward at the same batch size: what a window is sized by (``decode.window=cost``).

Measured once per decoder, model and batch-size bucket on the model itself (a few seconds,
:func:`measure_curve`), or given as ``decode.cost_curve`` (relative costs of 1, 2, ... tokens).
``scripts/bench_forward.py`` prints the same measurement as a table.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from fluid.backbones.compat import kv_cache

CURVE_TOKENS = (1, 2, 3, 4, 6, 8, 12, 16)
BUCKETS = (1, 4, 16, 64)


def time_forwards(model, batch: int, cache: int, tokens: int, repeats: int, vocab: int,
                  kv=None, mask_id: int | None = None) -> list[float]:
    """Seconds of ``repeats`` forwards of ``tokens`` new tokens per row after a ``cache``-token KV
    cache (prefilled once when ``kv`` is None; the new entries are cropped after each forward).
    With ``mask_id`` the last new token is a MASK slot (a forward that carries a lane: in exact mode
    it runs the lane adapter)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if kv is None:
            kv = DynamicCache()
            prompt = torch.randint(0, vocab, (batch, cache), generator=g).to(device)
            model(input_ids=prompt, position_ids=torch.arange(cache, device=device).expand(batch, -1),
                  **kv_cache(kv), use_cache=True)
        new = torch.randint(0, vocab, (batch, tokens), generator=g).to(device)
        if mask_id is not None:
            new[:, -1] = mask_id
        pos = torch.arange(cache, cache + tokens, device=device).expand(batch, -1)
        out = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(input_ids=new, position_ids=pos, **kv_cache(kv), use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
            kv.crop(-tokens)
    return out


def measure_curve(model, batch: int, cache: int = 200, tokens=CURVE_TOKENS, repeats: int = 3,
                  mask_id: int | None = None) -> tuple[list[float], list[float] | None]:
    """Relative cost of a forward over ``1..max(tokens)`` new tokens per row at ``batch`` rows
    (measured at ``tokens``, interpolated between, never decreasing), and with ``mask_id`` the same
    for forwards whose last token is a MASK slot (relative to the plain one-token forward). The
    sizes are interleaved over the repeats, so a slow spell hits them alike."""
    from transformers import DynamicCache

    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    kv = DynamicCache()
    with torch.inference_mode():
        prompt = torch.randint(0, vocab, (batch, cache), generator=torch.Generator().manual_seed(1)).to(device)
        model(input_ids=prompt, position_ids=torch.arange(cache, device=device).expand(batch, -1),
              **kv_cache(kv), use_cache=True)
    time_forwards(model, batch, cache, 1, 1, vocab, kv)  # warm-up
    kinds = [None] if mask_id is None else [None, mask_id]
    times: dict[tuple, list[float]] = {(k, q): [] for k in kinds for q in tokens}
    for _ in range(repeats):
        for k in kinds:
            for q in tokens:
                times[k, q] += time_forwards(model, batch, cache, q, 1, vocab, kv, mask_id=k)
    grid = np.arange(1, max(tokens) + 1)
    base = statistics.median(times[None, tokens[0]])
    out = []
    for k in kinds:
        rel = np.maximum.accumulate(np.array([statistics.median(times[k, q]) for q in tokens]) / base)
        out.append(np.interp(grid, np.array(tokens), rel).tolist())
    return out[0], (out[1] if mask_id is not None else None)


class ForwardCost:
    """``table(n_rows, q_max, lane)``: relative cost of a forward of ``q`` new tokens per row at
    ``n_rows`` rows (the nearest measured bucket), with a lane (MASK slots: in exact mode the lane
    adapter runs) or without; beyond the curve it grows linearly with its last slope."""

    def __init__(self, model=None, curve: list[float] | None = None, mask_id: int | None = None):
        self.model, self.mask_id = model, mask_id
        self.curves: dict[tuple[int, bool], np.ndarray] = {}
        if curve is not None:
            c = np.asarray(curve, dtype=float)
            if c.ndim != 1 or len(c) < 1 or (c <= 0).any():
                raise ValueError(f"decode.cost_curve must be a list of positive numbers, got {curve!r}")
            self.fixed = np.maximum.accumulate(c / c[0])  # a wider forward never costs less (costwin relies on it)
        else:
            self.fixed = None

    @staticmethod
    def bucket(n_rows: int) -> int:
        return min(BUCKETS, key=lambda b: abs(np.log(b) - np.log(max(1, n_rows))))

    def curve(self, n_rows: int, lane: bool = False) -> np.ndarray:
        if self.fixed is not None:
            return self.fixed
        b = self.bucket(n_rows)
        if (b, False) not in self.curves:
            plain, with_lane = measure_curve(self.model, b, mask_id=self.mask_id)
            self.curves[b, False] = np.asarray(plain)
            self.curves[b, True] = np.asarray(with_lane if with_lane is not None else plain)
        return self.curves[b, lane]

    def table(self, n_rows: int, q_max: int, lane: bool = False) -> np.ndarray:
        """Costs of ``0..q_max`` tokens (index ``q``; index 0 unused)."""
        c = self.curve(n_rows, lane)
        slope = c[-1] - c[-2] if len(c) > 1 else 0.0
        q = np.arange(q_max + 1)
        ext = c[-1] + slope * np.maximum(0, q - len(c))
        return np.concatenate([[np.inf], np.where(q[1:] <= len(c), c[np.minimum(q[1:], len(c)) - 1], ext[1:])])
