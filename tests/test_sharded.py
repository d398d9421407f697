"""Sharded strategies save, convert and reload: the merged HF export of a DeepSpeed ZeRO-2/3 (and,
on CUDA, FSDP) run holds the trained weights, the same as an unsharded run of the same seed.

On CPU, DeepSpeed runs for real through ``tests.cpu_deepspeed.CPUDeepSpeedStrategy`` (Lightning's
strategy minus its CUDA check): parameters are partitioned, Lightning writes its ZeRO checkpoint
directory and ``fluid.convert`` merges it. The ``gpu`` tests use Lightning's own strategies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, run_cli

pytest.importorskip("deepspeed")

COMMON = ["trainer.max_steps=3", "logger=csv", "publish=false", "data.source.n_train=64", "data.source.n_val=8",
          "data.source.n_test=4", "trainer.val_check_interval=3",
          "trainer.enable_progress_bar=false"]
CPU_DEEPSPEED = "strategy._target_=tests.cpu_deepspeed.CPUDeepSpeedStrategy"
# ZeRO-3 keeps parameters under 1e5 elements whole on every rank (all of the tiny model's): 0 shards them all
SHARD_ALL = ("+strategy.config={zero_optimization:{stage:3,stage3_param_persistence_threshold:0},"
             "zero_allow_untested_optimizer:true}")
ZERO = {"deepspeed_zero2": ["strategy=deepspeed_zero2", CPU_DEEPSPEED],
        "deepspeed_zero3": ["strategy=deepspeed_zero3", CPU_DEEPSPEED, SHARD_ALL]}


def _train(run, *args, stage="1", in_process=False):
    """A short run on one torch thread; a sharded or GPU one in its own process (it sets up
    torch.distributed or CUDA), a plain CPU one may run in this process (no seconds of imports)."""
    short_test = ["stage.module.eval_max_new_tokens=8"] if stage == "1" else ["test=false"]
    argv = [f"experiment=tiny_stage{stage}", *COMMON, *short_test, *args, f"hydra.run.dir={run}"]
    if in_process:
        code, _ = run_cli("train", argv, threads=1)
        assert code == 0
    else:
        r = subprocess.run([sys.executable, "-m", "fluid.train", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["train/steps"] == 3
    return m


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _max_diff(a, b):
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_checkpoint):
    """The reference: the same 3 stage-1 steps without DeepSpeed."""
    run = tmp_path_factory.mktemp("plain") / "run"
    _train(run, f"backbone.path={tiny_checkpoint}", in_process=True)
    return run


@pytest.mark.parametrize("zero", ["deepspeed_zero2", "deepspeed_zero3"])
def test_zero_run_exports_the_trained_weights(zero, tmp_path, tiny_checkpoint, plain_run):
    """ZeRO-3 partitions the weights (rank 0 holds none of them whole): the run gathers its final
    checkpoint into the merged export. It matches the unsharded run to fp32 rounding, while 3
    steps move the weights far more; and ``fluid.convert`` of ``last.ckpt`` gives the same."""
    run = tmp_path / "run"
    _train(run, *ZERO[zero], f"backbone.path={tiny_checkpoint}")
    exported, plain = _weights(run / "checkpoint"), _weights(plain_run / "checkpoint")
    initial = _weights(tiny_checkpoint)
    moved = max((plain[k] - initial[k]).abs().max().item() for k in initial if plain[k].shape == initial[k].shape)
    assert moved > 1e-4
    assert _max_diff(exported, plain) < moved / 100
    assert (run / "checkpoints" / "last.ckpt" / "latest").exists()  # a ZeRO checkpoint directory

    out = tmp_path / "converted"
    assert run_cli("convert", [str(run), "--out", str(out)])[0] == 0
    assert _max_diff(_weights(out), exported) == 0
    from fluid.checkpoint import load_fluid

    fm = load_fluid(out)  # reloads: the merged model and the MASK token from fluid.json
    assert fm.mask_token_id is not None and fm.model(torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_zero3_stage2_exports_the_head(tmp_path, tiny_checkpoint, plain_run):
    """Stage 2 under ZeRO-3: the frozen backbone and the head are partitioned; the export is the
    trained head, equal to an unsharded run's."""
    init = f"stage.init_checkpoint={plain_run / 'checkpoint'}"
    runs = {}
    for name, extra in {"plain": [], "zero3": ZERO["deepspeed_zero3"]}.items():
        runs[name] = tmp_path / name
        _train(runs[name], init, *extra, stage="2", in_process=not extra)
    from safetensors.torch import load_file

    heads = {n: load_file(str(r / "checkpoint" / "khead.safetensors")) for n, r in runs.items()}
    assert _max_diff(heads["plain"], heads["zero3"]) < 1e-5


def test_convert_refuses_bad_input_in_one_line(tmp_path, plain_run, capsys):
    cases = [([str(tmp_path)], "error: run_dir:"),  # no config.yaml
             ([str(plain_run), "--ckpt", str(tmp_path / "none.ckpt")], "error: ckpt:"),
             ([str(plain_run), "--ckpt", str(tmp_path)], "error: ckpt:")]  # a directory, not DeepSpeed's
    for args, want in cases:
        code, err = run_cli("convert", args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].startswith(want) and "Traceback" not in err, err[-2000:]


# ---------------------------------------------------------------- CUDA: Lightning's own strategies
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_sharded_strategy_on_cuda_saves_converts_reloads(strategy, tmp_path, tiny_checkpoint):
    """The real strategy on one GPU (fp32): train, export (gathered), convert ``last.ckpt`` again,
    reload with ``load_fluid``; the export matches a plain GPU run of the same seed."""
    gpu = ["trainer=gpu", "trainer.devices=1", "trainer.precision=32-true", f"backbone.path={tiny_checkpoint}"]
    plain, run = tmp_path / "plain", tmp_path / "run"
    _train(plain, *gpu)
    _train(run, *gpu, f"strategy={strategy}")
    assert _max_diff(_weights(run / "checkpoint"), _weights(plain / "checkpoint")) < 1e-4
    last = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "converted"
    r = subprocess.run([sys.executable, "-m", "fluid.convert", str(run), "--ckpt", str(last), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _max_diff(_weights(out), _weights(run / "checkpoint")) < 1e-6
    from fluid.checkpoint import load_fluid

    fm = load_fluid(out, device="cuda")
    assert fm.model(torch.tensor([[5, 6, 7]], device="cuda")).logits.isfinite().all()
