"""Stage 2: the K-head on a frozen stage-1 model (``KHeadModule``), DESIGN section 2.

The backbone is frozen completely (no gradients, no optimiser state, forward under
no-grad); one forward over full-length lanes gives per-slot losses, from which the
targets ``K*`` (tau cutoff) and Gaussian soft labels are built; only the head trains.
Saves only the head (safetensors) plus a pointer to the stage-1 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fluid.backbones.spec import BackboneSpec
from fluid.khead import KHead, k_star, kl_to_soft_labels, soft_labels
from fluid.khead.frozen import expanded_lane_losses, prefix_lane_losses, resolve_lane_forward
from fluid.lanes import AttentionBackend, FullLanes, expand_lanes
from fluid.modules.base import FluidModule
from fluid.modules.hybrid import read_fluid_json

HEAD_FILE = "khead.safetensors"


class KHeadModule(FluidModule):
    stage_id = 2

    def __init__(self, backbone: BackboneSpec, tokenizer, tau: dict, anchor_prob: float = 0.5,
                 horizon: int | None = None, optim: dict | None = None, attention: str = "auto", seed: int = 0,
                 eval_max_new_tokens: int = 128, lane_forward: str = "auto", lane_chunk: int = 64):
        super().__init__(backbone, tokenizer, optim, eval_max_new_tokens)
        self.tau, self.sigma = float(tau["value"]), float(tau.get("sigma", 1.5))
        meta = read_fluid_json(backbone.path) if backbone.path else {}
        self.horizon = int(horizon or meta.get("horizon") or 16)
        self.mask_token_id = meta.get("mask_token_id", tokenizer.mask_token_id)
        if self.mask_token_id is None:
            raise ValueError("stage 2 needs a stage-1 checkpoint with a mask token (fluid.json)")
        self.schedule = FullLanes(anchor_prob=anchor_prob, horizon=self.horizon)
        self.backend = AttentionBackend(attention)
        resolve_lane_forward(lane_forward, "cpu")  # a bad name fails here, not at the first step
        if lane_chunk < 1:
            raise ValueError(f"stage.module.lane_chunk must be >= 1, got {lane_chunk}")
        self.lane_forward, self.lane_chunk = lane_forward, lane_chunk
        self.seed = seed
        self.head: KHead | None = None
        self.save_hyperparameters({"tau": self.tau, "sigma": self.sigma, "horizon": self.horizon,
                                   "anchor_prob": anchor_prob})
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.spec.build_model()
        model.requires_grad_(False)
        model.eval()
        if (resolve_lane_forward(self.lane_forward, self.device) == "expanded"
                and self.backend.resolve(self.device) is AttentionBackend.FLEX):
            model.config._attn_implementation = "flex_attention"
        self.model = model
        self.head = KHead(model.config.hidden_size, self.horizon)

    def train(self, mode: bool = True):  # the backbone stays in eval mode
        super().train(mode)
        if self.model is not None:
            self.model.eval()
        return self

    # ------------------------------------------------------------------ maths
    def targets_and_logits(self, batch: dict, generator: torch.Generator):
        cpu = {k: v.cpu() for k, v in batch.items()}
        lb = expand_lanes(cpu["input_ids"], cpu["labels"], cpu["attention_mask"], self.schedule,
                          mask_token_id=self.mask_token_id, noise_token_ids=torch.tensor([0]),
                          pad_token_id=self.tokenizer.pad_token_id, generator=generator).to(self.device)
        if resolve_lane_forward(self.lane_forward, self.device) == "prefix":
            hidden, losses, valid = prefix_lane_losses(self.model, batch["input_ids"], batch["attention_mask"], lb,
                                                       self.horizon, self.mask_token_id, self.lane_chunk)
        else:
            hidden, losses, valid = expanded_lane_losses(self.model, lb, self.horizon, self.backend)
        kstar = k_star(losses, valid, self.tau)
        head_logits = self.head(hidden.to(self.head.net[0].weight.dtype))
        return kstar, head_logits

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step * max(1, self.trainer.world_size)
                                          + self.global_rank)
        kstar, logits = self.targets_and_logits(batch, g)
        loss = kl_to_soft_labels(logits, soft_labels(kstar, self.horizon, self.sigma))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(kstar))
        self.log("train/mean_target_k", kstar.float().mean(), batch_size=len(kstar))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        kstar, logits = self.targets_and_logits(batch, torch.Generator().manual_seed(10_007 + batch_idx))
        pred = logits.argmax(-1) + 1
        n = len(kstar)
        self.log("val/loss", kl_to_soft_labels(logits, soft_labels(kstar, self.horizon, self.sigma)), batch_size=n,
                 sync_dist=True)
        self.log("val/head_acc", (pred == kstar).float().mean(), batch_size=n, sync_dist=True)
        self.log("val/head_acc_within1", ((pred - kstar).abs() <= 1).float().mean(), batch_size=n, sync_dist=True)
        self.log("val/mean_target_k", kstar.float().mean(), batch_size=n, sync_dist=True)
        self.log("val/mean_pred_k", pred.float().mean(), batch_size=n, sync_dist=True)
        self._val.append((kstar.cpu(), pred.cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        kstar = torch.cat([k for k, _ in self._val])
        pred = torch.cat([p for _, p in self._val])
        self._val.clear()
        self.histograms = {"target_k": torch.bincount(kstar, minlength=self.horizon + 1)[1:].tolist(),
                           "pred_k": torch.bincount(pred, minlength=self.horizon + 1)[1:].tolist()}
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({"val/target_k_hist": wandb.Histogram(kstar.numpy()),
                                       "val/pred_k_hist": wandb.Histogram(pred.numpy()),
                                       "trainer/global_step": self.global_step})

    # ----------------------------------------------------------------- export
    def export_hf(self, out_dir, extra: dict | None = None) -> Path:
        """Only the head and a pointer to the stage-1 checkpoint (the backbone is unchanged)."""
        out = Path(out_dir)
        self.head.save(out)
        meta = {"stage": 2, "stage1_checkpoint": str(Path(self.spec.path).resolve()), "head_file": HEAD_FILE,
                "horizon": self.horizon, "tau": self.tau, "sigma": self.sigma, "mask_token_id": self.mask_token_id,
                "histograms": getattr(self, "histograms", None)}
        meta.update(extra or {})
        (out / "fluid.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out


def load_fluid_model(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Backbone + K-head + tokenizer of a stage-2 checkpoint, in one call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_fluid_json(checkpoint_dir)
    if meta.get("stage") != 2:
        raise ValueError(f"{checkpoint_dir} is not a stage-2 checkpoint (fluid.json stage={meta.get('stage')})")
    base = meta["stage1_checkpoint"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    head = KHead.load(Path(checkpoint_dir) / meta["head_file"]).to(device=device, dtype=dtype).eval()
    return model, head, tokenizer, meta
