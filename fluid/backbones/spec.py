"""A backbone is a *spec* (where the weights are, dtype, mask token), built inside a module.

Keeping the backbone a small serialisable record, rather than a built model, is what lets
``configure_model`` build a 7B model lazily under DeepSpeed ZeRO-3 and keeps checkpoints
of hyper-parameters tiny.

Two kinds of backbone exist:

* **pretrained** (``path`` set): a Hugging Face directory or hub id, loaded with
  ``from_pretrained`` (tokenizer from the same place unless ``tokenizer`` says otherwise);
* **embedded** (``scratch`` set as well): a small architecture config and a tokenizer
  recipe. Stage 0 trains it from random weights and publishes the result at ``path``;
  every later stage loads ``path`` like any pretrained checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from fluid.utils.errors import FluidConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(path) or path.count("/") != 1


@dataclass
class BackboneSpec:
    name: str
    path: str | None = None
    scratch: dict | None = None
    tokenizer: Any = None
    dtype: str = "auto"
    mask_token: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    prepare: str | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> "BackboneSpec":
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        data.pop("_target_", None)
        known = list(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise FluidConfigError(f"backbone.{key}", "is not a backbone setting",
                                       f"a backbone config holds only {', '.join(known)}; how a stage trains "
                                       "it belongs in a recipe, conf/experiment/NAME.yaml")
        spec = cls(**data)
        spec.validate()
        return spec

    # ------------------------------------------------------------------ checks
    @property
    def is_embedded(self) -> bool:
        return self.scratch is not None

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        if self.dtype not in DTYPES:
            raise FluidConfigError("backbone.dtype", f"unknown dtype {self.dtype!r}", f"use one of auto, {', '.join(DTYPES)}")
        return DTYPES[self.dtype]

    def validate(self) -> None:
        if self.path is None and self.scratch is None:
            raise FluidConfigError("backbone.path", "is not set", "give a local HF directory or a hub id")
        self.torch_dtype()
        if self.prepare is not None:
            try:
                get_method(self.prepare)
            except Exception as e:  # noqa: BLE001 - hydra raises several types
                raise FluidConfigError("backbone.prepare", f"cannot import {self.prepare!r}: {e}") from None

    def resolved_path(self, *, require: bool = True) -> str | None:
        """The checkpoint location, produced on demand by ``prepare`` when missing."""
        path = os.path.expanduser(self.path) if self.path else None
        if path and not os.path.exists(path) and self.prepare and _looks_local(path):
            log.info("backbone %s: preparing %s", self.name, path)
            get_method(self.prepare)(path)
        if require and path and _looks_local(path) and not os.path.exists(path):
            fix = ("run stage 0 first (python -m fluid.train experiment=tiny_stage0) or point backbone.path at a checkpoint"
                   if self.is_embedded else "point backbone.path at a local Hugging Face directory or a hub id")
            raise FluidConfigError("backbone.path", f"checkpoint {path!r} does not exist", fix)
        return path

    # ---------------------------------------------------------------- building
    def load_tokenizer(self, *, from_scratch: bool = False):
        from transformers import AutoTokenizer

        if from_scratch:
            if not isinstance(self.tokenizer, dict) or "_target_" not in self.tokenizer:
                raise FluidConfigError("backbone.tokenizer", "an embedded backbone needs a tokenizer recipe with _target_")
            tok = instantiate(self.tokenizer)
        else:
            src = self.tokenizer if isinstance(self.tokenizer, str) else self.resolved_path()
            try:
                tok = AutoTokenizer.from_pretrained(src, trust_remote_code=self.trust_remote_code)
            except (OSError, ValueError) as e:
                raise FluidConfigError("backbone.path", f"cannot load a tokenizer from {src!r}: {str(e).splitlines()[0]}",
                                       "check the path, or pre-download the model when the hub is unreachable") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def build_model(self, *, from_scratch: bool = False, vocab_size: int | None = None):
        """Instantiate the causal LM (random weights from ``scratch`` or ``from_pretrained``)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = self.torch_dtype()
        if from_scratch:
            if self.scratch is None:
                raise FluidConfigError("backbone.scratch", "this backbone has no scratch config", "train from a checkpoint")
            scratch = copy.deepcopy(self.scratch)
            model_type = scratch.pop("model_type", "llama")
            config = AutoConfig.for_model(model_type, **scratch)
            if vocab_size is not None:
                config.vocab_size = vocab_size
            config._attn_implementation = self.attn_implementation
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
            return model
        path = self.resolved_path()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=self.trust_remote_code,
                attn_implementation=self.attn_implementation,
            )
        except OSError as e:
            raise FluidConfigError("backbone.path", f"cannot load a model from {path!r}: {str(e).splitlines()[0]}",
                                   "check the path, or pre-download the model when the hub is unreachable") from None
        from fluid import exact

        return exact.attach(model, path)  # an exact-mode stage-1 checkpoint: its gated adapter too
