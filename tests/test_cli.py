"""The command line: bad overrides and missing checkpoints fail with one line, not a traceback."""

import json
import os
import subprocess
import sys

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
    assert (ROOT / "conf" / "train.yaml").exists()


def test_stage2_without_stage1_names_the_missing_checkpoint(tmp_path):
    r = _run_cli("stage=2", "logger=csv", f"paths.artifacts_dir={tmp_path}/none", f"hydra.run.dir={tmp_path}/run",
                 cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage.init_checkpoint:") and "run stage 1 first" in last
