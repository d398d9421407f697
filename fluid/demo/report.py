"""The demo's report: ``report.json`` (every row, the sweep, the K-head, timings, the commands),
``report.md`` and the table printed at the end. Rows come from :mod:`fluid.demo.rows`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fluid.demo.rows import COLUMNS, ROWS, settings
from fluid.demo.steps import STEPS


def report(demo: DictConfig, steps: list, timings: dict[str, Any]) -> dict[str, Any]:
    s0, s1, s2, e0, e2 = steps
    prior, ev = e0.metrics(), e2.metrics()

    def row(metrics: dict, name: str, **extra) -> dict:
        r = {c: metrics.get(f"{name}/{c}") for c in COLUMNS}
        return {**r, **extra}

    sets = settings(demo)
    rows: dict[str, dict] = {
        "ar_prior": row(prior, "ar", speedup_vs_ar=None, identical_to_ar=None, checkpoint=str(s0.run_dir / "checkpoint")),
        # ar_prior is decoded in its own process (another checkpoint): its tokens/s is reported, but a
        # ratio to ar_stage1 across processes would measure machine noise, not the method
        "ar_stage1": row(ev, "ar", speedup_vs_ar=1.0, identical_to_ar=1.0, checkpoint=str(s1.run_dir / "checkpoint")),
    }
    for s in sets:
        if s.row in ("fluid", "fluid_noverify"):
            conf = s.confidence if s.confidence is not None else e2.cfg.decode.confidence
            rows[s.row] = row(ev, s.name, horizon="K-head", verify=s.verify, confidence=conf)
    fixed = {s.decode["fixed_k"]: row(ev, s.name) for s in sets if s.row == "fluid_fixed_k"}
    best_k = max(fixed, key=lambda k: (fixed[k]["tpf"] or 0.0, fixed[k]["tokens_per_s"] or 0.0))
    rows["fluid_fixed_k"] = {**fixed[best_k], "horizon": best_k, "verify": True,
                             "all_fixed_k": {k: {"tpf": v["tpf"], "tokens_per_s": v["tokens_per_s"]} for k, v in fixed.items()}}
    rows = {name: rows[name] for name in ROWS}
    points = {s.sweep: s for s in sets if s.sweep}
    order = [f"{v}_c{float(c):g}" for v in ("verify", "noverify") for c in demo.evaluate.sweep]
    sweep = {k: row(ev, points[k].name, confidence=float(points[k].confidence), verify=points[k].verify) for k in order}
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


def print_report(rep: dict, out: Path) -> None:
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
