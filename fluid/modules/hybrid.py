"""Stage 1: strictly causal lane training (``HybridDiffusionModule``), DESIGN section 1.

Orchestration only: the maths lives in :mod:`fluid.lanes` (expansion, attention rule).
Loss ``L = L_AR + L_Diff``: cross-entropy on main tokens plus on lane slots, averaged over
all supervised tokens jointly by default (as the reference does), with optional weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import instantiate

from fluid.backbones.tokens import noise_token_ids, resolve_mask_token
from fluid.data.sft import IGNORE
from fluid.lanes import AttentionBackend, LaneBatch, expand_lanes
from fluid.lanes.attention import attention_mask_for
from fluid.modules.base import FluidModule
from fluid.modules.lora import LoraSettings, apply_lora, merge


def lane_losses(logits: torch.Tensor, lb: LaneBatch) -> dict[str, torch.Tensor]:
    """Summed cross-entropies and token counts of main tokens (AR) and slots (Diff)."""
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), lb.targets.clamp(min=0),
                                           reduction="none")
    has = lb.targets != IGNORE
    ar, diff = has & lb.is_main, has & ~lb.is_main
    return {"ar_sum": ce[ar].sum(), "ar_n": ar.sum(), "diff_sum": ce[diff].sum(), "diff_n": diff.sum()}


def combine(parts: dict[str, torch.Tensor], w_ar: float = 1.0, w_diff: float = 1.0, joint: bool = True):
    """``joint``: (w_ar * sum_AR + w_diff * sum_Diff) / (n_AR + n_Diff); else mean_AR + mean_Diff."""
    n_ar, n_diff = parts["ar_n"].clamp(min=1), parts["diff_n"].clamp(min=1)
    if joint:
        return (w_ar * parts["ar_sum"] + w_diff * parts["diff_sum"]) / (parts["ar_n"] + parts["diff_n"]).clamp(min=1)
    return w_ar * parts["ar_sum"] / n_ar + w_diff * parts["diff_sum"] / n_diff


class HybridDiffusionModule(FluidModule):
    stage_id = 1

    def __init__(self, backbone, tokenizer, masking: dict, optim: dict | None = None, lora: dict | None = None,
                 attention: str = "auto", max_expanded_len: int | None = None, pad_to_multiple: int = 1,
                 loss: dict | None = None, seed: int = 0, eval_max_new_tokens: int = 128):
        super().__init__(backbone, tokenizer, optim, eval_max_new_tokens)
        self.masking_cfg = dict(masking)
        self.schedule = instantiate(self.masking_cfg)
        self.lora = LoraSettings(**(lora or {}))
        self.backend = AttentionBackend(attention)
        self.max_expanded_len, self.pad_to_multiple, self.seed = max_expanded_len, pad_to_multiple, seed
        loss = loss or {}
        self.w_ar, self.w_diff = float(loss.get("ar_weight", 1.0)), float(loss.get("diff_weight", 1.0))
        self.joint = loss.get("reduction", "joint") == "joint"
        self.mask_token_id: int | None = None
        self.noise_ids: torch.Tensor | None = None
        self.save_hyperparameters({"masking": self.masking_cfg, "lora": vars(self.lora), "attention": attention,
                                   "max_expanded_len": max_expanded_len, "loss": loss, "seed": seed})

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.spec.build_model()
        self.mask_token_id, _ = resolve_mask_token(self.tokenizer, model, self.spec.mask_token)
        self.noise_ids = noise_token_ids(self.tokenizer, model.get_input_embeddings().weight.shape[0])
        if self.backend.resolve(self.device) is AttentionBackend.FLEX:
            model.config._attn_implementation = "flex_attention"
        self.model = apply_lora(model, self.lora, [self.mask_token_id]).train()

    # ------------------------------------------------------------------ steps
    def expand(self, batch: dict, generator: torch.Generator) -> LaneBatch:
        cpu = {k: v.cpu() for k, v in batch.items()}
        lb = expand_lanes(cpu["input_ids"], cpu["labels"], cpu["attention_mask"], self.schedule,
                          mask_token_id=self.mask_token_id, noise_token_ids=self.noise_ids,
                          pad_token_id=self.tokenizer.pad_token_id, generator=generator,
                          max_expanded_len=self.max_expanded_len, pad_to_multiple=self.pad_to_multiple)
        return lb.to(self.device)

    def forward_lanes(self, lb: LaneBatch) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        mask = attention_mask_for(lb, self.backend, dtype)
        return self.model(input_ids=lb.input_ids, attention_mask=mask, position_ids=lb.position_ids,
                          use_cache=False).logits

    def _step(self, batch: dict, generator: torch.Generator, prefix: str) -> torch.Tensor:
        lb = self.expand(batch, generator)
        parts = lane_losses(self.forward_lanes(lb), lb)
        loss = combine(parts, self.w_ar, self.w_diff, self.joint)
        bs = batch["input_ids"].shape[0]
        sync = prefix == "val"
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=sync)
        self.log(f"{prefix}/loss_ar", parts["ar_sum"] / parts["ar_n"].clamp(min=1), batch_size=bs, sync_dist=sync)
        self.log(f"{prefix}/loss_diff", parts["diff_sum"] / parts["diff_n"].clamp(min=1), prog_bar=True,
                 batch_size=bs, sync_dist=sync)
        if prefix == "train":
            self.log("train/tokens_ar", parts["ar_n"].float(), batch_size=1)
            self.log("train/tokens_diff", parts["diff_n"].float(), batch_size=1)
            self.log("train/expanded_len", float(lb.length), batch_size=1)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        step_seed = self.seed * 1_000_003 + self.global_step * max(1, self.trainer.world_size) + self.global_rank
        return self._step(batch, torch.Generator().manual_seed(step_seed), "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, torch.Generator().manual_seed(10_007 + batch_idx), "val")

    # ---------------------------------------------------------------- export
    def export_hf(self, out_dir, extra: dict | None = None) -> Path:
        """LoRA adapter beside a merged plain-HF checkpoint; ``self.model`` becomes the merged model."""
        out = Path(out_dir)
        if self.lora.enabled:
            self.model.save_pretrained(out.parent / "adapter")
            self.model = merge(self.model)
        meta = {"mask_token_id": self.mask_token_id, "horizon": self.schedule.horizon,
                "masking": self.masking_cfg, "adapter_dir": str((out.parent / "adapter").resolve())
                if self.lora.enabled else None}
        meta.update(extra or {})
        return super().export_hf(out, extra=meta)


def read_fluid_json(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / "fluid.json"
    return json.loads(path.read_text()) if path.exists() else {}
