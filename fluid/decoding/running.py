"""Rows that join and leave a decoding batch between forwards (continuous batching).

:class:`RunningBatch` is the loop of :meth:`FluidDecoder.generate` turned inside out: the caller
adds prompts whenever it likes (:meth:`add` prefills them and appends them to the running batch:
caches are left-padded, so every row keeps its own positions and mask), calls :meth:`step` (one
forward of every active row, the algorithm's own step), reads each row's committed tokens in
:attr:`stats`, and removes rows it no longer wants (:meth:`remove`). A row's tokens are those it
gets alone: lossless decoding stays greedy AR whatever joins or leaves around it.

The server's engine (:mod:`fluid.serve.engine`) and the transformers ``custom_generate`` entry
(:mod:`fluid.hf_generate`) decode through it. Algorithms: ``fluid`` (``window=block`` with the
K-head or fixed horizons, and ``window=cost``) and ``ar``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from fluid.decoding import ar, costwin, fluid
from fluid.decoding.config import DecodeConfig
from fluid.decoding.horizon import horizon_source
from fluid.decoding.state import Context, DecodeBatch, RowStats, StopRule
from fluid.utils.errors import FluidConfigError


def stepwise_algorithm(cfg: DecodeConfig):
    """The module whose ``start`` / ``step`` / ``extend`` / ``keep`` run ``cfg`` a forward at a time."""
    if cfg.algorithm == "ar":
        return ar
    if cfg.algorithm != "fluid":
        raise FluidConfigError("decode.algorithm", f"{cfg.algorithm!r} cannot take rows between forwards",
                               "use fluid or ar")
    if cfg.horizon == "oracle" and cfg.window == "block":
        raise FluidConfigError("decode.horizon", "'oracle' needs reference continuations (analysis only)",
                               "use head or fixed")
    return costwin if cfg.window == "cost" else fluid


class RunningBatch:
    """The rows a decoder is decoding now; see the module docstring."""

    def __init__(self, decoder, cfg: DecodeConfig | None = None):
        from fluid.decoding.setup import check_decode

        self.decoder = decoder
        self.cfg = (cfg or decoder.config).validate()
        check_decode(self.cfg, decoder.head is not None, decoder.mask_id)
        self.algo = stepwise_algorithm(self.cfg)
        self.rule = StopRule(self.cfg.max_new_tokens, decoder.eos_id, decoder.tokenizer, decoder.stop_strings)
        self.ctx = Context(horizon=horizon_source(self.cfg, decoder.head) if self.algo is fluid else None,
                           rule=self.rule, mask_id=decoder.mask_id, **decoder._window_state(self.cfg, self.algo))
        self.batch: DecodeBatch | None = None
        self.state = None
        self.stats: dict[int, RowStats] = {}
        self._next_id = 0

    @property
    def size(self) -> int:
        return self.batch.size if self.batch is not None else 0

    @property
    def active(self) -> list[int]:
        """Ids of the rows still decoding, in batch order."""
        return self.batch.rows.tolist() if self.batch is not None else []

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]], rules: Sequence[StopRule | None] | None = None) -> list[int]:
        """Prefill ``prompts`` (token ids) and let them join at the next forward; ``rules``: each
        row's own commit rule (max tokens, stop strings), None for the decoder's. Returns row ids."""
        prompts = [list(p) for p in prompts]
        if not prompts:
            return []
        dec, cfg = self.decoder, self.cfg
        ids = list(range(self._next_id, self._next_id + len(prompts)))
        new = DecodeBatch(dec.model, prompts, dec.pad_id, lane=self.algo.prefill_lane(cfg, len(prompts), dec.mask_id),
                          mask_token_id=dec.mask_id, decoder=dec._body(cfg))
        new.rows = torch.tensor(ids, device=new.device)
        state = self.algo.start(new, cfg, replace(self.ctx, prompts=prompts))
        self._next_id += len(prompts)
        if self.size == 0:
            self.batch, self.state = new, state
        else:
            self.batch.extend(new)  # builds every new tensor before it assigns one: a failure leaves the batch as it was
            self.state = self.algo.extend(self.state, state, self.ctx)
        for i, rid in enumerate(ids):
            self.stats[rid] = RowStats(rule=rules[i] if rules is not None else None)
        return ids

    @torch.inference_mode()
    def step(self) -> None:
        """One forward of every active row; rows that finish leave the batch."""
        if self.size:
            self.state = self.algo.step(self.batch, self.state, self.stats, self.cfg, self.ctx)

    def remove(self, row_ids: Sequence[int]) -> None:
        """Stop decoding ``row_ids`` (cancelled requests); their statistics stay until :meth:`pop`."""
        if not self.size or not row_ids:
            return
        gone = torch.tensor(list(row_ids), device=self.batch.device)
        alive = ~torch.isin(self.batch.rows, gone)
        if bool(alive.all()):
            return
        self.batch.keep(alive)
        self.state = self.algo.keep(self.state, alive.cpu().numpy().astype(bool)) if self.state is not None else None

    def pop(self, row_id: int) -> RowStats:
        """Forget ``row_id`` (finished or removed) and return its statistics."""
        if row_id in self.active:
            self.remove([row_id])
        return self.stats.pop(row_id)

    def run(self) -> None:
        """Step until no row is active."""
        while self.size:
            self.step()
