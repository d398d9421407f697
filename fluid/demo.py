"""``make demo``: the whole method on the embedded default, ending in one comparison table.

Stage 0 (the AR prior) -> stage 1 (lanes) -> stage 2 (K-head) -> ``fluid.evaluate
benchmark=arith`` on the stage-0 model (AR only) and on the stage-2 model (AR and every FLUID
row), each its own process exactly as a user would run it. Then ``outputs/demo/report.json``,
``report.md`` and ``speed_accuracy.png``, and a few test problems with their reference answers.

A step whose resolved config and inputs are unchanged since its last completed run in
``out_dir`` is reused (the fingerprint is a hash of the resolved config and of the fingerprints
of the steps it reads from); ``force=true`` reruns everything. Settings: ``conf/demo.yaml``.

    python -m fluid.demo
    python -m fluid.demo force=true
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fluid.config import CONF_DIR, expand_recipe, quote_numeric_group_overrides, register_resolvers
from fluid.utils.errors import FluidConfigError, FluidRunError, one_line_errors
from fluid.utils.signals import GracefulStop, Terminated

log = logging.getLogger("fluid.demo")
CHILD_GRACE_S = 60  # how long a step may take to save and stop after the demo passes it a signal
ROWS = ("ar_prior", "ar_stage1", "fluid", "fluid_fixed_k", "fluid_noverify")
COLUMNS = ("accuracy", "tpf", "tokens_per_s", "speedup_vs_ar", "identical_to_ar")


# ------------------------------------------------------------------ steps and their fingerprints
def compose(config_name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    """The config ``python -m fluid.<config_name> OVERRIDES`` would run with, resolved, with the
    run's own directory in ``paths.output_dir`` and no ``hydra`` node."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from fluid.decoding.config import register_decode_config

    register_resolvers()
    register_decode_config()
    argv = quote_numeric_group_overrides(expand_recipe(list(overrides)))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=argv)
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


def pipeline(demo: DictConfig) -> list[Step]:
    out = Path(demo.out_dir).resolve()
    train = list(demo.train)
    s0 = Step("stage0", "train", "train", ["stage=0", *train, *demo.stage0], out, [])
    ckpt0 = s0.run_dir / "checkpoint"
    s1 = Step("stage1", "train", "train", ["stage=1", f"backbone.path={ckpt0}", *train, *demo.stage1], out, [s0])
    ckpt1 = s1.run_dir / "checkpoint"
    s2 = Step("stage2", "train", "train", ["stage=2", f"stage.init_checkpoint={ckpt1}", *train, *demo.stage2], out,
              [s1])
    ev = list(demo.evaluate.overrides)
    e0 = Step("eval_prior", "evaluate", "evaluate", [f"checkpoint={ckpt0}", *ev, "~settings", "+settings={}"], out, [s0])
    e2 = Step("eval_fluid", "evaluate", "evaluate",
              [f"checkpoint={s2.run_dir / 'checkpoint'}", *ev, "~settings", f"+settings={settings_override(demo)}"], out, [s2])
    return [s0, s1, s2, e0, e2]


def eval_settings(demo: DictConfig) -> dict[str, dict]:
    """The FLUID rows of the stage-2 evaluation: the K-head, each fixed horizon, no verification,
    and the confidence sweep with and without verification (for the plot)."""
    s: dict[str, dict] = {"fluid": {}}
    for k in demo.evaluate.fixed_k:
        s[f"fixed_k{k}"] = {"horizon": "fixed", "fixed_k": int(k)}
    s["noverify"] = {"verify": False, "confidence": float(demo.evaluate.noverify_confidence)}
    for c in demo.evaluate.sweep:
        s[f"sweep_verify_c{_pct(c)}"] = {"confidence": float(c)}
        if float(c) != float(demo.evaluate.noverify_confidence):  # else it is the noverify row itself
            s[f"sweep_noverify_c{_pct(c)}"] = {"verify": False, "confidence": float(c)}
    return s


def _sweep_name(demo: DictConfig, verify: str, c: float) -> str:
    if verify == "noverify" and float(c) == float(demo.evaluate.noverify_confidence):
        return "noverify"
    return f"sweep_{verify}_c{_pct(c)}"


def _pct(c: float) -> str:
    """A confidence as a name Hydra's override grammar takes as a key (0.5 -> 50)."""
    return f"{round(float(c) * 100):d}"


def settings_override(demo: DictConfig) -> str:
    return json.dumps(eval_settings(demo), separators=(",", ":")).replace('"', "")


