"""Sharded training checkpoints -> the merged Hugging Face export.

Under DeepSpeed ZeRO-3 or FSDP no rank holds the whole model, so a run's weights exist only as
shards. ``fluid.train`` gathers them itself at the end of a run (ZeRO-3: a final checkpoint
converted on rank 0; FSDP: a full state dict on rank 0); this module is that conversion, and
its command converts any checkpoint a run left behind (a killed or preempted one too)::

    python -m fluid.convert RUN_DIR                       # RUN_DIR/checkpoints/last.ckpt -> RUN_DIR/checkpoint
    python -m fluid.convert RUN_DIR --ckpt RUN_DIR/checkpoints/terminated.ckpt --out DIR

The checkpoint may be a DeepSpeed ZeRO-2/3 directory (Lightning writes ``last.ckpt/`` as one)
or a plain Lightning ``.ckpt`` file (DDP, FSDP with ``state_dict_type: full``). The model is
rebuilt on CPU from the run's own ``config.yaml``, the fp32 weights are loaded into it (every
key must match), checked finite and exported exactly as an unsharded run exports: the merged
backbone (LoRA folded in) + tokenizer + ``fluid.json`` for stages 0/1, the head for stage 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fluid.utils.build import build
from fluid.utils.errors import FluidConfigError, FluidRunError, one_line_errors

log = logging.getLogger("fluid.convert")
# wrappers that may prefix a module's keys in a gathered state dict (Lightning < 2.1, FSDP)
_WRAPPER_PREFIXES = ("_forward_module.", "module.")


# ------------------------------------------------------------------ building the run's module
def backbone_and_tokenizer(cfg: DictConfig):
    """The run's backbone spec and tokenizer (stage 2: the stage-1 checkpoint's), and whether the
    backbone is trained from scratch (stage 0 of an embedded backbone)."""
    from fluid.backbones.spec import BackboneSpec

    spec = BackboneSpec.from_config(cfg.backbone)
    if cfg.stage.get("init_checkpoint"):  # stage 2 starts from the stage-1 checkpoint
        spec = dataclasses.replace(spec, path=cfg.stage.init_checkpoint, scratch=None, prepare=None)
    from_scratch = cfg.stage.id == 0 and spec.is_embedded
    return spec, spec.load_tokenizer(from_scratch=from_scratch), from_scratch


def stage_kwargs(cfg: DictConfig) -> dict:
    """Stage-specific groups a module consumes (masking for stage 1, tau for stage 2)."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) for k in cfg.stage.get("consumes", [])}


def build_module(cfg: DictConfig, spec=None, tokenizer=None):
    """The run's LightningModule (its model is built later, by ``configure_model``)."""
    if spec is None:
        spec, tokenizer, _ = backbone_and_tokenizer(cfg)
    return build(cfg.stage.module, backbone=spec, tokenizer=tokenizer, **stage_kwargs(cfg))


def export_meta(cfg: DictConfig) -> dict:
    return {"data": cfg.data.name, "seed": cfg.seed}


def check_finite(module) -> None:
    """Weights with a NaN or inf are never exported or published."""
    import torch

    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise FluidRunError("optim.lr", f"the trained weights are not finite ({name})",
                                   "lower optim.lr or check the data; nothing was published")


# ------------------------------------------------------------------ sharded state -> full state
def is_sharded(strategy) -> bool:
    """True where no rank's module holds the whole model: DeepSpeed ZeRO-3 and FSDP. ZeRO-2
    shards only the optimizer state and gradients; its weights are whole on every rank."""
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        return bool(getattr(strategy, "zero_stage_3", False))
    return "FSDP" in name


def full_state_dict(ckpt: str | Path) -> dict:
    """The fp32 weights of a training checkpoint: a DeepSpeed ZeRO directory (merged from its
    shards) or a Lightning ``.ckpt`` file."""

    ckpt = Path(ckpt)
    if ckpt.is_dir():
        if not (ckpt / "latest").exists():
            raise FluidConfigError("ckpt", f"{str(ckpt)!r} is a directory but not a DeepSpeed checkpoint (no 'latest')")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    elif ckpt.is_file():
        from fluid.utils.ckpt_io import load_checkpoint_file

        loaded = load_checkpoint_file(ckpt, "ckpt", weights_only=True)
        state = loaded.get("state_dict") if isinstance(loaded, dict) else None
        if state is None:
            raise FluidConfigError("ckpt", f"{str(ckpt)!r} has no 'state_dict' (not a Lightning checkpoint)")
    else:
        raise FluidConfigError("ckpt", f"{str(ckpt)!r} does not exist")
    return {_strip(k): v for k, v in state.items()}


def _strip(key: str) -> str:
    key = key.replace("_fsdp_wrapped_module.", "")
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def export_state_dict(cfg: DictConfig, state: dict, out: str | Path) -> Path:
    """Rebuild the run's module on CPU, load ``state`` (all keys), export as the run would."""
    import torch

    _whole_models()
    module = build_module(cfg)
    module.configure_model()
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise FluidConfigError("ckpt", f"the checkpoint does not fit the run's config.yaml: {len(missing)} missing "
                               f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    module.load_state_dict({k: v.to(own[k].dtype) if torch.is_tensor(v) else v for k, v in state.items()})
    check_finite(module)
    return module.export_hf(Path(out), **export_meta(cfg))


def _whole_models() -> None:
    """The rebuilt module is an ordinary CPU model: after a ZeRO-3 run in this process,
    transformers must stop building models partitioned (``FluidModule.announce_zero3``)."""
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def export_sharded(trainer, cfg: DictConfig, run_dir: Path, out: Path) -> None:
    """At the end of a ZeRO-3 / FSDP run: gather the weights onto rank 0 and export them. Every
    rank must call this (saving and gathering are collective)."""
    strategy = trainer.strategy
    if "DeepSpeed" in type(strategy).__name__:
        final = run_dir / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(final)  # each rank writes its shards
        strategy.barrier()
        state = full_state_dict(final) if trainer.is_global_zero else None
    else:
        state = strategy.lightning_module_state_dict()  # full on rank 0 (state_dict_type: full)
        state = {_strip(k): v for k, v in state.items()} if trainer.is_global_zero else None
    if trainer.is_global_zero:
        export_state_dict(cfg, state, out)
        log.info("exported the gathered weights to %s", out)


# ------------------------------------------------------------------ command
def convert(run_dir: str, ckpt: str | None = None, out: str | None = None) -> Path:
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FluidConfigError("run_dir", f"{run_dir!r} has no config.yaml (give the run directory fluid.train wrote)")
    cfg = OmegaConf.load(run / "config.yaml")
    path = Path(ckpt) if ckpt else run / "checkpoints" / "last.ckpt"
    dest = Path(out) if out else run / "checkpoint"
    exported = export_state_dict(cfg, full_state_dict(path), dest)
    print(f"converted {path} -> {exported}")
    return exported


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fluid.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the run directory (it holds config.yaml and checkpoints/)")
    p.add_argument("--ckpt", help="the checkpoint (default RUN_DIR/checkpoints/last.ckpt; a DeepSpeed dir or a .ckpt)")
    p.add_argument("--out", help="where the HF export goes (default RUN_DIR/checkpoint)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert(a.run_dir, a.ckpt, a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
