"""Stage 2: the K-head on a frozen stage-1 model (``KHeadModule``), docs/method.md section 4.

The backbone is frozen completely (no gradients, no optimiser state, forward under
no-grad); one forward over full-length lanes gives per-slot losses, from which the
targets ``K*`` (tau cutoff) and Gaussian soft labels are built; only the head trains.
Saves only the head (safetensors) plus a pointer to the stage-1 checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fluid.backbones.spec import BackboneSpec
from fluid.checkpoint import HEAD_FILE, CheckpointMeta, mask_token_id
from fluid.khead import KHead, k_star, kl_to_soft_labels, soft_labels
from fluid.khead.frozen import LANE_CHUNK, expanded_lane_losses, prefix_lane_losses, resolve_lane_forward
from fluid.lanes import AttentionBackend, FullLanes
from fluid.modules.lanes import LaneModule
from fluid.validate import check

NO_NOISE = torch.empty(0, dtype=torch.long)  # full lanes are never restored, so never noised


class KHeadModule(LaneModule):
    stage_id = 2

    def __init__(self, backbone: BackboneSpec, tokenizer, tau: dict, anchor_prob: float = 0.5,
                 horizon: int | None = None, optim: dict | None = None, attention: str = "auto", seed: int = 0,
                 eval_max_new_tokens: int = 128, lane_forward: str = "auto", lane_chunk: int = LANE_CHUNK,
                 target_k_taus: list[float] | None = None):
        super().__init__(backbone, tokenizer, optim, eval_max_new_tokens)
        self.tau, self.sigma = float(tau["value"]), float(tau["sigma"])
        meta = CheckpointMeta.read(backbone.path) if backbone.path else CheckpointMeta()
        self.horizon = int(horizon or meta.horizon or 0)
        if self.horizon < 1:
            raise ValueError("stage.module.horizon: not set and the stage-1 checkpoint's fluid.json has no horizon "
                             "(set stage.module.horizon=K)")
        self.mask_token_id = mask_token_id(meta, tokenizer)
        if self.mask_token_id is None:
            raise ValueError("stage 2 needs a stage-1 checkpoint with a mask token (fluid.json)")
        self.schedule = FullLanes(anchor_prob=anchor_prob, horizon=self.horizon)
        self.backend = AttentionBackend(attention)
        resolve_lane_forward(lane_forward, "cpu")  # a bad name fails here, not at the first step
        check("stage.module.lane_chunk", lane_chunk)
        self.lane_forward, self.lane_chunk = lane_forward, lane_chunk
        # validation also reports the mean target K at these thresholds, on the same lanes: what a
        # tau sweep would train towards, from one frozen forward instead of one run per tau
        check("stage.module.target_k_taus", target_k_taus)
        self.target_k_taus = [float(t) for t in (target_k_taus or [])]
        self.seed = seed
        self.head: KHead | None = None
        self.save_hyperparameters({"tau": self.tau, "sigma": self.sigma, "horizon": self.horizon,
                                   "anchor_prob": anchor_prob})
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        expanded = resolve_lane_forward(self.lane_forward, self.device) == "expanded"
        model = self.build_backbone(flex=expanded and self.uses_flex(self.backend))
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.head = KHead(model.config.hidden_size, self.horizon)

    def train(self, mode: bool = True):  # the backbone stays in eval mode
        super().train(mode)
        if self.model is not None:
            self.model.eval()
        return self

    # ------------------------------------------------------------------ maths
    def targets_and_logits(self, batch: dict, generator: torch.Generator):
        lb = self.expand_batch(batch, self.schedule, generator, mask_token_id=self.mask_token_id, noise_token_ids=NO_NOISE)
        if resolve_lane_forward(self.lane_forward, self.device) == "prefix":
            hidden, losses, valid = prefix_lane_losses(self.model, batch["input_ids"], batch["attention_mask"], lb,
                                                       self.horizon, self.mask_token_id, self.lane_chunk)
        else:
            hidden, losses, valid = expanded_lane_losses(self.model, lb, self.horizon, self.backend)
        kstar = k_star(losses, valid, self.tau)
        head_logits = self.head(hidden.to(self.head.net[0].weight.dtype))
        self._last_lane_losses = (losses, valid)
        return kstar, head_logits

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        kstar, logits = self.targets_and_logits(batch, self.step_generator(self.seed))
        loss = kl_to_soft_labels(logits, soft_labels(kstar, self.horizon, self.sigma))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(kstar))
        self.log("train/mean_target_k", kstar.float().mean(), batch_size=len(kstar))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        kstar, logits = self.targets_and_logits(batch, self.val_generator(batch_idx))
        pred = logits.argmax(-1) + 1
        n = len(kstar)
        self.log("val/loss", kl_to_soft_labels(logits, soft_labels(kstar, self.horizon, self.sigma)), batch_size=n,
                 sync_dist=True)
        self.log("val/head_acc", (pred == kstar).float().mean(), batch_size=n, sync_dist=True)
        self.log("val/head_acc_within1", ((pred - kstar).abs() <= 1).float().mean(), batch_size=n, sync_dist=True)
        self.log("val/mean_target_k", kstar.float().mean(), batch_size=n, sync_dist=True)
        self.log("val/mean_pred_k", pred.float().mean(), batch_size=n, sync_dist=True)
        losses, valid = self._last_lane_losses
        for t in self.target_k_taus:
            self.log(f"val/mean_target_k_tau{t:g}", k_star(losses, valid, t).float().mean(), batch_size=n,
                     sync_dist=True)
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
    def checkpoint_meta(self, out: Path) -> CheckpointMeta:
        return CheckpointMeta(stage=2, source_backbone=self.spec.name, stage1_checkpoint=str(Path(self.spec.path).resolve()),
                              head_file=HEAD_FILE, horizon=self.horizon, tau=self.tau, sigma=self.sigma,
                              mask_token_id=self.mask_token_id, histograms=getattr(self, "histograms", None))

    def export_hf(self, out_dir, **fields) -> Path:
        """Only the head and a pointer to the stage-1 checkpoint (the backbone is unchanged)."""
        out = Path(out_dir)
        from fluid.checkpoint import link_backbone
        from fluid.hf_generate import write_entry

        self.head.save(out)
        meta = dataclasses.replace(self.checkpoint_meta(out), **fields)
        meta.write(out)
        link_backbone(out, meta.stage1_checkpoint)  # from_pretrained(out).generate decodes with the head
        write_entry(out)
        return out