# ------------------------------------------------------------------ the report
def report(demo: DictConfig, steps: list[Step], timings: dict[str, Any]) -> dict[str, Any]:
    s0, s1, s2, e0, e2 = steps
    prior, ev = e0.metrics(), e2.metrics()
    rows: dict[str, dict] = {}

    def row(metrics: dict, name: str, **extra) -> dict:
        r = {c: metrics.get(f"{name}/{c}") for c in COLUMNS}
        return {**r, **extra}

    rows["ar_prior"] = row(prior, "ar", speedup_vs_ar=None, identical_to_ar=None, checkpoint=str(s0.run_dir / "checkpoint"))
    rows["ar_stage1"] = row(ev, "ar", speedup_vs_ar=1.0, identical_to_ar=1.0, checkpoint=str(s1.run_dir / "checkpoint"))
    # ar_prior is decoded in its own process (another checkpoint): its tokens/s is reported, but a
    # ratio to ar_stage1 across processes would measure machine noise, not the method
    rows["fluid"] = row(ev, "fluid", horizon="K-head", verify=True, confidence=e2.cfg.decode.confidence)
    fixed = {int(k): row(ev, f"fixed_k{k}") for k in demo.evaluate.fixed_k}
    best_k = max(fixed, key=lambda k: (fixed[k]["tpf"] or 0.0, fixed[k]["tokens_per_s"] or 0.0))
    rows["fluid_fixed_k"] = {**fixed[best_k], "horizon": best_k, "verify": True,
                             "all_fixed_k": {k: {"tpf": v["tpf"], "tokens_per_s": v["tokens_per_s"]} for k, v in fixed.items()}}
    rows["fluid_noverify"] = row(ev, "noverify", horizon="K-head", verify=False,
                                 confidence=float(demo.evaluate.noverify_confidence))
    sweep = {f"{v}_c{c:g}": row(ev, _sweep_name(demo, v, c), confidence=float(c), verify=v == "verify")
             for v in ("verify", "noverify") for c in demo.evaluate.sweep}
    s2m = s2.metrics()
    taus = {k.split("tau", 1)[1]: v for k, v in s2m.items() if k.startswith("val/mean_target_k_tau")}
    tau_sweep = {str(t): taus[t] for t in sorted(taus, key=float)}
    rep = {
        "rows": rows,
        "sweep": sweep,
        "tau_sweep_mean_target_k": tau_sweep,
        "khead": {"tau": s2.cfg.tau.value, "val_mean_target_k": s2m.get("val/mean_target_k"),
                  "val_mean_pred_k": s2m.get("val/mean_pred_k"), "val_head_acc": s2m.get("val/head_acc"),
                  "eval_mean_horizon": ev.get("fluid/mean_horizon")},
        "timings": timings,
        "eval": {"n_samples": ev.get("n_samples"), "batch_size": ev.get("batch_size"), "device": ev.get("device"),
                 "threads": ev.get("threads"), "dtype": ev.get("dtype")},
        "recipe": {s.name: {"command": "python -m fluid." + s.module + " " + " ".join(s.overrides),
                            "fingerprint": s.fingerprint, **recipe_summary(s.cfg)} for s in steps},
        "examples": examples(e2.run_dir / "samples.jsonl", int(demo.examples)),
    }
    return rep


def recipe_summary(cfg: DictConfig) -> dict[str, Any]:
    """The values that make the recipe, from a step's resolved config."""
    pick = {"stage": "stage.id", "max_steps": "stage.max_steps", "lr": "stage.module.optim.lr",
            "batch_size": "data.batch_size", "lora": "stage.module.lora.enabled", "horizon": "masking.horizon",
            "ar_weight": "stage.module.loss.ar_weight", "tau": "tau.value", "hidden_size": "backbone.scratch.hidden_size",
            "layers": "backbone.scratch.num_hidden_layers", "n_train": "data.source.n_train",
            "max_operand": "data.source.max_operand", "benchmark": "benchmark.name", "limit": "limit",
            "decode_batch_size": "decode.batch_size", "confidence": "decode.confidence"}
    out = {}
    for name, key in pick.items():
        v = OmegaConf.select(cfg, key, default=None)
        if v is not None and (name != "horizon" or OmegaConf.select(cfg, "stage.id", default=None) == 1):
            out[name] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    return out


def examples(samples_path: Path, n: int) -> list[dict]:
    if not samples_path.exists() or n < 1:
        return []
    out = []
    with open(samples_path) as f:
        for line in f:
            r = json.loads(line)
            out.append({"question": r.get("question"), "reference": r["reference"],
                        "fluid_output": r["fluid"]["output"], "correct": r["fluid"]["correct"],
                        "identical_to_ar": r["fluid"].get("identical_to_ar")})
            if len(out) == n:
                break
    return out


