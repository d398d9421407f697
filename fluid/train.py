"""Training entry point: ``python -m fluid.train experiment=RECIPE`` or ``stage=0|1|2 backbone=... data=...``.

``train(cfg)`` instantiates data, module and trainer from the composed config, fits, exports
a Hugging Face checkpoint, evaluates on the test split and returns the flat metrics dict
that is also written to ``<run dir>/metrics.json``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fluid.config import CONF_DIR, register_resolvers, run_entry_point
from fluid.utils.build import instantiate, instantiate_dict
from fluid.utils.errors import FluidConfigError, one_line_errors

log = logging.getLogger("fluid.train")
register_resolvers()


def _strategy(cfg: DictConfig):
    if "_target_" in cfg.strategy:
        return instantiate(cfg.strategy, "strategy")
    return cfg.strategy.get("name", "auto")


def _publish(checkpoint_dir: Path, link: Path) -> None:
    """Point ``link`` (e.g. outputs/artifacts/tiny-ar) at this run's checkpoint."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(link.name + f".tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(checkpoint_dir.resolve(), target_is_directory=True)
    tmp.replace(link)
    log.info("published %s -> %s", link, checkpoint_dir)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _one_console_log() -> None:
    """Lightning gives its loggers a console handler of their own when it is imported; under
    Hydra, whose root handlers already print (and write train.log), every line came out twice."""
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:
                lg.removeHandler(h)
        lg.propagate = True


