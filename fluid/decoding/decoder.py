"""``FluidDecoder(model, tokenizer, head).generate(prompts)``: batching, statistics and the choice
of algorithm (:mod:`fluid.decoding.fluid`, :mod:`~fluid.decoding.ar`, :mod:`~fluid.decoding.published`).
With verification the output is exactly greedy AR (fp32)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import torch

from fluid.backbones.tokens import pad_token_id
from fluid.checkpoint import mask_token_id as resolve_mask_id
from fluid.decoding import ar, costplan, costwin, fluid, published
from fluid.decoding.config import DecodeConfig
from fluid.decoding.cost import ForwardCost
from fluid.decoding.horizon import horizon_source
from fluid.decoding.setup import check_decode
from fluid.decoding.state import Context, DecodeBatch, RowStats, StopRule, decode_result, visible_text

ALGORITHMS = {"fluid": fluid, "ar": ar, "published": published}
RECOMPILE_LIMIT = 64  # shapes vary by design (rows leave, blocks and the cache change length)


def _progress_bar(label: str | None, total: int):
    if label is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="prompt", dynamic_ncols=True)


class FluidDecoder:
    def __init__(self, model, tokenizer, head=None, mask_token_id: int | None = None,
                 config: DecodeConfig | None = None, stop_strings: Sequence[str] = ()):
        self.model, self.tokenizer, self.head = model.eval(), tokenizer, head
        self.mask_id = resolve_mask_id(mask_token_id, tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = pad_token_id(tokenizer)
        self.config = (config or DecodeConfig()).validate()
        self.stop_strings = list(stop_strings)
        self._compiled = None
        self._costs: dict[tuple, ForwardCost] = {}       # window=cost: forward-cost curves, measured once
        self._acceptance: dict[tuple, costplan.Acceptance] = {}  # and acceptance counted across calls

    def generate(self, prompts: Sequence[Sequence[int] | str], reference: Sequence[Sequence[int]] | None = None,
                 progress: str | None = None, **overrides) -> dict:
        """Decode ``prompts`` (token ids or chat-free strings) in batches; returns texts and stats.
        ``overrides`` are :class:`DecodeConfig` fields for this call; ``progress``: a label, to
        show a progress bar (prompts done) under it on stderr."""
        cfg = replace(self.config, **overrides).validate() if overrides else self.config
        check_decode(cfg, self.head is not None, self.mask_id, key="")
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
               for p in prompts]
        if cfg.horizon == "oracle" and reference is None:
            reference = self.generate(ids, algorithm="ar", max_new_tokens=cfg.max_new_tokens)["tokens"]
        algo = costwin if cfg.algorithm == "fluid" and cfg.window == "cost" else ALGORITHMS[cfg.algorithm]
        rule = StopRule(cfg.max_new_tokens, self.eos_id, self.tokenizer, self.stop_strings)
        stats: list[RowStats] = []
        bar = _progress_bar(progress, len(ids))
        t0 = time.perf_counter()
        bs = 1 if algo.ONE_PROMPT_AT_A_TIME else cfg.batch_size
        for start in range(0, len(ids), bs):
            chunk = ids[start: start + bs]
            ref = reference[start: start + bs] if reference is not None else None
            ctx = Context(horizon=horizon_source(cfg, self.head, ref) if algo in (fluid, published) else None,
                          rule=rule, mask_id=self.mask_id, prompts=chunk, **self._window_state(cfg, algo))
            stats.extend(self._decode(algo, chunk, cfg, ctx))
            if bar is not None:
                bar.update(len(chunk))
        wall = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        return decode_result(stats, [visible_text(self.tokenizer, s.tokens, self.stop_strings) for s in stats], wall)

    @torch.inference_mode()
    def _decode(self, algo, prompts, cfg: DecodeConfig, ctx: Context) -> list[RowStats]:
        stats = [RowStats() for _ in prompts]
        batch = DecodeBatch(self.model, prompts, self.pad_id, lane=algo.prefill_lane(cfg, len(prompts), self.mask_id),
                            mask_token_id=self.mask_id, decoder=self._body(cfg))
        algo.decode(batch, stats, cfg, ctx)
        return stats

    def _window_state(self, cfg: DecodeConfig, algo) -> dict:
        """window=cost: the forward-cost curve (measured on this model once, at first use) and the
        acceptance counted so far for these settings (kept across calls, as a server would)."""
        if algo is not costwin:
            return {}
        ckey = tuple(cfg.cost_curve) if cfg.cost_curve else ("measured", costwin.lane_length(cfg, self.mask_id) > 0)
        if ckey not in self._costs:
            self._costs[ckey] = ForwardCost(self.model, cfg.cost_curve,
                                            mask_id=self.mask_id if costwin.lane_length(cfg, self.mask_id) else None)
        akey = (cfg.ngram, cfg.ngram_min, cfg.ngram_max, cfg.ngram_draft, cfg.lane_len, cfg.share_verify_draft,
                cfg.explore)
        if akey not in self._acceptance:
            self._acceptance[akey] = costplan.Acceptance(cfg.explore)
        return {"cost": self._costs[ckey], "acceptance": self._acceptance[akey]}

    def calibrate(self, batch_sizes: Sequence[int] = (1,), **overrides) -> None:
        """Measure the forward-cost curves that ``window=cost`` will use at these batch sizes now
        (otherwise the first call at each measures them), so that no timed call pays for it."""
        cfg = replace(self.config, **overrides).validate() if overrides else self.config
        if cfg.algorithm == "fluid" and cfg.window == "cost":
            cost = self._window_state(cfg, costwin)["cost"]
            for b in batch_sizes:
                cost.curve(b)

    def _body(self, cfg: DecodeConfig):
        """The transformer body to run: the model's own, or (``compile``) one compiled copy of it."""
        if not cfg.compile:
            return None
        if self._compiled is None:
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
            self._compiled = torch.compile(getattr(self.model, self.model.base_model_prefix), dynamic=True)
        return self._compiled
