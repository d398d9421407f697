"""What an evaluation shows: the side-by-side table (printed and as Markdown), the
speed/accuracy plot and the dashboard entries (W&B or any Lightning logger)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

# (column, metric key, format)
COLUMNS = [("accuracy", "accuracy", "{:.4f}"), ("TPF", "tpf", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:.1f}"),
           ("speedup", "speedup_vs_ar", "{:.2f}x"), ("identical", "identical_to_ar", "{:.3f}"),
           ("mean accepted", "mean_accepted", "{:.2f}"), ("mean horizon", "mean_horizon", "{:.2f}"),
           ("wall s", "wall_time_s", "{:.1f}")]


def _cell(metrics: dict, prefix: str, key: str, fmt: str) -> str:
    v = metrics.get(f"{prefix}/{key}")
    return "-" if v is None else fmt.format(v)


def table_rows(metrics: dict, names: Sequence[str]) -> list[list[str]]:
    return [[name] + [_cell(metrics, name, key, fmt) for _, key, fmt in COLUMNS] for name in names]


def text_table(metrics: dict, names: Sequence[str]) -> str:
    header = ["setting"] + [c for c, _, _ in COLUMNS]
    rows = [header] + table_rows(metrics, names)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def markdown_table(metrics: dict, names: Sequence[str]) -> str:
    header = ["setting"] + [c for c, _, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(metrics, names)]
    return "\n".join(lines)


def speed_accuracy_plot(points: Sequence[dict], path: str | Path, title: str, x_label: str = "tokens/s") -> Path:
    """Accuracy against speed, one point per decoder setting; the AR baseline is a star.
    ``points``: ``{"name", "x", "accuracy", "ar": bool, "note": str}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for p in points:
        style = dict(marker="*", s=220, color="black", zorder=3) if p.get("ar") else dict(marker="o", s=60, zorder=2)
        ax.scatter([p["x"]], [p["accuracy"]], label=p["name"], **style)
        label = p["name"] + (f" ({p['note']})" if p.get("note") else "")
        ax.annotate(label, (p["x"], p["accuracy"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    xs = [p["x"] for p in points]
    ax.set_xlim(0, max(xs) * 1.25 if xs and max(xs) > 0 else 1)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def log_to_loggers(loggers: Sequence[Any], config: dict, metrics: dict, columns: list[str], rows: list[list],
                   plot: Path | None) -> None:
    """Config, summary metrics, a table of samples and the plot, to each Lightning logger
    (``logger=wandb``: a ``wandb.Table`` and a ``wandb.Image``; other loggers get what they take)."""
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in loggers:
        logger.log_hyperparams(config)
        logger.log_metrics(numeric, step=0)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            run = logger.experiment
            run.log({"samples": wandb.Table(columns=columns, data=rows)}, step=0)
            if plot is not None:
                run.log({"speed_accuracy": wandb.Image(str(plot))}, step=0)
            run.summary.update(numeric)
            run.finish()
        else:
            logger.save()