def train(cfg: DictConfig) -> dict[str, Any]:
    from fluid.utils.runinfo import git_revision, write_json, write_jsonl
    from fluid.validate import validate_train

    t0 = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = _recipe_line()
    log.info(recipe)  # the first line: which conf/experiment file shaped this run
    (run_dir / "config.yaml").write_text(f"# {recipe}\n" + OmegaConf.to_yaml(cfg, resolve=True))
    write_json(run_dir / "git.json", git_revision(Path(__file__).parent))
    metrics: dict[str, Any] = {"status": "failed"}
    trainer = None
    previous = _previous_status(run_dir) if _rank_zero(None) else None  # one rank reads and writes the status
    if previous is not None:
        metrics["previous_status"] = previous
    if _rank_zero(None):  # a kill -9 leaves this behind: the next start in the directory reports it
        write_json(run_dir / "metrics.json", {"status": "running", "pid": os.getpid()})
    try:
        validate_train(cfg)  # ranges, types, devices, the checkpoint's stage: before anything heavy
        import lightning as L  # with its imports about 8 s on 2 cores: a bad value is told before them

        _one_console_log()

        from fluid.convert import backbone_and_tokenizer, build_module, check_finite, export_meta, export_sharded, is_sharded
        from fluid.utils.callbacks import FiniteLoss
        from fluid.utils.ckpt_io import remove_orphans, run_signature

        resume, resume_step = _resume_from(cfg, run_dir)
        orphans = remove_orphans(run_dir / "checkpoints") if _rank_zero(None) else []
        if orphans:
            log.warning("removed %d temporary file(s) a kill during a save left: %s", len(orphans),
                        ", ".join(p.name for p in orphans))
        _apply_global_batch(cfg)
        L.seed_everything(cfg.seed, workers=True)
        spec, tokenizer, from_scratch = backbone_and_tokenizer(cfg)
        datamodule = instantiate(cfg.data, "data", tokenizer=tokenizer, _recursive_=True)
        module = build_module(cfg, spec, tokenizer)
        loggers = instantiate_dict(cfg.logger, "logger")
        if resume:
            _keep_csv_history(loggers, resume_step)
            # Lightning warns that a mid-epoch resume may repeat data unless the loader is stateful;
            # the training sampler (data/datamodule.ResumableSampler) continues from the restored batch count
            warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        callbacks = [c for c in instantiate_dict(cfg.get("callbacks"))  # logger=none: nothing to monitor into
                     if loggers or type(c).__name__ != "LearningRateMonitor"]
        strategy = _strategy(cfg)
        trainer = instantiate(cfg.trainer, "trainer", strategy=strategy, logger=loggers or False,
                              callbacks=[*callbacks, FiniteLoss()], plugins=_plugins(strategy))
        module.fluid_signature = run_signature(cfg)  # recorded in every checkpoint (resume checks it)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        metrics.update({k: v for k, v in trainer.callback_metrics.items()})
        if _needs_final_validation(trainer):  # val/* in metrics.json describe the final weights
            metrics.update(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
        metrics["train/steps"] = trainer.global_step
        metrics["train/wall_time_s"] = time.perf_counter() - t0
        rank0 = trainer.is_global_zero  # with several devices one process writes the run's files
        ckpt = run_dir / "checkpoint"
        if is_sharded(trainer.strategy):  # ZeRO-3 / FSDP: no rank holds the whole model; gather it
            export_sharded(trainer, cfg, run_dir, ckpt)
        elif rank0:
            check_finite(module)
            module.export_hf(ckpt, **export_meta(cfg))
        else:  # the other ranks test the model rank 0 exported
            module.as_exported()
        trainer.strategy.barrier()
        metrics["checkpoint_dir"] = str(ckpt.resolve())
        if cfg.get("test", True) and cfg.stage.get("run_test", True):
            test = trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(test[0] if test else {})
            records = _gather_records(trainer, module.test_records)
            if rank0:
                write_jsonl(run_dir / "test_predictions.jsonl", records)
        # only a run that completed (trained, exported with finite weights, tested) is published
        publish = cfg.stage.get("publish") or (spec.path if from_scratch else None)
        if rank0 and publish and cfg.get("publish", True):
            if _in_multirun():  # every job would repoint the same link and the last would win
                log.info("multirun: not publishing %s (pick a run and link it, or rerun it alone)", publish)
            else:
                _publish(ckpt, Path(publish))
        metrics["status"] = "completed"
    except BaseException as e:
        metrics["error"] = f"{type(e).__name__}: {e}"
        if type(e).__name__ == "SIGTERMException":  # how SLURM preempts: save what there is, exit non-zero
            metrics["status"] = "terminated"
            metrics["error"] = "SIGTERM received (preempted or cancelled)"
            saved = _save_on_signal(trainer, run_dir)
            if saved:
                metrics["terminated_checkpoint"] = saved
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        _finish_loggers(trainer)
        metrics["wall_time_s"] = time.perf_counter() - t0
        metrics["run_dir"] = str(run_dir.resolve())
        if _rank_zero(trainer):
            write_json(run_dir / "metrics.json", metrics)
    log.info("metrics: %s", {k: v for k, v in sorted(metrics.items())})
    return metrics


def _recipe_line() -> str:
    """``recipe: conf/experiment/NAME.yaml (experiment=NAME)``, or ``recipe: none``."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "recipe: unknown (composed outside a Hydra app)"
    name = HydraConfig.get().runtime.choices.get("experiment")
    if not name:
        return "recipe: none (the stage's own defaults; experiment=NAME applies conf/experiment/NAME.yaml)"
    return f"recipe: conf/experiment/{name}.yaml (experiment={name})"


def _apply_global_batch(cfg: DictConfig) -> None:
    """``data.global_batch_size=N``: the per-device batch (at most ``data.batch_size``) and the
    gradient accumulation follow from the device count, so one number fixes the optimisation."""
    from omegaconf import open_dict

    from fluid.validate import derive_batch, world_size

    global_batch = cfg.data.get("global_batch_size")
    if global_batch is None:
        return
    world = world_size(cfg)
    per_device, accumulate = derive_batch(global_batch, cfg.data.batch_size, world)
    with open_dict(cfg):
        cfg.data.batch_size, cfg.trainer.accumulate_grad_batches = per_device, accumulate
    log.info("global batch %d = %d devices x %d per device x %d accumulation", global_batch, world, per_device,
             accumulate)


def _plugins(strategy) -> list:
    """Atomic checkpoint writes, except where the strategy writes its own (DeepSpeed, FSDP)."""
    from fluid.utils.ckpt_io import AtomicCheckpointIO

    name = type(strategy).__name__ if not isinstance(strategy, str) else strategy
    return [] if "DeepSpeed" in name or "FSDP" in name or "deepspeed" in name or "fsdp" in name else [AtomicCheckpointIO()]


def _resume_from(cfg: DictConfig, run_dir: Path) -> tuple[str | None, int | None]:
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


def _keep_csv_history(loggers: list, resumed_step: int | None) -> None:
    """Lightning's CSVLogger deletes ``metrics.csv`` when it starts in a directory that has one: a
    resumed run keeps the rows its checkpoint's steps logged (later ones are logged again)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    for lg in loggers:
        path = Path(lg.log_dir) / "metrics.csv" if isinstance(lg, CSVLogger) else None
        if path is None or not path.is_file() or not _rank_zero(None):
            continue
        with open(path, newline="") as f:
            old = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        old = [r for r in old if resumed_step is None or int(float(r.get("step", 0))) < resumed_step]
        lg.experiment.metrics[:0] = old  # the writer deleted the file; its first save writes these first


def _previous_status(run_dir: Path) -> str | None:
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


def _save_on_signal(trainer, run_dir: Path) -> str | None:
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


def _gather_records(trainer, records: list[dict]) -> list[dict]:
    """Every rank's test records, in rank order (one device: its own)."""
    if trainer.world_size == 1:
        return records
    import torch.distributed as dist

    parts = [None] * trainer.world_size
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


def _rank_zero(trainer) -> bool:
    if trainer is not None:
        return trainer.is_global_zero
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _finish_loggers(trainer) -> None:
    """Close W&B runs: in a multirun every job must get its own run (and flush offline files)."""
    for logger in getattr(trainer, "loggers", None) or []:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


def _needs_final_validation(trainer) -> bool:
    """True when validation is on but its last run was before the final step (for example
    ``trainer.max_steps=40`` with validation every 250 steps)."""
    interval = trainer.val_check_interval
    if trainer.fast_dev_run or not trainer.limit_val_batches or not isinstance(interval, int) or interval < 1:
        return False
    return trainer.global_step > 0 and trainer.global_step % interval != 0


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@one_line_errors
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


def main() -> None:
    run_entry_point("train", _hydra_main)


if __name__ == "__main__":
    main()
