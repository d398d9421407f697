"""Stages 0 -> 1 -> 2 end to end through the composed Hydra config (tiny, seconds), and a
two-value tau multirun through the real command line (``python -m fluid.train -m``'s main)."""

import json
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid.train import train
from tests.conftest import ROOT, assert_model_generate_is_fluid_and_greedy, compose_cfg, hist_mean, run_cli

SMALL = ["logger=csv", "trainer.enable_progress_bar=false", "data.source.n_train=200", "data.source.n_val=16",
         "data.source.n_test=8", "stage.module.eval_max_new_tokens=16", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


def run_stage(stage, tmp_path, cache_dir, artifacts, *extra):
    overrides = [f"experiment=tiny_stage{stage}", "trainer.max_steps=4", "trainer.val_check_interval=2", *SMALL, *extra]
    if stage == 2:
        overrides = [o for o in overrides if "eval_max_new_tokens" not in o]
    cfg = compose_cfg(overrides, tmp_path, cache_dir)
    cfg.paths.artifacts_dir = str(artifacts)
    metrics = train(cfg)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == "completed"
    assert on_disk["checkpoint_dir"] == metrics["checkpoint_dir"]
    return on_disk


def assert_accuracy_is_the_runs_own(run, m, n_test=8):
    """``test/accuracy`` is the share of correct rows in the run's ``test_predictions.jsonl``, and
    each row's verdict is the exact match of its completion with the test split's answer."""
    from fluid.data.arith import ArithTask
    from fluid.eval.answers import exact_match

    rows = [json.loads(line) for line in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == n_test
    from omegaconf import OmegaConf

    from fluid.config import CONF_DIR

    source = OmegaConf.load(CONF_DIR / "data" / "arith.yaml").source  # the task the run trained on
    task = ArithTask(seed=source.seed, max_operand=source.max_operand)
    assert [r["reference"] for r in rows] == [str(p.answer) for p in task.problems("test", n_test)]
    assert [r["correct"] for r in rows] == [bool(exact_match(r["completion"], r["reference"])) for r in rows]
    assert m["test/accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / n_test)


def read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
    assert m["train/steps"] == 4
    assert_accuracy_is_the_runs_own(run, m)
    model = AutoModelForCausalLM.from_pretrained(m["checkpoint_dir"])
    tok = AutoTokenizer.from_pretrained(m["checkpoint_dir"])
    assert tok.mask_token == "<|mask|>" and tok.chat_template
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert json.loads((run / "checkpoint" / "fluid.json").read_text())["stage"] == 0
    # the run directory: its resolved config (with this run's overrides), git revision and CSV log
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.stage.id == 0 and cfg.trainer.max_steps == 4 and cfg.trainer.val_check_interval == 2
    assert cfg.data.source.n_train == 200 and cfg.data.source.n_test == 8 and cfg.paths.output_dir == str(run)
    git = json.loads((run / "git.json").read_text())
    in_git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0
    if in_git:  # the checkout's revision at the run's start: HEAD or (committed since) one of its ancestors
        assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and isinstance(git["dirty"], bool), git
        assert subprocess.run(["git", "merge-base", "--is-ancestor", git["commit"], "HEAD"], cwd=ROOT).returncode == 0
    else:
        assert git == {"commit": None, "dirty": None}
    val = [r for r in read_csv(run / "csv" / "metrics.csv") if r.get("val/loss")]
    assert [int(r["step"]) for r in val] == [1, 3]  # validation every 2 steps (0-based step index)
    assert float(val[-1]["val/loss"]) == pytest.approx(m["val/loss"], rel=1e-5)
    assert (artifacts / "tiny-ar").resolve() == (run / "checkpoint").resolve()  # where stage 1 starts


def test_stage1_adapts_the_prior_and_exports(stage0, stage1, artifacts):
    run, m = stage1
    for key in ("train/loss_ar", "train/loss_diff", "val/loss_ar", "val/loss_diff", "test/accuracy",
                "train/expanded_len", "checkpoint_dir"):
        assert key in m, key
    assert m["train/expanded_len"] > 0
    assert_accuracy_is_the_runs_own(run, m)
    # the embedded backbone is fully fine-tuned (its stage-1 recipe: stage.module.lora.enabled=false): no adapter
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
    meta = json.loads((tmp_path / "checkpoint" / "fluid.json").read_text())
    assert meta["horizon"] == 4 and meta["tau"] == 2.8
    # the exported histograms count the final validation's horizons (k = 1..4), whose means are the metrics
    hist = meta["histograms"]
    assert len(hist["target_k"]) == len(hist["pred_k"]) == 4
    assert sum(hist["target_k"]) == sum(hist["pred_k"]) > 0
    assert m["val/mean_target_k"] == pytest.approx(hist_mean(hist["target_k"]), rel=1e-5)
    assert m["val/mean_pred_k"] == pytest.approx(hist_mean(hist["pred_k"]), rel=1e-5)


def test_tau_multirun_writes_runs_and_summary(stage1, tmp_path, cache_dir, artifacts, capsys, monkeypatch):
    sweep = tmp_path / "sweep"
    argv = ["-m", "experiment=tiny_stage2", "tau.value=1.5,4.0", "trainer.max_steps=2",
            "trainer.val_check_interval=2", *[o for o in SMALL if "eval_max" not in o],
            f"paths.artifacts_dir={artifacts}", f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}",
            "logger=wandb", "logger.wandb.offline=true"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, err = run_cli("train", argv, capsys)  # python -m fluid.train -m ..., in this process
    assert code == 0, err[-3000:]
    runs = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert runs == ["0", "1"]
    summary = json.loads((sweep / "summary.json").read_text())
    assert [row["tau/value"] for row in summary["rows"]] == [1.5, 4.0]
    ks = [row["val/mean_target_k"] for row in summary["rows"]]
    assert ks[0] <= ks[1]  # a higher threshold never gives shorter targets
    for d, row in zip(runs, summary["rows"]):  # each row is its run's own metrics.json
        assert row["run"] == d
        assert row["val/mean_target_k"] == json.loads((sweep / d / "metrics.json").read_text())["val/mean_target_k"]
    table = (sweep / "summary.md").read_text()
    assert table.count("\n") == 4
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == runs
    assert (sweep / "summary.png").stat().st_size > 1000
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = {OmegaConf.load(sweep / d / "config.yaml").logger.wandb.group for d in runs}
    assert len(groups) == 1 and None not in groups  # one W&B group for the whole sweep
    wandb_runs = list(sweep.glob("*/wandb/offline-run-*"))
    assert len(wandb_runs) == 2
    for run in wandb_runs:  # stage 2 logs its horizon histograms as W&B histograms
        record = next(run.glob("run-*.wandb")).read_bytes()
        assert b"val/target_k_hist" in record and b"val/pred_k_hist" in record and b"histogram" in record
    link = artifacts / "tiny-stage2"  # a sweep's jobs do not fight over the published link
    assert not link.exists() or sweep.resolve() not in link.resolve().parents


@pytest.fixture(scope="module")
def stage2(stage1, tmp_path_factory, cache_dir, artifacts):
    d = tmp_path_factory.mktemp("stage2")
    run_stage(2, d, cache_dir, artifacts)
    return d


def _generate(tmp_path, *overrides):
    from fluid.generate import run
    from fluid.utils.compose import compose

    return run(compose("generate", overrides))


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
    for key in ("batch1", "batch16"):
        ar = report["ar"][key]
        assert ar["tpf"] == 1.0 and ar["identical_to_ar"] == 1.0 and ar["speedup_vs_ar"] == 1.0
        assert report["fluid"][key]["identical_to_ar"] == 1.0  # lossless at any batch size
        for name in ("ar", "fluid", "fluid_fixed_k", "fluid_noverify", "published_loop"):
            row = report[name][key]
            assert row["tpf"] == pytest.approx(row["generated_tokens"] / row["nfe"]), (name, key)
            if row["identical_to_ar"] == 1.0:  # the same tokens score the same
                assert row["accuracy"] == ar["accuracy"], (name, key)
        assert report["fluid_fixed_k"][key]["k"] == report["meta"]["best_fixed_k"] in (2, 3)
    assert "TPF" in r.stdout


def test_evaluate_cli_on_the_pipelines_checkpoint(stage2, tmp_path):
    """``python -m fluid.evaluate benchmark=arith`` on what stage 2 wrote: AR and FLUID side by
    side, lossless, every file in the run directory."""
    run = tmp_path / "eval"
    cmd = [sys.executable, "-m", "fluid.evaluate", "benchmark=arith", f"checkpoint={stage2 / 'checkpoint'}", "limit=4",
           "decode.max_new_tokens=16", "progress=false", f"hydra.run.dir={run}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["n_samples"] == 4
    assert m["fluid/identical_to_ar"] == 1.0 and m["fluid/accuracy"] == m["ar/accuracy"]
    assert {"samples.jsonl", "results.md", "speed_accuracy.png", "config.yaml", "evaluate.log"} <= \
        {p.name for p in run.iterdir()}
    assert "fluid" in r.stdout and "speedup" in r.stdout


def test_load_fluid_reads_the_pipelines_checkpoints(stage1, stage2):
    """``fluid.checkpoint.load_fluid`` on what stages 1 and 2 wrote: the stage-1 backbone with its
    MASK id, the stage-2 K-head over those same weights, and a lossless decoder from the two."""
    from fluid.checkpoint import load_fluid
    from fluid.data.arith import ArithTask
    from fluid.decoding import DecodeConfig, FluidDecoder
    from fluid.decoding.ar import greedy_generate
    from fluid.generate import encode
    from fluid.khead import KHead

    run1, m1 = stage1
    s1 = load_fluid(m1["checkpoint_dir"])
    assert s1.head is None and s1.meta.stage == 1 and s1.meta.horizon == 4 and not s1.model.training
    assert s1.mask_token_id == s1.tokenizer.mask_token_id == s1.tokenizer.convert_tokens_to_ids("<|mask|>")

    s2 = load_fluid(stage2 / "checkpoint")
    assert s2.meta.stage == 2 and s2.meta.stage1_checkpoint == m1["checkpoint_dir"]
    assert isinstance(s2.head, KHead) and s2.head.horizon == s1.meta.horizon == s2.meta.horizon
    assert s2.mask_token_id == s1.mask_token_id
    w1, w2 = s1.model.state_dict(), s2.model.state_dict()
    assert list(w2) == list(w1)
    for name, w in w2.items():
        assert torch.equal(w, w1[name]), name

    tok = s2.tokenizer
    ids = [encode(tok, p.question, chat=True) for p in ArithTask(seed=0).problems("test", 2)]
    ref = greedy_generate(s1.model, ids, max_new_tokens=24, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id).tokens
    dec = FluidDecoder(s2.model, tok, head=s2.head, mask_token_id=s2.mask_token_id,
                       config=DecodeConfig(max_new_tokens=24, k_min=1, k_max=4))
    for bs in (1, 2):
        out = dec.generate(ids, batch_size=bs)
        assert out["tokens"] == ref, bs
        assert all(r.horizons and sum(r.accepted) == len(r.tokens) for r in out["rows"])


def test_exports_name_the_tokenizers_special_tokens(stage0, stage1):
    """Stage 0/1 exports: config.json and generation_config.json carry the tokenizer's ids."""
    from transformers import AutoTokenizer

    for run, _ in (stage0, stage1):
        ckpt = run / "checkpoint"
        tok = AutoTokenizer.from_pretrained(ckpt)
        for name in ("config.json", "generation_config.json"):
            cfg = json.loads((ckpt / name).read_text())
            assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == \
                (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), (run, name)


def test_git_revision_records_the_commit_and_uncommitted_changes(tmp_path):
    """git.json's fields against a repository whose state is known: clean, edited, not a repository."""
    from fluid.utils.runinfo import git_revision

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    assert git_revision(tmp_path) == {"commit": None, "dirty": None}
    git("init", "-q")
    (tmp_path / "a.txt").write_text("1\n")
    git("add", "a.txt")
    git("commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_revision(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "untracked.txt").write_text("x")  # untracked files are not the code that ran
    assert git_revision(tmp_path)["dirty"] is False
    (tmp_path / "a.txt").write_text("2\n")
    assert git_revision(tmp_path) == {"commit": head, "dirty": True}


def test_model_generate_decodes_with_fluid_from_stage1_and_stage2_exports(stage1, stage2):
    """The exported checkpoints carry custom_generate/: transformers' generate decodes with FLUID
    (stage 2: with its K-head; its directory links the stage-1 model so that it loads as one)."""
    assert_model_generate_is_fluid_and_greedy(stage1[0] / "checkpoint")
    assert_model_generate_is_fluid_and_greedy(stage2 / "checkpoint")