STEPS = ("stage0", "stage1", "stage2", "eval_prior", "eval_fluid")


def _ordered(steps: dict) -> list:
    return sorted(steps.items(), key=lambda kv: STEPS.index(kv[0]) if kv[0] in STEPS else len(STEPS))


def _step_time(name: str, t: dict) -> str:
    if not t.get("reused"):
        return f"{name} {t['seconds']:.0f} s"
    took = t.get("original_seconds")
    return f"{name} reused" + (f" (its run: {took:.0f} s)" if took else "")


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rep: dict) -> list[list[str]]:
    specs = {"accuracy": ".4f", "tpf": ".2f", "tokens_per_s": ".0f", "speedup_vs_ar": ".2f", "identical_to_ar": ".3f"}
    rows = []
    for name in ROWS:
        r = rep["rows"][name]
        label = name + (f" (K={r['horizon']})" if name == "fluid_fixed_k" else "")
        rows.append([label] + [_fmt(r.get(c), specs[c]) for c in COLUMNS])
    return rows


def markdown(rep: dict) -> str:
    header = ["row", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table(rep)]
    t = rep["timings"]
    ev = rep["eval"]
    text = [f"# FLUID demo: the embedded pipeline on {ev['device']} ({ev['threads']} threads, {ev['dtype']})", "",
            f"arith test split, {ev['n_samples']} problems, decode batch {ev['batch_size']}; "
            "every row decodes the same prompts with the same batching.", "", *lines, "",
            "Seconds per step: " + ", ".join(_step_time(k, v) for k, v in _ordered(t["steps"]))
            + (f"; install {t['install_s']:.0f}" if t.get("install_s") else "") + f"; total {t['total_s']:.0f}.", "",
            "Mean target K over the stage-2 validation lanes by tau: "
            + ", ".join(f"tau {k}: {v:.2f}" for k, v in rep["tau_sweep_mean_target_k"].items()), "",
            "## Test problems (the first of the split)", ""]
    for e in rep["examples"]:
        mark = "right" if e["correct"] else "WRONG"
        text += [f"- **Q:** {e['question']}", f"  **FLUID:** {e['fluid_output'].strip()!r}",
                 f"  **reference:** {e['reference']} ({mark})"]
    text += ["", "Commands:", ""] + [f"- `{v['command']}`" for v in rep["recipe"].values()]
    return "\n".join(text) + "\n"


