"""Tokens per forward of a stage-1 run's checkpoints: the learning curve a recipe is picked from.

    python scripts/learning_curve.py --checkpoints outputs/exports/teacher-step{125,250,375,500} \\
        --steps 125 250 375 500 --limit 32 --out outputs/bench/learning_curve.json

Each checkpoint decodes the first ``--limit`` GSM8K test problems at batch 1 with cost-sized
windows (``decode.window=cost``), lanes only and lanes + n-gram drafts, and the fraction of
lane drafts that verification accepted at each depth is counted. The cost curve is fixed
(``--cost-curve``, the 2-core CPU's measured one by default), so TPF does not depend on what else
the machine runs: no time is reported, but the speedup over AR that the curve predicts is
(``cost_speedup``: AR's cost over the cost of the forwards taken). Prints a table, writes JSON and a plot (``.png`` beside it).
Every row is checked token-identical to the checkpoint's greedy AR output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# relative cost of a forward over 1..17 new tokens, SmolLM2-135M fp32 on 2 CPU cores (docs/results.md)
CPU_CURVE = [1.0, 1.25, 1.42, 1.56, 1.63, 1.70, 1.77, 1.84, 1.88, 1.92, 1.96, 2.0, 2.04, 2.08, 2.12, 2.15, 2.18]
SETTINGS = {"lanes": {"window": "cost", "lane_len": 4},
            "lanes_ngram": {"window": "cost", "lane_len": 4, "ngram": True},
            "ngram": {"window": "cost", "lane_len": 0, "ngram": True}}


def cost_speedup(rows, curve: list[float]) -> float:
    """Speedup over AR that the cost curve predicts: AR's cost (one 1-token forward per token) over
    the cost of the forwards these rows took (``horizons``: the new tokens of each forward)."""
    c = list(curve)
    spent = sum(c[min(q, len(c)) - 1] for r in rows for q in r.horizons)
    return sum(len(r.tokens) for r in rows) * c[0] / spent


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", nargs="+", required=True, help="exported stage-1 directories, in step order")
    ap.add_argument("--steps", nargs="+", type=int, required=True, help="the training step of each checkpoint")
    ap.add_argument("--labels", nargs="*", default=None, help="a series name per checkpoint (default: run)")
    ap.add_argument("--benchmark", default="gsm8k")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--cost-curve", type=float, nargs="+", default=CPU_CURVE)
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="decode settings for every row, e.g. explore=0.5 (recorded in each row)")
    ap.add_argument("--out", default="outputs/bench/learning_curve.json")
    ap.add_argument("--append", action="store_true",
                    help="add these rows to those already in --out (a checkpoint evaluated as its run reaches it)")
    ap.add_argument("--reference", default=None,
                    help="a JSON file caching the original model's greedy tokens (exact mode), reused by later calls")
    args = ap.parse_args(argv)
    if len(args.steps) != len(args.checkpoints) or (args.labels and len(args.labels) != len(args.checkpoints)):
        ap.error("--checkpoints, --steps (and --labels) need one entry each")

    import yaml

    from fluid.decoding.setup import build_decoder
    from fluid.utils.build import build
    from fluid.utils.compose import compose

    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    bench = build(compose("evaluate", [f"benchmark={args.benchmark}"]).benchmark)
    samples = bench.samples(args.limit)
    out = Path(args.out)
    key = {"benchmark": args.benchmark, "limit": args.limit, "max_new_tokens": args.max_new_tokens}
    old = json.loads(out.read_text()) if args.append and out.exists() else None
    if old is not None and {k: old.get(k) for k in key} != key:
        raise SystemExit(f"--append: {out} was measured with {({k: old.get(k) for k in key})}, not {key}")
    rows, original = (old["rows"] if old else []), None
    ref_file = Path(args.reference) if args.reference else None
    if ref_file and ref_file.exists():
        cached = json.loads(ref_file.read_text())
        original = cached["tokens"] if {k: cached.get(k) for k in key} == key else None
    for i, (ckpt, step) in enumerate(zip(args.checkpoints, args.steps)):
        fm, dec = build_decoder(ckpt, {"batch_size": 1, "max_new_tokens": args.max_new_tokens,
                                       **SETTINGS[args.settings[0]]}, device="cpu", stop_strings=list(bench.stop_strings))
        ids = [bench.encode(s, fm.tokenizer) for s in samples]
        # exact mode: greedy AR of every checkpoint is the original model's, decoded once
        exact = fm.meta.lane_adapter is not None
        ref = original if exact and original is not None else dec.generate(ids, algorithm="ar")["tokens"]
        if exact and original is None and ref_file:
            ref_file.parent.mkdir(parents=True, exist_ok=True)
            ref_file.write_text(json.dumps({**key, "tokens": ref}))
        original = ref if exact else original
        row = {"series": args.labels[i] if args.labels else "run", "step": step, "checkpoint": ckpt, **extra}
        for name in args.settings:
            res = dec.generate(ids, cost_curve=args.cost_curve, **{**SETTINGS[name], **extra})
            if res["tokens"] != ref:
                raise SystemExit(f"{ckpt} {name}: not identical to greedy AR (a decoding bug)")
            row[f"{name}/tpf"] = res["tpf"]
            row[f"{name}/cost_speedup"] = cost_speedup(res["rows"], args.cost_curve)
        # lane drafts accepted by depth, from the first setting's counts (n-gram drafts are counted apart)
        acc = next(iter(dec._acceptance.values()))
        row["lane_depth_acceptance"] = (acc.depth_a[1:5] / acc.depth_n[1:5].clip(min=1)).round(3).tolist()
        rows = [r for r in rows if (r["series"], r["step"]) != (row["series"], step)] + [row]
        tpfs = ", ".join(f"{n} {row[f'{n}/tpf']:.3f} ({row[f'{n}/cost_speedup']:.3f}x)" for n in args.settings)
        print(f"{row['series']:>10} step {step:>5}: TPF {tpfs}, lane acceptance by depth "
              f"{row['lane_depth_acceptance']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (r["series"], r["step"]))
    result = {**key, "cost_curve": args.cost_curve, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    _plot(rows, out.with_suffix(".png"))
    print(f"written {out} and {out.with_suffix('.png')}")
    return result


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for series in dict.fromkeys(r["series"] for r in rows):
        rs = [r for r in rows if r["series"] == series]
        for name, style in (("lanes", "o-"), ("lanes_ngram", "s--")):
            if f"{name}/tpf" not in rs[0]:
                continue
            ax.plot([r["step"] for r in rs], [r[f"{name}/tpf"] for r in rs], style, label=f"{series} {name}")
    ax.set_xlabel("stage-1 step")
    ax.set_ylabel("tokens per forward (batch 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
