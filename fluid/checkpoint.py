"""One way to save and load a FLUID model.

A FLUID checkpoint is a directory that other tools can read as well:

* stage 0 and stage 1: a plain Hugging Face directory (model + tokenizer) plus ``fluid.json``;
* stage 2: only the K-head (``khead.safetensors``) plus ``fluid.json``, whose
  ``stage1_checkpoint`` points at the stage-1 directory the head was trained on;
* any Hugging Face causal-LM directory without ``fluid.json`` (no MASK token unless its
  tokenizer has one: it can be decoded with ``decode.algorithm=ar``).

:class:`CheckpointMeta` is ``fluid.json``: one writer (:meth:`CheckpointMeta.write`), one reader
(:meth:`CheckpointMeta.read`). :func:`load_fluid` returns backbone, head (or None), tokenizer
and metadata for each kind; :func:`mask_token_id` is where a checkpoint's MASK id is decided.
Nothing here imports a LightningModule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluid import exact
from fluid.backbones.tokens import pad_token_id
from fluid.utils.errors import FluidConfigError

log = logging.getLogger(__name__)

FLUID_JSON = "fluid.json"
HEAD_FILE = "khead.safetensors"


@dataclass
class CheckpointMeta:
    """What ``fluid.json`` records about a checkpoint (``None``: not recorded / not applicable)."""

    stage: int | None = None                # 0, 1, 2; None for a plain HF directory
    source_backbone: str | None = None      # the backbone config it was trained from (``backbone.name``)
    source_path: str | None = None          # that backbone's checkpoint location
    mask_token: str | None = None
    mask_token_id: int | None = None
    horizon: int | None = None              # lane length k_max (stage 1) / K-head classes (stage 2)
    masking: dict | None = None             # the stage-1 lane schedule
    adapter_dir: str | None = None          # stage 1 with LoRA: the adapter beside the merged model
    lane_adapter: str | None = None         # stage 1 in exact mode: its adapter folder inside (fluid.exact)
    stage1_checkpoint: str | None = None    # stage 2: the frozen backbone the head belongs to
    head_file: str | None = None            # stage 2: the head's file in this directory
    tau: float | None = None                # stage 2: the K* threshold
    sigma: float | None = None              # stage 2: soft-label width
    histograms: dict | None = None          # stage 2: target / predicted horizon counts (validation)
    data: str | None = None                 # the data config it was trained on (``data.name``)
    seed: int | None = None
    extra: dict = field(default_factory=dict)  # keys written by a newer version, kept on a rewrite

    @classmethod
    def read(cls, directory: str | Path) -> "CheckpointMeta":
        """The metadata of ``directory`` (all fields None when it has no ``fluid.json``)."""
        path = Path(directory) / FLUID_JSON
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FluidConfigError("checkpoint", f"{str(path)!r} is not valid JSON ({e.msg})") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        if extra:
            log.info("%s: keys this version does not use: %s", path, sorted(extra))
        return cls(**data, extra=extra)

    def write(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra" and v is not None}
        data.update(self.extra)
        (out / FLUID_JSON).write_text(json.dumps(data, indent=2) + "\n")
        return out / FLUID_JSON


def mask_token_id(meta: CheckpointMeta | int | None, tokenizer) -> int | None:
    """The MASK id to use: the one training recorded (a checkpoint's metadata, or an id given
    explicitly), else the tokenizer's own. Stage 1 decides it (``resolve_mask_token``) and
    records it in ``fluid.json``; everything after reads it through this function."""
    recorded = meta.mask_token_id if isinstance(meta, CheckpointMeta) else meta
    return recorded if recorded is not None else tokenizer.mask_token_id


def link_backbone(stage2_dir: str | Path, stage1_dir: str | Path) -> None:
    """Make a stage-2 directory loadable as a model too (``from_pretrained(stage2_dir)``, for
    ``model.generate``): relative links to the stage-1 directory's model and tokenizer files."""
    import os
    import shutil

    out, src = Path(stage2_dir), Path(stage1_dir).resolve()
    for f in src.iterdir():
        dst = out / f.name
        if dst.is_symlink() and not dst.exists():  # a link left dangling by a moved stage-1 directory
            dst.unlink()
        if not f.is_file() or f.name == FLUID_JSON or dst.exists():
            continue
        try:
            (out / f.name).symlink_to(os.path.relpath(f, out.resolve()))
        except OSError:  # a filesystem without links: a copy
            shutil.copy2(f, out / f.name)


def align_special_tokens(model, tokenizer) -> None:
    """Make the model's config and generation config name the tokenizer's BOS/EOS/PAD ids, so
    that other tools (Hugging Face ``generate``, vLLM, lm-eval) stop where this project does."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": pad_token_id(tokenizer)}
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for k, v in ids.items():
            setattr(cfg, k, v)


@dataclass
class FluidModel:
    model: torch.nn.Module                  # the causal LM (eval mode)
    head: torch.nn.Module | None            # the K-head of a stage-2 checkpoint
    tokenizer: object
    meta: CheckpointMeta
    path: Path

    @property
    def mask_token_id(self) -> int | None:
        return mask_token_id(self.meta, self.tokenizer)


def backbone_dir(path: str | Path) -> tuple[Path, CheckpointMeta]:
    """The directory holding the model weights of checkpoint ``path`` (a stage-2 checkpoint's
    stage-1 directory) and the metadata of ``path`` itself."""
    path = Path(path)
    if not path.exists():
        raise FluidConfigError("checkpoint", f"{str(path)!r} does not exist", "run stages 0-2 first or point at one")
    meta = CheckpointMeta.read(path)
    if meta.stage != 2:
        return path, meta
    base = Path(meta.stage1_checkpoint or "")
    if not meta.stage1_checkpoint or not base.exists():
        raise FluidConfigError("checkpoint", f"the stage-1 directory {meta.stage1_checkpoint!r} of stage-2 checkpoint "
                               f"{str(path)!r} does not exist", "retrain stage 2 on an existing stage-1 checkpoint")
    return base, meta


def load_fluid(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               model: torch.nn.Module | None = None) -> FluidModel:
    """Backbone, K-head (stage 2, else None), tokenizer and metadata of a FLUID or plain HF directory.
    ``model``: the backbone already loaded from it (``model.generate``), used instead of a second copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fluid.khead.head import KHead

    base, meta = backbone_dir(path)
    try:
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise FluidConfigError("checkpoint", f"cannot load a model from {str(base)!r}: {str(e).splitlines()[0]}") from None
    model = exact.attach(model, base).eval()  # exact mode: the gated adapter (its plain forward is the original)
    head = None
    if meta.stage == 2:
        head = KHead.load(Path(path) / (meta.head_file or HEAD_FILE)).to(device=device, dtype=dtype).eval()
    return FluidModel(model=model, head=head, tokenizer=tokenizer, meta=meta, path=Path(path))
