"""Runs that survive a cluster: bad inputs fail before any model is built with one line
naming the key (exit 2) and publish nothing; a NaN loss stops the run; a 2-device DDP run of
stage 1 completes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

# (overrides, the key the one-line message must name)
TRAIN_CASES = [
    (["stage=2", "tau.value=0"], "tau.value"),
    (["stage=2", "tau.value=-1.5"], "tau.value"),
    (["stage=2", "tau.sigma=0"], "tau.sigma"),
    (["stage=2", "tau.value=abc"], "tau.value"),
    (["stage=1", "masking.anchor_prob=0"], "masking.anchor_prob"),
    (["stage=1", "masking.anchor_prob=1.5"], "masking.anchor_prob"),
    (["stage=1", "masking.horizon=0"], "masking.horizon"),
    (["stage=1", "masking.noise_prob=1"], "masking.noise_prob"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.max_steps=-5"], "trainer.max_steps"),
    (["stage.module.optim.lr=inf"], "stage.module.optim.lr"),
    (["stage.module.optim.lr=nan"], "stage.module.optim.lr"),
    (["stage.module.optim.lr=-1e-3"], "stage.module.optim.lr"),
    (["stage.module.optim.lr=0"], "stage.module.optim.lr"),
    (["stage.module.optim.lr=fast"], "stage.module.optim.lr"),
    (["stage.module.optim.scheduler=linear"], "stage.module.optim.scheduler"),
    (["stage.module.optim.warmup_ratio=1"], "stage.module.optim.warmup_ratio"),
    (["stage.module.optim.weight_decay=-0.1"], "stage.module.optim.weight_decay"),
    (["stage.module.optim.min_lr_ratio=2"], "stage.module.optim.min_lr_ratio"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.batch_size=-2"], "data.batch_size"),
    (["data.eval_batch_size=0"], "data.eval_batch_size"),
    (["data.max_length=1"], "data.max_length"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["stage=1", "stage.module.lora.enabled=true", "stage.module.lora.r=0"], "stage.module.lora.r"),
    (["stage=1", "stage.module.lora.enabled=true", "stage.module.lora.dropout=1"], "stage.module.lora.dropout"),
    (["stage=1", "stage.module.lora.enabled=true", "stage.module.lora.alpha=0"], "stage.module.lora.alpha"),
    (["stage=1", "stage.module.lora.enabled=true", "stage.module.lora.scope=some"], "stage.module.lora.scope"),
    (["stage=1", "stage.module.lora.enabled=false", "stage.module.lora.scope=lanes"], "stage.module.lora.scope"),
    (["data.responses=silver"], "data.responses"),
    (["data.self_responses.max_new_tokens=0"], "data.self_responses.max_new_tokens"),
    (["stage=1", "stage.module.attention=sparse"], "stage.module.attention"),
    (["stage=1", "stage.module.max_expanded_len=1"], "stage.module.max_expanded_len"),
    (["stage=1", "stage.module.loss.reduction=sum"], "stage.module.loss.reduction"),
    (["stage=1", "stage.module.loss.ar_weight=-1"], "stage.module.loss.ar_weight"),
    (["stage=2", "stage.module.lane_forward=magic"], "stage.module.lane_forward"),
    (["stage=2", "stage.module.lane_chunk=0"], "stage.module.lane_chunk"),
    (["stage=2", "stage.module.anchor_prob=0"], "stage.module.anchor_prob"),
    (["stage=2", "stage.module.horizon=0"], "stage.module.horizon"),
    (["stage=2", "stage.init_checkpoint=/no/such/dir"], "stage.init_checkpoint"),
    (["stage.module.eval_max_new_tokens=0"], "stage.module.eval_max_new_tokens"),
    (["seed=abc"], "seed"),
    (["seed=-1"], "seed"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps"),
    (["trainer.num_nodes=0"], "trainer.num_nodes"),
    (["strategy=deepspeed_zero2"], "strategy"),
    (["strategy=deepspeed_zero3"], "strategy"),
    (["strategy=fsdp"], "strategy"),
    (["trainer.accelerator=gpu"], "trainer.accelerator"),
    (["ckpt_path=last"], "ckpt_path"),             # nothing to resume in a new run directory
    (["ckpt_path=/no/such.ckpt"], "ckpt_path"),
    (["+max_step=10"], "max_step"),
]
GENERATE_CASES = [
    (["prompts=hello"], "prompts"),
    (["prompts=[]"], "prompts"),
    (["device=cuda"], "device"),
    (["device=tpu"], "device"),
    (["dtype=float64"], "dtype"),
    (["decode.fixed_k=0", "decode.horizon=fixed", "prompts=[hi]"], "decode"),
    (["decode.fixed_k=100", "decode.horizon=fixed", "prompts=[hi]"], "decode"),
    (["decode.k_min=9", "decode.k_max=4", "prompts=[hi]"], "decode"),
]


def run_main(module: str, overrides: list[str], tmp_path, capsys, checkpoint=None):
    """``python -m fluid.<module> OVERRIDES`` in this process, its run in ``tmp_path/run``; (exit code, stderr)."""
    argv = [*overrides, f"hydra.run.dir={tmp_path / 'run'}", f"paths.artifacts_dir={tmp_path / 'artifacts'}",
            "logger=csv"] if module == "train" else [*overrides, f"hydra.run.dir={tmp_path / 'run'}",
                                                     f"checkpoint={checkpoint or tmp_path / 'artifacts' / 'none'}"]
    return run_cli(module, argv, capsys)


@pytest.mark.parametrize("overrides,key", TRAIN_CASES, ids=[" ".join(o) for o, _ in TRAIN_CASES])
def test_bad_train_input_fails_before_work(overrides, key, tmp_path, capsys):
    code, err = run_main("train", overrides, tmp_path, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}"), err
    assert "Traceback" not in err
    assert not (tmp_path / "artifacts").exists()  # nothing published
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("overrides,key", GENERATE_CASES, ids=[" ".join(o) for o, _ in GENERATE_CASES])
def test_bad_generate_input_fails_with_one_line(overrides, key, tmp_path, capsys, monkeypatch):
    from fluid import validate

    monkeypatch.setattr(validate, "_cuda_available", lambda: False)
    code, err = run_main("generate", overrides, tmp_path, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}"), err


def test_stage2_on_a_stage0_checkpoint_is_refused(tmp_path, capsys, tiny_checkpoint):
    from fluid.checkpoint import CheckpointMeta

    stage0 = tmp_path / "stage0"
    stage0.mkdir()
    CheckpointMeta(stage=0).write(stage0)
    code, err = run_main("train", ["stage=2", f"stage.init_checkpoint={stage0}"], tmp_path, capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: stage.init_checkpoint:"), err
    assert "is a stage-0 checkpoint; stage 2 trains on a stage-1 one" in err


def test_non_finite_loss_stops_with_the_step_and_publishes_nothing(tmp_path, capsys, cache_dir):
    """lr=1e30: the first update makes the weights (and the next loss) non-finite."""
    code, err = run_main("train", ["stage=0", "stage.module.optim.lr=1e30", "stage.module.optim.warmup_ratio=0",
                                   "trainer.max_steps=6", "trainer.gradient_clip_val=null", "data.source.n_train=64",
                                   "data.source.n_val=8", "test=false", f"paths.cache_dir={cache_dir}",
                                   "trainer.enable_progress_bar=false"], tmp_path, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 3 and last.startswith("failed: optim.lr:") and "at step" in last, err[-2000:]  # a failed run, not bad input
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "run" / "checkpoint").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_two_device_ddp_stage1_completes(tmp_path, tiny_checkpoint):
    """``trainer.devices=2 stage=1`` relaunches the script for rank 1 with Hydra's argv (the
    quoted ``stage='1'``); both ranks train, one writes the run's files, and both test the model
    it exported (the stage's defaults train LoRA: rank 1 merges it too, without writing)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fluid.train", "stage=1", "trainer.devices=2", "trainer.max_steps=3",
           f"backbone.path={tiny_checkpoint}", "logger=csv", "publish=false", "data.source.n_train=64",
           "data.source.n_val=8", "data.source.n_test=4", "stage.module.eval_max_new_tokens=8",
           "trainer.val_check_interval=3", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["train/steps"] == 3
    assert len((run / "test_predictions.jsonl").read_text().splitlines()) == 4  # both ranks' records
    assert (run / "checkpoint" / "fluid.json").exists()


def test_exported_special_tokens_let_hf_generate_stop_at_eos(tmp_path, arith_tokenizer):
    """A model built from a config (the tiny backbone: bos=1, eos=2 by default) exported the way
    the stages export: Hugging Face ``generate`` stops at the tokenizer's EOS with the project's
    greedy output. The model always predicts EOS, so a wrong eos id would run to max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from fluid.checkpoint import align_special_tokens
    from fluid.decoding.ar import greedy_generate
    from tests.conftest import tiny_model

    tok = arith_tokenizer
    model = tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=False)
    assert model.config.eos_token_id != tok.eos_token_id  # the mismatch the export must fix
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb[5].expand_as(emb))
        h = model(torch.tensor([[5, 6]]), output_hidden_states=True).hidden_states[-1][0, -1]
        model.lm_head.weight[tok.eos_token_id] = 100 * h / h.square().sum()
    align_special_tokens(model, tok)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert loaded.generation_config.eos_token_id == tok.eos_token_id
    prompt = tok("3 + 4", add_special_tokens=False)["input_ids"]
    out = loaded.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    ours = greedy_generate(loaded, [prompt], max_new_tokens=20, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id).tokens[0]
    assert out == ours == [tok.eos_token_id]
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))


def _start_stage0(run, cache_dir):
    cmd = [sys.executable, "-m", "fluid.train", "experiment=tiny_stage0", "trainer.max_steps=5000", "logger=csv", "publish=false",
           "test=false", "trainer.enable_progress_bar=false", "data.source.n_train=256", "data.source.n_val=8",
           f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_training(run, proc, timeout=120):
    """Until the run has a Lightning step checkpoint dir or a CSV row: it is inside fit()."""
    import time

    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        status = json.loads((run / "metrics.json").read_text()).get("status") if (run / "metrics.json").exists() else None
        if status == "running" and (run / "csv" / "metrics.csv").exists():
            return
        time.sleep(0.5)
    raise AssertionError("the run did not start training")


def test_sigterm_exits_non_zero_with_a_status_and_a_checkpoint(tmp_path, cache_dir):
    import signal
    import time

    run = tmp_path / "run"
    proc = _start_stage0(run, cache_dir)
    _wait_training(run, proc)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 143, proc.stderr.read()[-2000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "terminated" and "SIGTERM" in m["error"]
    assert (run / "checkpoints" / "terminated.ckpt").exists()


def test_kill_9_is_reported_by_the_next_start(tmp_path, cache_dir, capsys):
    import signal

    run = tmp_path / "run"
    proc = _start_stage0(run, cache_dir)
    _wait_training(run, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert json.loads((run / "metrics.json").read_text())["status"] == "running"  # what kill -9 leaves
    code, _ = run_main("train", ["trainer.max_steps=0"], tmp_path, capsys)  # the next start in that directory
    m = json.loads((run / "metrics.json").read_text())
    assert code == 2 and m["previous_status"] == "killed" and m["status"] == "failed"


def _stage0_args(run, cache_dir, steps, *extra):
    """A short stage-0 run in ``run`` with a checkpoint every 2 steps and a log of its batches."""
    return ["experiment=tiny_stage0", f"trainer.max_steps={steps}", "logger=csv",
            "publish=false", "test=false", "trainer.enable_progress_bar=false", "data.source.n_train=96", "data.source.n_val=8",
            "data.batch_size=8", "trainer.val_check_interval=1000", "callbacks.model_checkpoint.every_n_train_steps=2",
            f"+callbacks.batch_log={{_target_:fluid.utils.callbacks.BatchLog,path:{run}/batches.jsonl}}",
            f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", *extra]


def _stage0_cmd(run, cache_dir, steps, *extra):
    return [sys.executable, "-m", "fluid.train", *_stage0_args(run, cache_dir, steps, *extra)]


def _train_in_process(args, capsys=None) -> None:
    code, err = run_cli("train", args, capsys)
    assert code == 0, err[-2000:]


def _batches(run) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in (run / "batches.jsonl").read_text().splitlines()]
    return [(r["step"], r["batch"]) for r in rows]


def test_kill_9_then_resume_from_last_sees_the_same_data(tmp_path, cache_dir, capsys):
    """An uninterrupted 16-step run (12 batches an epoch) against one killed with SIGKILL after
    a checkpoint and resumed with ``ckpt_path=last`` in its own directory: the same final step
    and, step for step, the same batches (across the epoch boundary too)."""
    import signal
    import time

    full = tmp_path / "full"
    _train_in_process(_stage0_args(full, cache_dir, 16), capsys)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_stage0_cmd(run, cache_dir, 16), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if last.exists() and len(_batches(run)) >= 5:  # a checkpoint (step 2 or 4) and training past it
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and last.exists()
    seen = _batches(run)
    _train_in_process(_stage0_args(run, cache_dir, 16, "ckpt_path=last"), capsys)
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["train/steps"] == 16 and m["previous_status"] == "killed"
    resumed = _batches(run)[len(seen):]
    # steps after the checkpoint ran twice (before the kill and after the resume): the last
    # entry of each step counts, as the weights of the resumed run saw them
    by_step = dict(seen)
    by_step.update(dict(resumed))
    assert resumed[0][0] < seen[-1][0] + 1  # the resume restarted from a checkpoint, not from the kill
    assert sorted(by_step.items()) == _batches(full)


def test_a_resumed_run_keeps_the_metrics_its_first_part_logged(tmp_path, cache_dir, capsys):
    """Lightning's CSV logger deletes ``metrics.csv`` when it starts in a directory that has one;
    a run resumed with ``ckpt_path=last`` keeps the rows of the steps before its checkpoint."""
    import csv

    run = tmp_path / "run"
    log1 = ["trainer.log_every_n_steps=1"]
    _train_in_process(_stage0_args(run, cache_dir, 4, *log1), capsys)
    _train_in_process(_stage0_args(run, cache_dir, 8, *log1, "ckpt_path=last"), capsys)
    with open(run / "csv" / "metrics.csv", newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert steps == list(range(min(steps), 8)) and min(steps) <= 1, steps


def test_published_pangu_recipes_compose_with_their_values(tmp_path):
    """``experiment=pangu7b_stage1`` alone: the stage, backbone, strategy and trainer it chooses
    (``override /group`` in the file), and the published hyperparameters."""
    from fluid.config import check_group_overrides
    from tests.conftest import compose_cfg

    assert check_group_overrides(["experiment=pangu7b_stage1"]) is None
    c = compose_cfg(["experiment=pangu7b_stage1"], tmp_path)
    lora, optim = c.stage.module.lora, c.stage.module.optim
    assert (c.backbone.name, c.stage.id, c.stage.max_steps) == ("pangu7b", 1, 32000)
    assert (lora.enabled, lora.r, lora.alpha, lora.target_modules) == (True, 16, 32, "all-linear")
    assert (optim.lr, optim.scheduler, optim.warmup_ratio) == (2e-4, "cosine", 0.1)
    assert (c.masking.horizon, c.data.batch_size, c.data.max_length) == (16, 2, 1024)
    assert (c.trainer.devices, c.trainer.precision, c.strategy.stage) == (8, "bf16-mixed", 2)
    assert "DeepSpeedStrategy" in c.strategy._target_
    c2 = compose_cfg(["experiment=pangu7b_stage2"], tmp_path)
    assert (c2.stage.id, c2.stage.max_steps, c2.stage.module.horizon, c2.tau.value) == (2, 2000, 16, 2.8)
    assert "DDPStrategy" in c2.strategy._target_
    # a choice given on the command line wins; a contradicting stage or backbone is refused
    assert "DDPStrategy" in compose_cfg(["experiment=pangu7b_stage1", "strategy=ddp"], tmp_path).strategy._target_
    assert check_group_overrides(["experiment=pangu7b_stage1", "strategy=ddp"]) is None
    assert check_group_overrides(["experiment=pangu7b_stage1", "stage=2"]).startswith("stage=2: experiment=pangu7b_stage1")


@pytest.mark.parametrize("overrides,key", [
    (["+trainer.bogus_option=1"], "trainer"),
    (["+logger.csv.bogus_option=1"], "logger.csv"),
    (["data=jsonl", "data.source.train_path=/no/such/train.jsonl"], "data.source.train_path"),
    (["data=jsonl", "data.source.train_path=TMP/empty.jsonl", "data.source.val_path=TMP/empty.jsonl"], "data.source"),
    (["data=jsonl", "data.source.train_path=TMP/long.jsonl", "data.source.val_path=TMP/long.jsonl", "data.max_length=4"],
     "data.max_length"),
    (["data=jsonl"], "data.source.train_path: must be set"),
    (["data=jsonl", "data.source.train_path=TMP/types.jsonl"], "data.source: " + "TMP/types.jsonl:2 has a 'prompt'"),
    (["data=jsonl", "data.source.train_path=TMP/user.jsonl"], "data.source: " + "TMP/user.jsonl:1 ends with a 'user'"),
    (["stage.module.optim.lrr=1"], "stage.module.optim.lrr: not a key of this config (did you mean stage.module.optim.lr"),
    (["stage=1", "stage.publish=TMP/empty.jsonl/artifacts/link"], "paths.artifacts_dir: cannot create"),
], ids=["trainer", "logger", "jsonl", "empty-jsonl", "too-long-jsonl", "jsonl-unset", "jsonl-types", "jsonl-user-turn",
        "unknown-key", "artifacts-under-a-file"])
def test_errors_from_building_objects_keep_one_line(overrides, key, tmp_path, capsys, cache_dir):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "a b c d e f g h", "response": "i j k l m n"}) + "\n")
    (tmp_path / "types.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n"
                                          + json.dumps({"prompt": ["a"], "response": "b"}) + "\n")
    (tmp_path / "user.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    key = key.replace("TMP", str(tmp_path))
    overrides = [o.replace("TMP", str(tmp_path)) for o in overrides]
    code, err = run_main("train", [*overrides, f"paths.cache_dir={cache_dir}", "trainer.max_steps=2"], tmp_path, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}"), err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "artifacts").exists()


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """A full disk in the middle of a save: the previous last.ckpt is intact, no partial file is
    left, and the temporary file lived beside the checkpoint (one filesystem: a rename)."""
    import errno

    import torch

    from fluid.utils import ckpt_io
    from fluid.utils.errors import FluidRunError

    io = ckpt_io.AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, last)
    seen = []
    real_save = torch.save

    def full_disk(obj, f):
        seen.append(Path(f.name))
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", full_disk)
    with pytest.raises(FluidRunError, match="checkpoint: no space left writing .*the previous checkpoint is intact"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, last)
    monkeypatch.setattr(ckpt_io.torch, "save", real_save)
    assert seen and seen[0].parent == last.parent
    assert torch.load(last, weights_only=True)["step"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def test_global_batch_gives_the_per_device_batch_and_accumulation(tmp_path):
    from omegaconf import open_dict

    from fluid.train import _apply_global_batch
    from fluid.utils.errors import FluidConfigError
    from fluid.validate import derive_batch
    from tests.conftest import compose_cfg

    assert derive_batch(16, 2, 8) == (2, 1)
    assert derive_batch(16, 2, 2) == (2, 4)
    assert derive_batch(16, 2, 1) == (2, 8)
    assert derive_batch(24, 16, 1) == (12, 2)  # the largest batch that divides the share evenly
    assert derive_batch(12, 5, 2) == (3, 2)
    with pytest.raises(FluidConfigError, match="not divisible by the 8 devices"):
        derive_batch(12, 2, 8)
    for devices, want in ((1, (2, 8)), (2, (2, 4)), (8, (2, 1))):
        cfg = compose_cfg(["stage=1", "data.batch_size=2", "data.global_batch_size=16", f"trainer.devices={devices}"],
                          tmp_path)
        with open_dict(cfg):
            _apply_global_batch(cfg)
        assert (cfg.data.batch_size, cfg.trainer.accumulate_grad_batches) == want


@pytest.mark.parametrize("name", ["auto", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_each_strategy_composes_and_constructs_on_cpu(name, tmp_path):
    from fluid.train import _strategy
    from tests.conftest import compose_cfg

    strategy = _strategy(compose_cfg([f"strategy={name}"], tmp_path))
    expected = {"auto": "str", "ddp": "DDPStrategy", "deepspeed_zero2": "DeepSpeedStrategy",
                "deepspeed_zero3": "DeepSpeedStrategy", "fsdp": "FSDPStrategy"}[name]
    assert type(strategy).__name__ == expected


def test_slurm_launcher_takes_its_resources_from_the_trainer():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fluid.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "trainer.num_nodes=2", "trainer.devices=8",
                                "hydra.launcher.partition=gpu"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 8, 8, "gpu")
    assert launcher.signal_delay_s > 0


def test_bad_prompt_files_and_mask_ids_fail_with_one_line(tmp_path, capsys, tiny_checkpoint):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{not json\n')
    no_keys = tmp_path / "nokeys.jsonl"
    no_keys.write_text('{"text": "no prompt here"}\n')
    for f, message in ((bad_json, "bad.jsonl:2 is not valid JSON"), (no_keys, "nokeys.jsonl:1 has no 'prompt'")):
        code, err = run_main("generate", [f"prompt_file={f}"], tmp_path, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: prompt_file:") and message in lines[0], err
    code, err = run_main("generate", ["prompts=[hi]", "mask_token_id=100000", "decode.horizon=fixed"], tmp_path, capsys,
                         checkpoint=tiny_checkpoint)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: mask_token_id: 100000 is outside"), err


@pytest.mark.slow
def test_ddp_resume_sees_the_same_data(tmp_path, cache_dir):
    """Two CPU processes: an uninterrupted 10-step run against a 4-step run resumed to 10 with
    ``ckpt_path=last`` (6 batches a rank an epoch): rank 0 sees the same batch at every step.
    About 100 s on 2 cores (three DDP runs)."""
    def cmd(run, steps, *extra):
        return [*_stage0_cmd(run, cache_dir, steps, *extra), "trainer.devices=2"]

    full, run = tmp_path / "full", tmp_path / "resumed"
    for c in (cmd(full, 10), cmd(run, 4), cmd(run, 10, "ckpt_path=last")):
        r = subprocess.run(c, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["train/steps"] == 10
    assert sorted(dict(_batches(run)).items()) == _batches(full)


# ---------------------------------------------------------------- resuming the right checkpoint
@pytest.fixture(scope="module")
def stage0_run(tmp_path_factory, cache_dir):
    """A 4-step stage-0 run with a checkpoint every 2 steps (its last.ckpt is at step 4)."""
    run = tmp_path_factory.mktemp("resume") / "stage0"
    _train_in_process(_stage0_args(run, cache_dir, 4))
    return run


def _refused(code: int, err: str, key: str, tmp_path) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}:") and "Traceback" not in err, err
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "run" / "checkpoint").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"
    return lines[0]


def test_resume_from_another_stage_or_a_finished_run_is_refused(stage0_run, tmp_path, capsys, cache_dir):
    """A stage-0 checkpoint resumed as stage 1 (Lightning would restore a loop already past
    max_steps and publish stage-0 weights as stage 1), one of another backbone, and one already at
    max_steps: one line each, exit 2, nothing published."""
    last = stage0_run / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={last}", f"paths.cache_dir={cache_dir}", "test=false"]
    line = _refused(*run_main("train", ["stage=1", *common], tmp_path, capsys), "ckpt_path", tmp_path)
    assert "stage 0 (this run: 1)" in line
    line = _refused(*run_main("train", ["stage=0", "backbone=smollm2_135m", *common], tmp_path, capsys),
                    "ckpt_path", tmp_path)
    assert "backbone 'tiny' (this run: 'smollm2_135m')" in line
    line = _refused(*run_main("train", ["stage=0", "trainer.max_steps=4", *common], tmp_path, capsys),
                    "ckpt_path", tmp_path)
    assert "already at step 4" in line


@pytest.mark.parametrize("kind", ["random", "truncated", "not_a_checkpoint"])
def test_a_corrupt_checkpoint_is_named_in_one_line(kind, stage0_run, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    good = (stage0_run / "checkpoints" / "last.ckpt").read_bytes()
    if kind == "random":
        bad.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    else:
        import torch

        torch.save({"weights": [1, 2, 3]}, bad)
    line = _refused(*run_main("train", ["stage=0", f"ckpt_path={bad}"], tmp_path, capsys), "ckpt_path", tmp_path)
    assert str(bad) in line
    code, err = run_cli("convert", [str(stage0_run), "--ckpt", str(bad), "--out", str(tmp_path / "export")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ckpt:") and "Traceback" not in err, err[-2000:]


def test_last_means_the_newest_checkpoint_and_orphans_are_removed(stage0_run, tmp_path, cache_dir, capsys):
    """Resumed twice with different save intervals: one last.ckpt (no last-v1.ckpt left behind
    at an older step), each resume starting where the previous run stopped; a temporary file a
    kill during a save left is removed at the next start."""
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(stage0_run, run)
    orphan = run / "checkpoints" / ".last.ckpt.tmp999999999"  # no such process
    orphan.write_bytes(b"half a checkpoint")
    for steps, every in ((6, 3), (8, 2)):
        args = [c if not c.startswith("callbacks.model_checkpoint.every_n_train_steps=") else
                f"callbacks.model_checkpoint.every_n_train_steps={every}" for c in _stage0_args(run, cache_dir, steps)]
        _train_in_process([*args, "ckpt_path=last"], capsys)
        m = json.loads((run / "metrics.json").read_text())
        assert m["status"] == "completed" and m["train/steps"] == steps
        lasts = sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt"))
        assert lasts == ["last.ckpt"], lasts
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, mmap=True)["global_step"] == steps
        log = (run / "train.log").read_text()  # the run's log (each start appends)
        assert f"resuming from {run / 'checkpoints' / 'last.ckpt'} (step {steps - 2})" in log, log[-3000:]
    assert not orphan.exists()


def test_newest_checkpoint_is_chosen_by_the_step_inside(tmp_path):
    """last.ckpt, an older release's last-v1.ckpt and a SIGTERM's terminated.ckpt: the highest
    step wins whatever the file times say; a live process's temporary file is kept."""
    import time

    import torch

    from fluid.utils.ckpt_io import newest_checkpoint, remove_orphans

    for name, step in (("terminated.ckpt", 7), ("last-v1.ckpt", 5), ("last.ckpt", 4)):  # written oldest-step last
        torch.save({"global_step": step}, tmp_path / name)
        time.sleep(0.01)
    assert newest_checkpoint(tmp_path).name == "terminated.ckpt"
    (tmp_path / "terminated.ckpt").unlink()
    assert newest_checkpoint(tmp_path).name == "last-v1.ckpt"
    assert newest_checkpoint(tmp_path / "none") is None
    live = subprocess.Popen(["sleep", "30"])
    try:
        keep, gone = tmp_path / f".last.ckpt.tmp{live.pid}", tmp_path / ".last.ckpt.tmp999999999"
        keep.write_bytes(b"x")
        gone.write_bytes(b"x")
        assert remove_orphans(tmp_path) == [gone] and keep.exists() and not gone.exists()
    finally:
        live.kill()


def test_only_rank_zero_reads_and_writes_the_run_status(tmp_path, capsys, monkeypatch, caplog):
    """A relaunched rank (RANK=1) of a multi-device run neither warns about the status rank 0 just
    wrote ("running elsewhere") nor overwrites it."""
    import logging

    run = tmp_path / "run"
    run.mkdir()
    status = {"status": "running", "pid": os.getppid()}  # a live process: what rank 0 writes at its start
    (run / "metrics.json").write_text(json.dumps(status))
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.WARNING):
        code, err = run_main("train", ["stage.module.optim.lr=-1"], tmp_path, capsys)  # fails fast, after the status
    assert code == 2
    log = (run / "train.log").read_text()
    assert "running elsewhere" not in log + caplog.text + err, log  # the warning went to the job log
    assert json.loads((run / "metrics.json").read_text()) == status


