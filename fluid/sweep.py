"""Multirun sweeps: a shared W&B group and a summary written when the sweep ends.

``python -m fluid.train -m experiment=tiny_stage2 tau.value=1.5,2.8,4.0`` runs each value in its own run
directory; :class:`SweepSummary` (a Hydra callback) then writes ``summary.json``,
``summary.md`` and ``summary.png`` (tau against mean target K and head accuracy) into the
sweep directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

COLUMNS = ["tau/value", "val/mean_target_k", "val/mean_pred_k", "val/head_acc", "val/head_acc_within1",
           "val/loss", "test/accuracy", "train/loss"]


def sweep_group() -> str | None:
    """The sweep's name in multirun mode (all its runs share one W&B group), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).name
    except (ValueError, ImportError):
        pass
    return None


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for metrics in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: int(p.parent.name)
                          if p.parent.name.isdigit() else 0):
        m = json.loads(metrics.read_text())
        overrides_file = metrics.parent / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        cfg_file = metrics.parent / "config.yaml"
        tau = OmegaConf.load(cfg_file).get("tau", {}).get("value") if cfg_file.exists() else None
        shown = " ".join(o.replace("'", "") for o in overrides)  # stage='2' -> stage=2 (see quote_numeric_...)
        rows.append({"run": metrics.parent.name, "overrides": shown, "tau/value": tau, **m})
    return rows


def write_summary(sweep_dir: str | Path) -> dict[str, Path]:
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        log.warning("no run of the sweep in %s wrote metrics.json", sweep_dir)
        return {}
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    out = {"json": sweep_dir / "summary.json", "md": sweep_dir / "summary.md"}
    out["json"].write_text(json.dumps({"columns": ["run", "overrides", *cols], "rows": rows}, indent=2) + "\n")

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| run | overrides | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    lines += [f"| {r['run']} | {r['overrides']} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    out["md"].write_text("\n".join(lines) + "\n")
    plot = _plot(rows, sweep_dir / "summary.png")
    if plot:
        out["png"] = plot
    log.info("sweep summary: %s", ", ".join(str(p) for p in out.values()))
    return out


def _plot(rows: list[dict], path: Path) -> Path | None:
    pts = sorted((r["tau/value"], r.get("val/mean_target_k"), r.get("val/head_acc")) for r in rows
                 if r.get("tau/value") is not None and r.get("val/mean_target_k") is not None)
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau, k, acc = zip(*pts)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(tau, k, "o-", color="tab:blue", label="mean target K")
    ax.set_xlabel("tau (nats)")
    ax.set_ylabel("mean target K", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(tau, [a if a is not None else float("nan") for a in acc], "s--", color="tab:red", label="head acc")
    ax2.set_ylabel("head accuracy", color="tab:red")
    ax2.set_ylim(0, 1)
    ax.set_title("K-head sweep over tau")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(config.hydra.sweep.dir)
