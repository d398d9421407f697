"""Resuming a run and what a run leaves in its directory: which checkpoint ``ckpt_path`` means and
whether it may be resumed here, the CSV history a resumed run keeps, the status a killed run left,
the checkpoint a terminated run saves. (The checkpoint files themselves: :mod:`fluid.utils.ckpt_io`.)"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from fluid.utils.errors import FluidConfigError
from fluid.utils.runinfo import rank_zero

log = logging.getLogger("fluid.train")


def resume_from(cfg: DictConfig, run_dir: Path) -> tuple[str | None, int | None]:
    """(file, its step). ``ckpt_path=last``: this run directory's newest checkpoint (by the step inside);
    ``ckpt_path=FILE``: that file. Refused in one line, before any work: a file that is not a
    readable checkpoint, one another stage, backbone or adapter setting wrote, and one that is
    already at ``trainer.max_steps`` (it would train nothing and publish its weights as new)."""
    from fluid.utils.ckpt_io import SIGNATURE_KEY, newest_checkpoint, read_training_checkpoint, run_signature

    want = cfg.get("ckpt_path")
    if not want:
        return None, None
    path = newest_checkpoint(run_dir / "checkpoints") if want == "last" else Path(want)
    if path is None or not path.exists():  # a file, or a directory where DeepSpeed saved one
        raise FluidConfigError("ckpt_path", f"{str(path or run_dir / 'checkpoints' / 'last.ckpt')!r} does not exist",
                               "resume in the run's own directory (hydra.run.dir=RUN_DIR ckpt_path=last) or give a .ckpt file")
    info = read_training_checkpoint(path)
    sig, mine = info[SIGNATURE_KEY], run_signature(cfg)
    if sig is not None and sig != mine:
        diff = ", ".join(f"{k} {sig.get(k)!r} (this run: {mine[k]!r})" for k in mine if sig.get(k) != mine[k])
        raise FluidConfigError("ckpt_path", f"{str(path)!r} was written by another run: {diff}",
                               "resume with that run's settings, or start a new run without ckpt_path")
    if sig is None and info["global_step"] is not None:
        log.warning("%s records no stage or backbone (an older checkpoint): resuming unchecked", path)
    step, max_steps = info["global_step"], int(cfg.trainer.max_steps)
    if step is not None and max_steps > 0 and step >= max_steps:
        raise FluidConfigError("ckpt_path", f"{str(path)!r} is already at step {step}, and trainer.max_steps is "
                               f"{max_steps}: nothing to train", "raise stage.max_steps to train further")
    log.info("resuming from %s (step %s)", path, step)
    return str(path), step


def keep_csv_history(loggers: list, resumed_step: int | None) -> None:
    """Lightning's CSVLogger deletes ``metrics.csv`` when it starts in a directory that has one: a
    resumed run keeps the rows its checkpoint's steps logged (later ones are logged again)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    for lg in loggers:
        path = Path(lg.log_dir) / "metrics.csv" if isinstance(lg, CSVLogger) else None
        if path is None or not path.is_file() or not rank_zero(None):
            continue
        with open(path, newline="") as f:
            old = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        old = [r for r in old if resumed_step is None or int(float(r.get("step", 0))) < resumed_step]
        lg.experiment.metrics[:0] = old  # the writer deleted the file; its first save writes these first


def previous_status(run_dir: Path) -> str | None:
    """What the last run in ``run_dir`` left: ``killed`` when it was still running and its
    process is gone (kill -9, out of memory, a lost node)."""
    import json

    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    try:
        prev = json.loads(path.read_text())
    except json.JSONDecodeError:
        return "unreadable"
    if prev.get("status") == "running":
        pid = prev.get("pid")
        try:
            alive = pid is not None and pid != os.getpid() and (os.kill(pid, 0) or True)
        except OSError:
            alive = False
        status = "running elsewhere" if alive else "killed"
        log.warning("%s: the previous run here ended without a status: %s", run_dir, status)
        return status
    return prev.get("status")


def save_on_signal(trainer, run_dir: Path) -> str | None:
    """A checkpoint of where a terminated run got to (``checkpoints/terminated.ckpt``)."""
    if trainer is None or trainer.global_step == 0:
        return None
    path = run_dir / "checkpoints" / "terminated.ckpt"
    try:
        trainer.save_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - the run is ending anyway; say why nothing was saved
        log.warning("SIGTERM: could not save %s: %s", path, e)
        return None
    return str(path)