def test_paths_that_cannot_be_written_fail_before_work(tmp_path, capsys, tiny_checkpoint):
    """A run directory under a file (Hydra would fail with a traceback), and a generate output
    whose directory is a file (found after decoding before): one line, before any work."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for module in ("train", "evaluate", "generate"):
        r = subprocess.run([sys.executable, "-m", f"fluid.{module}", f"hydra.run.dir={a_file}/run"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines == [f"error: hydra.run.dir: cannot create '{a_file}/run': '{a_file}' is a file"], \
            (module, r.stderr[-2000:])
    code, err = run_main("generate", ["prompts=[hi]", f"output={a_file}/out.jsonl"], tmp_path, capsys,
                         checkpoint=tiny_checkpoint)
    assert code == 2 and err.strip().splitlines() == [f"error: output: cannot create '{a_file}': '{a_file}' is a file "
                                                      "(give a file path in a writable directory)"], err


def test_a_full_disk_during_a_save_is_one_line(tmp_path, capsys, cache_dir, monkeypatch):
    """No space left while a checkpoint is written: one line (a failed run, exit 3), not Lightning's
    55-line traceback; nothing published."""
    import errno

    from fluid.utils import ckpt_io

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", full)
    code, err = run_main("train", ["experiment=tiny_stage0", "trainer.max_steps=2",
                                   "callbacks.model_checkpoint.every_n_train_steps=1", "data.source.n_train=32",
                                   "data.source.n_val=4", "test=false",
                                   f"paths.cache_dir={cache_dir}", "trainer.enable_progress_bar=false"], tmp_path, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 3 and lines[-1].startswith("failed: checkpoint: no space left writing"), err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "artifacts").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("overrides,line", [
    (["stage=1"], "# recipe: none (the stage's own defaults"),
    (["experiment=tiny_stage1"], "# recipe: conf/experiment/tiny_stage1.yaml (experiment=tiny_stage1)"),
    (["stage=1", "experiment=tiny_stage1_long"], "# recipe: conf/experiment/tiny_stage1_long.yaml (experiment="),
])
def test_a_run_names_the_recipe_it_applied(overrides, line, tmp_path, capsys):
    """A recipe applies only when the command line names it, and the run says which, in
    config.yaml and in its log."""
    code, _ = run_main("train", [*overrides, "stage.module.optim.lr=-1"], tmp_path, capsys)  # stops after writing them
    assert code == 2
    assert (tmp_path / "run" / "config.yaml").read_text().splitlines()[0].startswith(line)
    assert line[2:] in (tmp_path / "run" / "train.log").read_text()
