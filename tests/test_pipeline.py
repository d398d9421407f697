"""Stages 0 -> 1 -> 2 end to end through the composed Hydra config (tiny, seconds), and a
two-value tau multirun through the real CLI in a subprocess."""

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid.train import train
from tests.conftest import ROOT, compose_cfg

SMALL = ["logger=csv", "trainer.enable_progress_bar=false", "data.source.n_train=200", "data.source.n_val=16",
         "data.source.n_test=8", "stage.module.eval_max_new_tokens=16", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


def run_stage(stage, tmp_path, cache_dir, artifacts, *extra):
    overrides = [f"stage={stage}", "trainer.max_steps=4", "trainer.val_check_interval=2", *SMALL, *extra]
    if stage == 2:
        overrides = [o for o in overrides if "eval_max_new_tokens" not in o]
    cfg = compose_cfg(overrides, tmp_path, cache_dir)
    cfg.paths.artifacts_dir = str(artifacts)
    metrics = train(cfg)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == "completed"
    assert on_disk["checkpoint_dir"] == metrics["checkpoint_dir"]
    return on_disk


@pytest.fixture(scope="module")
def stage0(tmp_path_factory, cache_dir, artifacts):
    d = tmp_path_factory.mktemp("stage0")
    return d, run_stage(0, d, cache_dir, artifacts)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, cache_dir, artifacts, stage0):
    d = tmp_path_factory.mktemp("stage1")
    return d, run_stage(1, d, cache_dir, artifacts, "masking.horizon=4")


def test_stage0_writes_metrics_and_reloadable_checkpoint(stage0, artifacts):
    run, m = stage0
    for key in ("train/loss", "val/loss", "test/accuracy", "checkpoint_dir", "wall_time_s", "train/steps"):
        assert key in m, key
    assert m["train/steps"] == 4 and 0.0 <= m["test/accuracy"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(m["checkpoint_dir"])
    tok = AutoTokenizer.from_pretrained(m["checkpoint_dir"])
    assert tok.mask_token == "<|mask|>" and tok.chat_template
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert json.loads((run / "checkpoint" / "fluid.json").read_text())["stage"] == 0
    for name in ("config.yaml", "git.json", "test_predictions.jsonl", "csv/metrics.csv"):
        assert (run / name).exists(), name
    assert (artifacts / "tiny-ar").resolve() == (run / "checkpoint").resolve()  # where stage 1 starts


def test_stage1_adapts_the_prior_and_exports(stage0, stage1, artifacts):
    run, m = stage1
    for key in ("train/loss_ar", "train/loss_diff", "val/loss_ar", "val/loss_diff", "test/accuracy",
                "train/expanded_len", "checkpoint_dir"):
        assert key in m, key
    assert m["train/expanded_len"] > 0
    # the embedded backbone is fully fine-tuned (backbone.stage1_lora=false): no adapter to write
    assert not (run / "adapter").exists()
    meta = json.loads((run / "checkpoint" / "fluid.json").read_text())
    assert meta["stage"] == 1 and meta["horizon"] == 4 and meta["source_backbone"] == "tiny"
    tok = AutoTokenizer.from_pretrained(m["checkpoint_dir"])
    assert meta["mask_token_id"] == tok.mask_token_id
    merged = AutoModelForCausalLM.from_pretrained(m["checkpoint_dir"])
    prior = AutoModelForCausalLM.from_pretrained(stage0[1]["checkpoint_dir"])
    w1 = merged.model.layers[0].self_attn.q_proj.weight
    w0 = prior.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w0, w1)  # the adapted weights were exported
    assert (artifacts / "tiny-stage1").resolve() == (run / "checkpoint").resolve()


def test_stage2_trains_the_head(stage1, tmp_path, cache_dir, artifacts):
    m = run_stage(2, tmp_path, cache_dir, artifacts)
    for key in ("train/loss", "val/head_acc", "val/head_acc_within1", "val/mean_target_k", "val/mean_pred_k",
                "checkpoint_dir"):
        assert key in m, key
    assert 1 <= m["val/mean_target_k"] <= 4
    meta = json.loads((tmp_path / "checkpoint" / "fluid.json").read_text())
    assert meta["horizon"] == 4 and meta["tau"] == 2.8
    assert sum(meta["histograms"]["target_k"]) > 0


def test_tau_multirun_writes_runs_and_summary(stage1, tmp_path, cache_dir, artifacts):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fluid.train", "-m", "stage=2", "tau.value=1.5,4.0", "trainer.max_steps=2",
           "trainer.val_check_interval=2", *[o for o in SMALL if "eval_max" not in o],
           f"paths.artifacts_dir={artifacts}", f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}",
           "logger=wandb", "logger.wandb.offline=true"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert runs == ["0", "1"]
    summary = json.loads((sweep / "summary.json").read_text())
    assert [row["tau/value"] for row in summary["rows"]] == [1.5, 4.0]
    ks = [row["val/mean_target_k"] for row in summary["rows"]]
    assert ks[0] <= ks[1]  # a higher threshold never gives shorter targets
    assert (sweep / "summary.md").read_text().count("\n") == 4
    assert (sweep / "summary.png").stat().st_size > 1000
    groups = {OmegaConf.load(sweep / d / "config.yaml").logger.wandb.group for d in runs}
    assert len(groups) == 1 and None not in groups  # one W&B group for the whole sweep
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 2
    link = artifacts / "tiny-stage2"  # a sweep's jobs do not fight over the published link
    assert not link.exists() or sweep.resolve() not in link.resolve().parents


@pytest.fixture(scope="module")
def stage2(stage1, tmp_path_factory, cache_dir, artifacts):
    d = tmp_path_factory.mktemp("stage2")
    run_stage(2, d, cache_dir, artifacts)
    return d


def _generate(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fluid.config import CONF_DIR
    from fluid.generate import run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=list(overrides))
    return run(cfg)


def test_generate_cli_writes_jsonl_and_is_lossless(stage2, tmp_path, capsys):
    from fluid.data.arith import ArithTask

    qs = [p.question for p in ArithTask(seed=0).problems("test", 3)]
    (tmp_path / "prompts.txt").write_text("\n".join(qs) + "\n")
    common = [f"checkpoint={stage2 / 'checkpoint'}", f"prompt_file={tmp_path / 'prompts.txt'}",
              "decode.max_new_tokens=24", "decode.batch_size=2"]
    _generate(tmp_path, *common, f"output={tmp_path / 'out.jsonl'}")
    ar = _generate(tmp_path, *common, "decode.algorithm=ar")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == qs
    assert [r["completion"] for r in rows] == [r["completion"] for r in ar["rows"]]
    assert all(sum(r["accepted"]) == r["tokens"] for r in rows)
    printed = capsys.readouterr().out
    assert "TPF" in printed and "tokens/s" in printed


def test_bench_decode_script_runs_and_reports_every_row(stage2, tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, "scripts/bench_decode.py", "--out", str(out), "--checkpoint", str(stage2 / "checkpoint"),
           "--n", "3", "--max-new-tokens", "8", "--fixed-k", "2,3", "--calibration", "2", "--k-min", "2",
           "--k-max", "4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("ar", "fluid", "fluid_fixed_k", "fluid_noverify", "published_loop"):
        for key in ("batch1", "batch16"):
            row = report[name][key]
            for field in ("tpf", "tokens_per_s", "speedup_vs_ar", "identical_to_ar", "accuracy"):
                assert field in row, (name, key, field)
    for name in ("fluid", "fluid_fixed_k", "published_loop"):
        assert report[name]["batch1"]["identical_to_ar"] == 1.0
    assert "TPF" in r.stdout
