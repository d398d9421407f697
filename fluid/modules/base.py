"""What every FLUID LightningModule shares: the backbone spec, optimiser, test-time greedy
accuracy and Hugging Face export. Subclasses add only their loss."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import lightning as L

from fluid.backbones.spec import BackboneSpec
from fluid.checkpoint import CheckpointMeta, align_special_tokens
from fluid.decoding.ar import greedy_generate
from fluid.eval.answers import exact_match
from fluid.modules.optim import OptimConfig, build_optimizer


class FluidModule(L.LightningModule):
    stage_id: int = -1

    fluid_signature: dict | None = None  # set by fluid.train: stage, backbone, adapter (utils/ckpt_io.run_signature)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.fluid_signature is not None:  # what a resume from this checkpoint is checked against
            from fluid.utils.ckpt_io import SIGNATURE_KEY

            checkpoint[SIGNATURE_KEY] = dict(self.fluid_signature)

    def __init__(self, backbone: BackboneSpec, tokenizer, optim: dict | None = None,
                 eval_max_new_tokens: int = 128, gradient_checkpointing: bool = False):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.spec, self.tokenizer = backbone, tokenizer
        self.optim_cfg = OptimConfig(**(optim or {}))
        self.eval_max_new_tokens = eval_max_new_tokens
        self.model = None
        self.test_records: list[dict[str, Any]] = []
        self.save_hyperparameters({"backbone": vars(backbone), "optim": vars(self.optim_cfg),
                                   "eval_max_new_tokens": eval_max_new_tokens})

    def checkpoint_activations(self, model):
        """``gradient_checkpointing=true``: recompute each decoder layer's activations in the
        backward pass instead of keeping them (less memory for long lane-expanded rows, about a
        third more compute); the same loss and gradients."""
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model

    def announce_zero3(self) -> None:
        """Call before building the backbone in ``configure_model``. Under DeepSpeed ZeRO-3
        Lightning runs that hook inside ``deepspeed.zero.Init``, where every parameter is born
        partitioned (empty): ``from_pretrained`` must know, or it loads the weights into empty
        tensors and fails on the size mismatch. An ``HfDeepSpeedConfig`` of the strategy's
        (formatted) config tells it to load and resize through gathered parameters; transformers
        keeps only a weak reference, so the module holds it."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if "DeepSpeed" in type(strategy).__name__ and getattr(strategy, "zero_stage_3", False):
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(strategy.config)

    # -------------------------------------------------------------- training
    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1
        return build_optimizer(self.parameters(), self.optim_cfg, max(1, total))

    # ------------------------------------------------------------------ test
    def test_step(self, batch: dict, batch_idx: int) -> None:
        res = greedy_generate(self.model, batch["prompt_ids"], max_new_tokens=self.eval_max_new_tokens,
                              eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        correct = 0
        for toks, ref in zip(res.tokens, batch["answers"]):
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            ok = exact_match(text, ref)
            correct += ok
            self.test_records.append({"completion": text, "reference": ref, "correct": bool(ok)})
        n = len(batch["answers"])
        self.log("test/accuracy", correct / n, batch_size=n, on_epoch=True, sync_dist=True)

    # ---------------------------------------------------------------- export
    def checkpoint_meta(self, out: Path) -> CheckpointMeta:
        """What ``fluid.json`` says about this stage's checkpoint at ``out``."""
        return CheckpointMeta(stage=self.stage_id, source_backbone=self.spec.name, source_path=self.spec.path,
                              mask_token=self.tokenizer.mask_token, mask_token_id=self.tokenizer.mask_token_id)

    def as_exported(self) -> None:
        """``self.model`` as :meth:`export_hf` leaves it, without writing (a stage that changes
        its model for export, such as stage 1 merging its LoRA, overrides this)."""

    def export_hf(self, out_dir: str | os.PathLike, **fields) -> Path:
        """Save model + tokenizer as a plain Hugging Face directory (+ ``fluid.json``); ``fields``
        are further :class:`CheckpointMeta` fields (the run's data and seed)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        align_special_tokens(self.model, self.tokenizer)
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        dataclasses.replace(self.checkpoint_meta(out), **fields).write(out)
        if self.stage_id >= 1:  # model.generate decodes with FLUID (fluid/hf_generate.py)
            from fluid.hf_generate import write_entry

            write_entry(out)
        return out
