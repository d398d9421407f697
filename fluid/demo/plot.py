"""The demo's plot: accuracy against tokens/s for every row and the confidence sweep."""

from __future__ import annotations

from pathlib import Path


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
