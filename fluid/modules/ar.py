"""Stage 0: plain causal-LM supervised fine-tuning with a response-only loss (``ARModule``).

It gives the embedded backbone its AR prior (no pretrained tiny model can be downloaded)
and is the fair AR baseline for every comparison: same data, same budget.
"""

from __future__ import annotations

import torch

from fluid.backbones.tokens import num_embeddings
from fluid.modules.base import FluidModule
from fluid.nn import masked_ce


class ARModule(FluidModule):
    stage_id = 0

    def configure_model(self) -> None:
        if self.model is not None:
            return
        scratch = self.spec.is_embedded
        self.announce_zero3()
        self.model = self.spec.build_model(from_scratch=scratch, vocab_size=len(self.tokenizer) if scratch else None)
        if len(self.tokenizer) > num_embeddings(self.model):
            self.model.resize_token_embeddings(len(self.tokenizer))
        self.checkpoint_activations(self.model)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        # right padding + causal attention: real tokens never see pads; no mask keeps the SDPA fast path
        logits = self.model(input_ids=ids, position_ids=pos, use_cache=False).logits
        total, count = masked_ce(logits, batch["labels"])
        return total / count.clamp(min=1), count

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, count = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/tokens", count.float(), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, count = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=int(count), sync_dist=True)
