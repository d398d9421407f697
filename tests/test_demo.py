"""``python -m fluid.demo`` end to end on a tiny budget: every stage and both evaluations run as
their own processes, the report has every row and column, a re-run reuses every step, and a
changed setting reruns only the steps it reaches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SMOKE = ["train=[logger=csv,trainer.enable_progress_bar=false,stage.max_steps=2,trainer.val_check_interval=2,"
         "data.source.n_train=64,data.source.n_val=8,data.source.n_test=8]",
         "evaluate.overrides=[benchmark=arith,progress=false,limit=8,warmup=0]",
         "evaluate.fixed_k=[2,4]", "evaluate.sweep=[0.5]", "examples=2"]


def _demo(out, *extra):
    r = subprocess.run([sys.executable, "-m", "fluid.demo", f"out_dir={out}", *SMOKE, *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


def _reused(stdout: str) -> set[str]:
    return {line.split()[1].rstrip(":") for line in stdout.splitlines() if "reusing it" in line}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, _demo(out)


def test_demo_writes_the_report_table_and_plot(first_run):
    out, stdout = first_run
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["rows"]) == ["ar_prior", "ar_stage1", "fluid", "fluid_fixed_k", "fluid_noverify"]
    for name, row in rep["rows"].items():
        assert all(k in row for k in ("accuracy", "tpf", "tokens_per_s", "speedup_vs_ar", "identical_to_ar")), name
        assert 0.0 <= row["accuracy"] <= 1.0 and row["tokens_per_s"] > 0, name
    assert rep["rows"]["fluid"]["identical_to_ar"] == 1.0  # lossless, even untrained
    assert rep["rows"]["fluid_fixed_k"]["horizon"] in (2, 4)
    assert set(rep["sweep"]) == {"verify_c0.5", "noverify_c0.5"}
    # the same lanes at growing tau: the mean target K* = max{k: mean loss of slots 1..k < tau} never falls
    ks = [rep["tau_sweep_mean_target_k"][t] for t in sorted(rep["tau_sweep_mean_target_k"], key=float)]
    assert len(ks) >= 2 and all(a <= b + 1e-6 for a, b in zip(ks, ks[1:])) and ks[-1] > ks[0], ks
    assert set(rep["timings"]["steps"]) == {"stage0", "stage1", "stage2", "eval_prior", "eval_fluid"}
    assert not any(s["reused"] for s in rep["timings"]["steps"].values())
    assert rep["recipe"]["stage1"]["command"].startswith("python -m fluid.train experiment=tiny_stage1")
    assert len(rep["examples"]) == 2 and all("reference" in e and "correct" in e for e in rep["examples"])
    assert (out / "speed_accuracy.png").stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "| fluid |" in md and "reference" in md
    assert "ar_prior" in stdout and "reference:" in stdout
    assert _reused(stdout) == set()


def test_demo_rerun_reuses_every_step_and_a_change_reruns_what_it_reaches(first_run):
    out, _ = first_run
    before = json.loads((out / "report.json").read_text())
    stdout = _demo(out)
    assert _reused(stdout) == {"stage0", "stage1", "stage2", "eval_prior", "eval_fluid"}
    again = json.loads((out / "report.json").read_text())
    assert again["rows"] == before["rows"]
    stdout = _demo(out, "evaluate.noverify_confidence=0.7")  # only the stage-2 evaluation reads it
    assert _reused(stdout) == {"stage0", "stage1", "stage2", "eval_prior"}


def test_demo_refuses_an_unknown_option(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fluid.demo", f"out_dir={tmp_path}", "stages=3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: stages:")


def test_sigterm_stops_the_demo_and_its_running_step(tmp_path):
    """SIGTERM while a step trains: the step gets the signal (it saves and marks its run
    terminated), the demo exits 143 in bounded time, and no report claims a finished demo."""
    import signal
    import time

    out = tmp_path / "demo"
    slow = [a.replace("stage.max_steps=2,", "stage.max_steps=2000,").replace("trainer.val_check_interval=2,",
                                                                            "trainer.val_check_interval=2000,")
            for a in SMOKE]
    proc = subprocess.Popen([sys.executable, "-m", "fluid.demo", f"out_dir={out}", *slow], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = out / "stage0" / "metrics.json"
    t0 = time.time()
    while time.time() - t0 < 300 and proc.poll() is None:  # the step is running and past its first steps
        log = out / "stage0.log"  # the step's output: Lightning's model summary opens its fit loop
        if status.exists() and log.exists() and "Trainable params" in log.read_text():
            time.sleep(3)  # into training
            break
        time.sleep(0.2)
    child = json.loads(status.read_text())["pid"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1].startswith("terminated: SIGTERM received"), err[-2000:]
    assert json.loads(status.read_text())["status"] == "terminated"
    try:
        os.kill(child, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive and not (out / "report.json").exists()


def test_the_demo_rows_reach_the_evaluation_as_declared():
    """One declaration of the FLUID rows: the evaluation composes exactly those settings (the
    override is rendered in Hydra's grammar, strings that need quotes quoted), every table row and
    every sweep point, with and without verification, has its setting."""
    from omegaconf import OmegaConf

    from fluid.config import CONF_DIR
    from fluid.demo.rows import ROWS, hydra_value, settings, settings_override
    from fluid.utils.compose import compose

    demo = OmegaConf.load(CONF_DIR / "demo.yaml")
    cfg = compose("evaluate", ["~settings", f"+settings={settings_override(demo)}"])
    sets = settings(demo)
    assert OmegaConf.to_container(cfg.settings) == {s.name: s.decode for s in sets}
    assert {s.row for s in sets if s.row} == set(ROWS) - {"ar_prior", "ar_stage1"}
    assert {s.sweep for s in sets if s.sweep} == {f"{v}_c{float(c):g}" for v in ("verify", "noverify")
                                                   for c in demo.evaluate.sweep}
    odd = {"a": "two words", "b": "it's", "c": "true", "d": [1, 2.5, None, False], "e": "fixed", "f": "x,y"}
    cfg = compose("evaluate", ["~settings", f"+settings={hydra_value(odd)}"])
    assert OmegaConf.to_container(cfg.settings) == odd
