"""Checkpoints that a kill or a full disk cannot corrupt."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on the run's own filesystem: the checkpoint is
    written to a temporary file *beside* its destination, flushed to disk and renamed over it
    (``os.replace``). Lightning's own writer stages the file in the system temp directory, so on
    a cluster the final move is a cross-filesystem copy that a kill or a full disk leaves
    truncated. A failed write removes the temporary file and keeps the previous checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # object storage: Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                from fluid.utils.errors import FluidRunError

                raise FluidRunError("checkpoint", f"no space left writing {str(path)!r} ({e.strerror})",
                                    "free space, then resume with ckpt_path=last: the previous checkpoint is intact") from None
            raise


# ------------------------------------------------------------------ resuming: which checkpoint, and is it this run's
SIGNATURE_KEY = "fluid"  # what a training checkpoint records about the run that wrote it


def run_signature(cfg) -> dict:
    """What a checkpoint must share with the run that resumes from it: the stage, the backbone and
    how the adapter is applied (a stage-0 checkpoint resumed as stage 1 would be published as stage 1)."""
    from omegaconf import OmegaConf

    lora = bool(OmegaConf.select(cfg, "stage.module.lora.enabled", default=False))
    return {"stage": int(cfg.stage.id), "backbone": str(cfg.backbone.name), "lora": lora,
            "lora_scope": str(OmegaConf.select(cfg, "stage.module.lora.scope", default="all")) if lora else None}


def load_checkpoint_file(path: Path, key: str, weights_only: bool = False) -> Any:
    """``torch.load`` of a checkpoint file (memory-mapped, so a large file costs little); random
    bytes, a truncated file or another kind of pickle are one line naming ``key`` and the file."""
    from fluid.utils.errors import FluidConfigError

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, "failed finding central directory", ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FluidConfigError(key, f"{str(path)!r} is not a readable checkpoint ({type(e).__name__}: {first[:160]})",
                               "point at an intact checkpoint (a kill during a save leaves the previous one)") from None


def read_training_checkpoint(path: Path, key: str = "ckpt_path") -> dict:
    """The global step and signature a Lightning checkpoint file records."""
    from fluid.utils.errors import FluidConfigError

    path = Path(path)
    if path.is_dir():  # a DeepSpeed / FSDP checkpoint: its step is not in one file
        return {"global_step": None, SIGNATURE_KEY: None}
    ckpt = load_checkpoint_file(path, key)
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise FluidConfigError(key, f"{str(path)!r} is not a Lightning training checkpoint (no global_step)")
    return {"global_step": int(ckpt["global_step"]), SIGNATURE_KEY: ckpt.get(SIGNATURE_KEY)}


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    """``ckpt_path=last``: the newest checkpoint of a run directory, by the step recorded inside
    (``last.ckpt``, a versioned ``last-v1.ckpt`` an older release wrote, or the ``terminated.ckpt``
    of a SIGTERM, which is newer than ``last.ckpt``); ties go to the file written last."""
    ckpt_dir = Path(ckpt_dir)
    cands = [p for p in (*ckpt_dir.glob("last*.ckpt"), ckpt_dir / "terminated.ckpt") if p.exists()]
    if not cands:
        return None
    steps = {p: read_training_checkpoint(p)["global_step"] for p in cands}
    return max(cands, key=lambda p: (steps[p] if steps[p] is not None else -1, p.stat().st_mtime))


def remove_orphans(ckpt_dir: Path) -> list[Path]:
    """Temporary files a kill during a save left (``.NAME.tmpPID`` of a process that is gone):
    never a valid checkpoint. A live process's file (another run saving here) is left alone."""
    orphans = []
    for p in Path(ckpt_dir).glob(".*.tmp*") if Path(ckpt_dir).is_dir() else []:
        pid = p.name.rsplit(".tmp", 1)[-1]
        if p.is_file() and not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
            p.unlink(missing_ok=True)
            orphans.append(p)
    return orphans


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
