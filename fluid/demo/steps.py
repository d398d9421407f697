"""The demo's steps: each one process (``python -m fluid.train`` / ``fluid.evaluate``) with its
resolved config and a fingerprint (a hash of that config and of the fingerprints of the steps it
reads from); a step whose fingerprint matches its last completed run is reused."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fluid.demo.rows import settings_override
from fluid.utils.errors import FluidConfigError, FluidRunError
from fluid.utils.signals import Terminated

CHILD_GRACE_S = 60  # how long a step may take to save and stop after the demo passes it a signal
STEPS = ("stage0", "stage1", "stage2", "eval_prior", "eval_fluid")


def compose(config_name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    """The config ``python -m fluid.<config_name> OVERRIDES`` would run with, with the run's own
    directory in ``paths.output_dir`` and no ``hydra`` node."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from fluid.utils.compose import compose as compose_config

    cfg = compose_config(config_name, list(overrides))
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def fingerprint(cfg: DictConfig, upstream: list[str]) -> str:
    text = OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True) + "\n".join(upstream)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Step:
    """One process of the pipeline: ``python -m fluid.<module> OVERRIDES hydra.run.dir=DIR``."""

    def __init__(self, name: str, module: str, config_name: str, overrides: list[str], out_dir: Path,
                 upstream: list["Step"]):
        self.name, self.module, self.overrides = name, module, overrides
        self.run_dir = out_dir / name
        self.upstream = upstream
        self.cfg = compose(config_name, overrides, self.run_dir)
        self.fingerprint = fingerprint(self.cfg, [s.fingerprint for s in upstream])

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.json"

    def metrics(self) -> dict:
        return json.loads(self.metrics_path.read_text()) if self.metrics_path.exists() else {}

    def reusable(self) -> bool:
        stamp = self.run_dir / "fingerprint"
        return (stamp.exists() and stamp.read_text().strip() == self.fingerprint
                and self.metrics().get("status") == "completed"
                and (self.module != "train" or (self.run_dir / "checkpoint" / "fluid.json").exists()))

    def run(self, force: bool) -> dict[str, Any]:
        """Run the step, or reuse its last run (``force``: never reuse; set when a step it reads
        from ran again)."""
        if not force and self.reusable():
            m = self.metrics()
            print(f"[demo] {self.name}: unchanged (same config and inputs as {self.run_dir}), reusing it", flush=True)
            return {"seconds": 0.0, "reused": True, "original_seconds": m.get("wall_time_s")}
        (self.run_dir / "fingerprint").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", f"fluid.{self.module}", *self.overrides, f"hydra.run.dir={self.run_dir}"]
        print(f"[demo] {self.name}: {' '.join(['python', '-m', f'fluid.{self.module}', *self.overrides])}", flush=True)
        t0 = time.perf_counter()
        log_path = self.run_dir.parent / f"{self.name}.log"
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as logf:
            child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
            try:
                child.wait()
            except Terminated as e:  # the demo was told to stop: so is its step (it saves what it has)
                child.send_signal(e.signum)
                try:
                    child.wait(timeout=CHILD_GRACE_S)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                print(f"[demo] {self.name}: stopped ({e}); see {log_path}", flush=True)
                raise
        r = child
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
            kind = FluidConfigError if r.returncode == FluidConfigError.exit_code else FluidRunError  # the child's kind
            raise kind(self.name, f"failed with exit code {r.returncode}: {tail[0]}", f"see {log_path}")
        (self.run_dir / "fingerprint").write_text(self.fingerprint + "\n")
        print(f"[demo] {self.name}: done in {seconds:.0f} s (log: {log_path})", flush=True)
        return {"seconds": seconds, "reused": False}


def recipes(demo: DictConfig) -> list[str]:
    """``experiment=NAME`` for stage 0, 1 and 2 (``demo.recipes``), each checked to be that stage's."""
    from fluid.config import experiment_choices, group_options

    names = list(demo.recipes)
    if len(names) != 3:
        raise FluidConfigError("recipes", f"names {len(names)} recipes", "name one for each of stages 0, 1 and 2")
    for stage, name in enumerate(names):
        if name not in group_options("experiment"):
            raise FluidConfigError("recipes", f"{name!r} is not a recipe", "see conf/experiment")
        if experiment_choices(name).get("stage") != str(stage):
            raise FluidConfigError("recipes", f"{name!r} is not a stage-{stage} recipe",
                                   "list the recipes of stage 0, 1 and 2 in that order")
    return [f"experiment={name}" for name in names]


def pipeline(demo: DictConfig) -> list[Step]:
    out = Path(demo.out_dir).resolve()
    train = list(demo.train)
    r0, r1, r2 = recipes(demo)
    s0 = Step("stage0", "train", "train", [r0, *train, *demo.stage0], out, [])
    ckpt0 = s0.run_dir / "checkpoint"
    s1 = Step("stage1", "train", "train", [r1, f"backbone.path={ckpt0}", *train, *demo.stage1], out, [s0])
    ckpt1 = s1.run_dir / "checkpoint"
    s2 = Step("stage2", "train", "train", [r2, f"stage.init_checkpoint={ckpt1}", *train, *demo.stage2], out, [s1])
    ev = list(demo.evaluate.overrides)
    e0 = Step("eval_prior", "evaluate", "evaluate", [f"checkpoint={ckpt0}", *ev, "~settings", "+settings={}"], out, [s0])
    e2 = Step("eval_fluid", "evaluate", "evaluate",
              [f"checkpoint={s2.run_dir / 'checkpoint'}", *ev, "~settings", f"+settings={settings_override(demo)}"], out, [s2])
    return [s0, s1, s2, e0, e2]
