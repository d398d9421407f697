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
from fluid.utils.errors import one_line_errors
from fluid.utils.resume import keep_csv_history, previous_status, resume_from, save_on_signal
from fluid.utils.runinfo import git_revision, rank_zero, write_json, write_jsonl

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
    previous = previous_status(run_dir) if rank_zero(None) else None  # one rank reads and writes the status
    if previous is not None:
        metrics["previous_status"] = previous
    if rank_zero(None):  # a kill -9 leaves this behind: the next start in the directory reports it
        write_json(run_dir / "metrics.json", {"status": "running", "pid": os.getpid()})
    try:
        validate_train(cfg)  # ranges, types, devices, the checkpoint's stage: before anything heavy
        import lightning as L  # with its imports about 8 s on 2 cores: a bad value is told before them

        _one_console_log()

        from fluid.convert import backbone_and_tokenizer, build_module, check_finite, export_meta, export_sharded, is_sharded
        from fluid.utils.callbacks import FiniteLoss
        from fluid.utils.ckpt_io import remove_orphans, run_signature

        resume, resume_step = resume_from(cfg, run_dir)
        orphans = remove_orphans(run_dir / "checkpoints") if rank_zero(None) else []
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
            keep_csv_history(loggers, resume_step)
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
            saved = save_on_signal(trainer, run_dir)
            if saved:
                metrics["terminated_checkpoint"] = saved
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        _finish_loggers(trainer)
        metrics["wall_time_s"] = time.perf_counter() - t0
        metrics["run_dir"] = str(run_dir.resolve())
        if rank_zero(trainer):
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


def _gather_records(trainer, records: list[dict]) -> list[dict]:
    """Every rank's test records, in rank order (one device: its own)."""
    if trainer.world_size == 1:
        return records
    import torch.distributed as dist

    parts = [None] * trainer.world_size
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


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
