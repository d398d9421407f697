"""The training benchmark runs and writes what it promises (no timings asserted). The decoding
benchmark runs in test_pipeline.py (it needs the pipeline's checkpoints)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


def test_bench_train_runs_on_cpu(tmp_path, cache_dir):
    out = tmp_path / "train.json"
    cmd = [sys.executable, "scripts/bench_train.py", "--out", str(out), "--batch-size", "2", "--steps", "1",
           "--warmup", "0", "--hidden", "64", "--layers", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "FLUID_CACHE": str(cache_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    for case in ("dense", "ref", "causal"):
        assert report["cases"][case]["expanded_len"] == report["cases"]["dense"]["expanded_len"]
    if not torch.cuda.is_available():
        assert "skipped" in report["cases"]["flex"]  # flex training is CUDA only
    cases, summary = report["cases"], report["summary"]
    assert set(cases) == set(report["config"]["cases"].split(",")) >= {"dense", "flex", "ref", "causal"}
    assert not [c for c, row in cases.items() if "error" in row], cases  # every case ran or was skipped
    # the same model and batch under the fast mask and the reference mask: the same loss before any update
    assert cases["dense"]["first_loss"] == pytest.approx(cases["ref"]["first_loss"], rel=1e-4)
    assert summary["lane_overhead_dense_vs_causal"] > 0
    assert report["config"]["batch_size"] == 2 and report["config"]["steps"] == 1 and report["config"]["hidden"] == 64
    assert "tokens/s" in r.stdout


def test_bench_train_times_exact_modes_two_pass_step(tmp_path, cache_dir):
    out = tmp_path / "exact.json"
    cmd = [sys.executable, "scripts/bench_train.py", "--out", str(out), "--batch-size", "2", "--steps", "1",
           "--warmup", "0", "--hidden", "64", "--layers", "1", "--finetune", "exact", "--seq-len", "40",
           "--max-expanded-len", "64", "--cases", "dense,two_pass"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "FLUID_CACHE": str(cache_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    cases = report["cases"]
    assert cases["two_pass"]["expanded_len"] == cases["dense"]["expanded_len"] <= 64
    # the two-pass step computes the expanded forward's loss: the same number, at its own speed
    assert cases["two_pass"]["first_loss"] == pytest.approx(cases["dense"]["first_loss"], rel=1e-4)
    assert report["summary"]["two_pass_speedup_vs_dense"] > 0


def test_bench_forward_writes_the_cost_curve(tmp_path, tiny_checkpoint):
    out = tmp_path / "forward.json"
    cmd = [sys.executable, "scripts/bench_forward.py", "--checkpoint", str(tiny_checkpoint), "--batch", "1", "3",
           "--tokens", "1", "4", "--cache", "8", "--repeats", "2", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["batch"], x["tokens"]) for x in rows] == [(1, 1), (1, 4), (3, 1), (3, 4)]
    assert all(x["min_ms"] <= x["median_ms"] for x in rows)
    assert rows[0]["relative"] == rows[2]["relative"] == 1.0 and rows[1]["relative"] > 0
    bad = subprocess.run([sys.executable, "scripts/bench_forward.py", "--checkpoint", str(tiny_checkpoint),
                          "--tokens", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "must be positive" in bad.stderr
