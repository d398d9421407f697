"""Callbacks the configs can add (``+callbacks.NAME={_target_: ...}``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch

from fluid.utils.errors import FluidRunError


class FiniteLoss(L.Callback):
    """Stop at the first NaN or inf training loss with one line naming the step (``fluid.train``
    adds it to every run), before the weights it would produce are exported or published."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise FluidRunError("optim.lr", f"the training loss is {loss.item()} at step {trainer.global_step}",
                                   "lower optim.lr or check the data; nothing was published")


class BatchLog(L.Callback):
    """Append ``{"step", "batch"}`` per training step to ``path`` (a fingerprint of the batch's
    token ids): what data a run saw, in which order, e.g. to check that a resumed run sees the
    batches an uninterrupted one does."""

    def __init__(self, path: str, key: str = "input_ids"):
        self.path, self.key = Path(path), key

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not trainer.is_global_zero:
            return
        digest = hashlib.sha1(batch[self.key].cpu().numpy().tobytes()).hexdigest()[:16]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch, "batch": digest}) + "\n")
