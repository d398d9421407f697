"""Stage 0 end to end through the composed Hydra config, into tmp_path."""

import json
import subprocess
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid.train import train
from tests.conftest import ROOT, compose_cfg


def test_stage0_smoke_run_writes_metrics_and_reloadable_checkpoint(tmp_path, cache_dir):
    cfg = compose_cfg(["stage=0", "debug=limit", "logger=csv", "trainer.max_steps=6", "trainer.val_check_interval=3",
                       "data.source.n_train=200", "data.source.n_val=16", "data.source.n_test=8",
                       "trainer.enable_progress_bar=false", "stage.module.eval_max_new_tokens=16", "publish=true"],
                      tmp_path, cache_dir)
    metrics = train(cfg)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == "completed"
    for key in ("train/loss", "val/loss", "test/accuracy", "checkpoint_dir", "wall_time_s", "train/steps"):
        assert key in on_disk, key
    assert on_disk["train/steps"] == 6
    assert 0.0 <= on_disk["test/accuracy"] <= 1.0
    assert metrics["checkpoint_dir"] == on_disk["checkpoint_dir"]
    ckpt = on_disk["checkpoint_dir"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.mask_token == "<|mask|>" and tok.chat_template
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    meta = json.loads((tmp_path / "checkpoint" / "fluid.json").read_text())
    assert meta["stage"] == 0 and meta["mask_token_id"] == tok.mask_token_id
    for name in ("config.yaml", "git.json", "test_predictions.jsonl", "csv/metrics.csv"):
        assert (tmp_path / name).exists(), name
    # the embedded prior was published where stage 1 looks for it (debug runs only when asked)
    link = tmp_path / "outputs" / "artifacts" / "tiny-ar"
    assert link.resolve() == (tmp_path / "checkpoint").resolve()


def _run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fluid.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "FLUID_ROOT": str(cwd)})


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
