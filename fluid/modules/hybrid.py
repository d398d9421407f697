"""Stage 1: strictly causal lane training (``HybridDiffusionModule``), docs/method.md sections 1-3.

Orchestration only: the maths lives in :mod:`fluid.lanes` (expansion, attention rule).
Loss ``L = L_AR + L_Diff``: cross-entropy on main tokens plus on lane slots, averaged over
all supervised tokens jointly by default (as the reference does), with optional weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from hydra.utils import instantiate

from fluid.backbones.tokens import noise_token_ids, num_embeddings, resolve_mask_token
from fluid.checkpoint import CheckpointMeta
from fluid.exact import LANE_ADAPTER_DIR, save_and_unload
from fluid.lanes import AttentionBackend, LaneBatch
from fluid.lanes.attention import attention_mask_for, split_main_slots
from fluid.modules.lanes import LaneModule
from fluid.modules.lora import LoraSettings, apply_lora, merge
from fluid.nn import IGNORE, decoder_and_lm_head, to_float_mask, token_ce


def lane_losses(logits: torch.Tensor, lb: LaneBatch) -> dict[str, torch.Tensor]:
    """Summed cross-entropies and token counts of main tokens (AR) and slots (Diff)."""
    ce = token_ce(logits, lb.targets)
    has = lb.targets != IGNORE
    ar, diff = has & lb.is_main, has & ~lb.is_main
    return {"ar_sum": ce[ar].sum(), "ar_n": ar.sum(), "diff_sum": ce[diff].sum(), "diff_n": diff.sum()}


def two_pass_lane_losses(model, lb: LaneBatch, pad_token_id: int) -> dict[str, torch.Tensor]:
    """:func:`lane_losses` of an exact-mode model (``lora.scope=lanes``) in two forwards: the main
    tokens alone without autograd, then the lane slots after their cache (their outputs and gradients
    are the expanded forward's, since no main-token output depends on a trained parameter); the LM
    head runs only where there is a target. Dense attention masks (SDPA/eager)."""
    from transformers import DynamicCache

    sp = split_main_slots(lb)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, lm_head = decoder_and_lm_head(hf)
    dtype = next(model.parameters()).dtype
    cache = DynamicCache()

    def run(kind: str):
        idx, ok = sp[f"{kind}_idx"], sp[f"{kind}_ok"]
        ids = torch.gather(lb.input_ids, 1, idx).masked_fill(~ok, pad_token_id)
        targets = torch.gather(lb.targets, 1, idx).masked_fill(~ok, IGNORE)
        h = decoder(input_ids=ids, attention_mask=to_float_mask(sp[f"{kind}_allowed"], dtype),
                    position_ids=torch.gather(lb.position_ids, 1, idx), past_key_values=cache,
                    use_cache=True).last_hidden_state
        keep = targets != IGNORE
        ce = torch.nn.functional.cross_entropy(lm_head(h[keep]).float(), targets[keep], reduction="sum")
        return ce, keep.sum()

    with torch.no_grad():
        ar_sum, ar_n = run("main")
    diff_sum, diff_n = run("slot")
    return {"ar_sum": ar_sum, "ar_n": ar_n, "diff_sum": diff_sum, "diff_n": diff_n}


def combine(parts: dict[str, torch.Tensor], w_ar: float = 1.0, w_diff: float = 1.0, joint: bool = True):
    """``joint``: (w_ar * sum_AR + w_diff * sum_Diff) / (n_AR + n_Diff); else mean_AR + mean_Diff."""
    n_ar, n_diff = parts["ar_n"].clamp(min=1), parts["diff_n"].clamp(min=1)
    if joint:
        return (w_ar * parts["ar_sum"] + w_diff * parts["diff_sum"]) / (parts["ar_n"] + parts["diff_n"]).clamp(min=1)
    return w_ar * parts["ar_sum"] / n_ar + w_diff * parts["diff_sum"] / n_diff


class HybridDiffusionModule(LaneModule):
    stage_id = 1

    def __init__(self, backbone, tokenizer, masking: dict, optim: dict | None = None, lora: dict | None = None,
                 attention: str = "auto", max_expanded_len: int | None = None, pad_to_multiple: int = 1,
                 loss: dict | None = None, seed: int = 0, eval_max_new_tokens: int = 128,
                 gradient_checkpointing: bool = False):
        super().__init__(backbone, tokenizer, optim, eval_max_new_tokens, gradient_checkpointing)
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
        model = self.build_backbone(flex=self.uses_flex(self.backend))
        # the MASK id is decided here, once, and recorded in fluid.json for everything after stage 1
        self.mask_token_id, added = resolve_mask_token(self.tokenizer, model, self.spec.mask_token)
        self.noise_ids = noise_token_ids(self.tokenizer, num_embeddings(model))
        self.model = apply_lora(self.checkpoint_activations(model), self.lora, [self.mask_token_id],
                                added_token_ids=[self.mask_token_id] if added else []).train()

    # ------------------------------------------------------------------ steps
    def expand(self, batch: dict, generator: torch.Generator) -> LaneBatch:
        return self.expand_batch(batch, self.schedule, generator, mask_token_id=self.mask_token_id,
                                 noise_token_ids=self.noise_ids, max_expanded_len=self.max_expanded_len,
                                 pad_to_multiple=self.pad_to_multiple)

    def forward_lanes(self, lb: LaneBatch) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        mask = attention_mask_for(lb, self.backend, dtype)
        return self.model(input_ids=lb.input_ids, attention_mask=mask, position_ids=lb.position_ids,
                          use_cache=False).logits

    def two_pass(self) -> bool:
        """Exact mode on the dense path: main tokens run the original weights and never see a slot, so
        their outputs do not depend on any trained parameter. They go through one forward without
        autograd and only the slots, after its cache, through backward (same losses and gradients as
        the expanded forward, for about the slots' share of its cost). Gradient checkpointing and
        flex attention keep the single expanded forward."""
        return (self.lora.enabled and self.lora.scope == "lanes" and not self.gradient_checkpointing
                and self.backend.resolve(self.device) is AttentionBackend.DENSE)

    def lane_parts(self, lb: LaneBatch) -> dict[str, torch.Tensor]:
        """:func:`lane_losses` of ``lb``, by the cheapest exact route (:meth:`two_pass`)."""
        if self.two_pass():
            return two_pass_lane_losses(self.model, lb, self.tokenizer.pad_token_id)
        return lane_losses(self.forward_lanes(lb), lb)

    def _step(self, batch: dict, generator: torch.Generator, prefix: str) -> torch.Tensor:
        lb = self.expand(batch, generator)
        parts = self.lane_parts(lb)
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
        return self._step(batch, self.step_generator(self.seed), "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, self.val_generator(batch_idx), "val")

    # ---------------------------------------------------------------- export
    def _adapter_dir(self, out: Path) -> Path:
        return out.parent / "adapter"

    def checkpoint_meta(self, out: Path) -> CheckpointMeta:
        lanes = self.lora.scope == "lanes"
        return dataclasses.replace(super().checkpoint_meta(out), mask_token_id=self.mask_token_id,
                                   horizon=self.schedule.horizon, masking=self.masking_cfg,
                                   adapter_dir=str(self._adapter_dir(out).resolve())
                                   if self.lora.enabled and not lanes else None,
                                   lane_adapter=LANE_ADAPTER_DIR if lanes else None)

    def export_hf(self, out_dir, **fields) -> Path:
        """LoRA adapter beside a merged plain-HF checkpoint; ``self.model`` becomes the merged model.
        Exact mode (``lora.scope=lanes``): the original weights, unmerged, with the adapter and
        the MASK offset in ``lane_adapter/`` inside it; ``self.model`` becomes the original model."""
        out = Path(out_dir)
        if self.lora.scope == "lanes":
            out.mkdir(parents=True, exist_ok=True)
            self.model = save_and_unload(self.model, out)
        elif self.lora.enabled:
            self.model.save_pretrained(self._adapter_dir(out))
            self.model = merge(self.model)
        return super().export_hf(out, **fields)
