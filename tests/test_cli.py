"""The command line: bad overrides and missing checkpoints fail with one line, not a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fluid.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "FLUID_ROOT": str(cwd)})


def test_unknown_backbone_fails_with_one_line(tmp_path):
    r = _run_cli("backbone=nope", cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "backbone=nope" in lines[0] and "tiny" in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_checkpoint_fails_with_one_line(tmp_path):
    r = _run_cli("stage=0", "backbone=qwen2_5_0_5b", "backbone.path=/does/not/exist", "logger=csv",
                 f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: backbone.path:") and "/does/not/exist" in err[-1]
    assert "Traceback" not in r.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_package_root_is_the_repo():
    """The imported package and the configs it composes are this checkout's (not an installed copy)."""
    from omegaconf import OmegaConf

    import fluid
    from fluid.config import CONF_DIR

    assert Path(fluid.__file__).resolve().parent == ROOT / "fluid"
    assert CONF_DIR == ROOT / "conf"
    defaults = OmegaConf.load(CONF_DIR / "train.yaml").defaults
    assert {"paths": "default"} in defaults, defaults


def test_stage2_without_stage1_names_the_missing_checkpoint(tmp_path):
    r = _run_cli("stage=2", "logger=csv", f"paths.artifacts_dir={tmp_path}/none", f"hydra.run.dir={tmp_path}/run",
                 cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage.init_checkpoint:") and "run stage 1 first" in last


def test_final_validation_only_when_the_last_one_was_early():
    from types import SimpleNamespace

    from fluid.train import _needs_final_validation

    def trainer(step, interval=250, limit=1.0, fdr=False):
        return SimpleNamespace(global_step=step, val_check_interval=interval, limit_val_batches=limit,
                               fast_dev_run=fdr)

    assert _needs_final_validation(trainer(40))            # a short run never validated
    assert _needs_final_validation(trainer(1200))          # the last validation was at step 1000
    assert not _needs_final_validation(trainer(1000))      # it just ran at the last step
    assert not _needs_final_validation(trainer(40, limit=0))
    assert not _needs_final_validation(trainer(1, fdr=True))
    assert not _needs_final_validation(trainer(40, interval=0.5))  # a fraction of an epoch: Lightning's own


def test_lightning_lines_are_logged_once_under_hydra():
    """Under Hydra (root handlers set) Lightning's own console handlers go: one line per message."""
    import logging

    import lightning  # noqa: F401  (installs its handlers)

    from fluid.train import _one_console_log

    root = logging.getLogger()
    added = logging.StreamHandler()
    root.addHandler(added)
    try:
        _one_console_log()
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            assert lg.propagate
            assert not [h for h in lg.handlers if type(h) is logging.StreamHandler], name
    finally:
        root.removeHandler(added)