def plot(rep: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=130)
    rows = rep["rows"]
    # the K-head and the best fixed horizon often coincide: the square is hollow so both show
    # the two AR stars lie close together: the upper one is labelled above-left, the other below-right
    above, below = (-10, 10), (8, -14)
    prior_up = rows["ar_prior"].get("accuracy", 0) >= rows["ar_stage1"].get("accuracy", 0)
    styles = [("ar_prior", dict(marker="*", s=240, color="dimgray"), above if prior_up else below),
              ("ar_stage1", dict(marker="*", s=260, color="black"), below if prior_up else above),
              ("fluid", dict(marker="o", s=90, color="tab:blue"), (10, -16)),
              ("fluid_fixed_k", dict(marker="s", s=190, facecolors="none", edgecolors="tab:green", linewidths=2),
               (10, 8)),
              ("fluid_noverify", dict(marker="^", s=80, color="tab:red"), (10, -14))]
    for name, style, offset in styles:
        r = rows[name]
        if r.get("tokens_per_s") is None:
            continue
        label = name if name != "fluid_fixed_k" else f"fluid_fixed_k (K={r['horizon']})"
        ax.scatter([r["tokens_per_s"]], [r["accuracy"]], label=label, zorder=3, **style)
        note = (f"K={r['horizon']}" if name == "fluid_fixed_k" else name) + (f", TPF {r['tpf']:.1f}" if r.get("tpf") else "")
        if name in ("fluid", "fluid_noverify") and r.get("confidence") is not None:
            note += f", c={r['confidence']:g}"
        ax.annotate(note, (r["tokens_per_s"], r["accuracy"]), textcoords="offset points", xytext=offset, fontsize=8,
                    ha="right" if offset[0] < 0 else "left")
    own = {"verify": rows["fluid"], "noverify": rows["fluid_noverify"]}  # the rows lie on their lines
    for verify, color in [("verify", "tab:blue"), ("noverify", "tab:red")]:
        pts = [(v["tokens_per_s"], v["accuracy"], v["confidence"]) for k, v in rep["sweep"].items()
               if k.startswith(verify + "_") and v.get("tokens_per_s")]
        mine = own[verify]
        labelled = list(pts)  # the row's own point is labelled by the row
        if mine.get("tokens_per_s") and mine.get("confidence") is not None:
            pts = [p for p in pts if p[2] != mine["confidence"]]
            labelled = list(pts)
            pts.append((mine["tokens_per_s"], mine["accuracy"], mine["confidence"]))
        if pts:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color=color, alpha=0.6, zorder=2,
                    label=f"confidence sweep, {'lossless' if verify == 'verify' else 'no verification'}")
            for i, (x, y, c) in enumerate(sorted(labelled)):  # alternate above and below
                ax.annotate(f"c={c:g}", (x, y), textcoords="offset points", xytext=(-6, 8 if i % 2 else -14),
                            fontsize=7, color=color)
    xs = [r["tokens_per_s"] for r in rows.values() if r.get("tokens_per_s")]
    xs += [v["tokens_per_s"] for v in rep["sweep"].values() if v.get("tokens_per_s")]
    ys = [r["accuracy"] for r in rows.values() if r.get("accuracy") is not None]
    ys += [v["accuracy"] for v in rep["sweep"].values() if v.get("accuracy") is not None]
    ax.set_xlim(0, max(xs) * 1.15 if xs else 1)
    lo = min(ys) if ys else 0.0
    ax.set_ylim(max(0.0, lo - 0.05), 1.01)
    ax.set_xlabel("decoding speed, tokens/s (higher is faster)")
    ax.set_ylabel("accuracy (exact match)")
    ev = rep["eval"]
    ax.set_title(f"FLUID demo: accuracy vs speed, arith test ({ev['n_samples']} problems, batch {ev['batch_size']},"
                 f" {ev['device']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _install_seconds(pipeline_s: float) -> float | None:
    """The install time the Makefile measured, when that install was part of this ``make demo``
    (it finished just before the pipeline started)."""
    path = Path(sys.prefix) / "install_seconds"
    try:
        seconds = float(path.read_text().strip())
        fresh = time.time() - path.stat().st_mtime < pipeline_s + 120
    except (OSError, ValueError):
        return None
    return seconds if fresh else None


# ------------------------------------------------------------------ command
def run_demo(demo: DictConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(demo.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = pipeline(demo)
    timings: dict[str, Any] = {"steps": {}}
    ran: set[str] = set()
    for step in steps:  # a step whose inputs were just rebuilt runs again too
        t = step.run(bool(demo.force) or any(u.name in ran for u in step.upstream))
        timings["steps"][step.name] = t
        if not t["reused"]:
            ran.add(step.name)
    timings["pipeline_s"] = time.perf_counter() - t0
    install = _install_seconds(timings["pipeline_s"])
    if install is not None:
        timings["install_s"] = install
    timings["total_s"] = timings["pipeline_s"] + (install or 0.0)
    rep = report(demo, steps, timings)
    from fluid.utils.runinfo import write_json

    write_json(out / "report.json", rep)
    (out / "report.md").write_text(markdown(rep))
    plot(rep, out / "speed_accuracy.png")
    _print(rep, out)
    return rep


def _print(rep: dict, out: Path) -> None:
    header = ["row", *COLUMNS]
    rows = [header] + table(rep)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    ev = rep["eval"]
    print(f"(arith test, {ev['n_samples']} problems, batch {ev['batch_size']}, {ev['device']}, {ev['threads']} threads)")
    print()
    for e in rep["examples"]:
        mark = "right" if e["correct"] else "WRONG"
        print(f"Q: {e['question']}\nFLUID: {e['fluid_output'].strip()}\nreference: {e['reference']}  -> {mark}\n")
    t = rep["timings"]
    print("time: " + ", ".join(_step_time(k, v) for k, v in _ordered(t["steps"])) + f"; pipeline {t['pipeline_s']:.0f} s")
    print(f"report: {out / 'report.md'}, {out / 'report.json'}, plot: {out / 'speed_accuracy.png'}")


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    register_resolvers()
    demo = OmegaConf.load(CONF_DIR / "demo.yaml")
    try:
        demo = OmegaConf.merge(demo, OmegaConf.from_dotlist(argv))
    except Exception as e:  # noqa: BLE001 - a bad KEY=VALUE: one line
        raise FluidConfigError("demo", f"bad override in {argv}: {str(e).splitlines()[0]}") from None
    unknown = sorted(set(demo.keys()) - set(OmegaConf.load(CONF_DIR / "demo.yaml").keys()))
    if unknown:
        raise FluidConfigError(unknown[0], "is not a fluid.demo option", "see conf/demo.yaml")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        with GracefulStop():  # SIGTERM / SIGINT: the running step gets the signal too, then the demo exits
            run_demo(demo)
    except Terminated as e:
        print(f"terminated: {e} (finished steps are kept and reused by the next run)", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
