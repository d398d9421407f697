"""``make demo``: the whole method on the embedded default, ending in one comparison table.

Stage 0 (the AR prior) -> stage 1 (lanes) -> stage 2 (K-head) -> ``fluid.evaluate
benchmark=arith`` on the stage-0 model (AR only) and on the stage-2 model (AR and every FLUID
row), each its own process exactly as a user would run it (:mod:`fluid.demo.steps`). Then
``outputs/demo/report.json``, ``report.md`` and ``speed_accuracy.png`` (:mod:`fluid.demo.report`,
:mod:`fluid.demo.plot`), and a few test problems with their reference answers. The FLUID rows are
declared once, in :mod:`fluid.demo.rows`.

A step whose resolved config and inputs are unchanged since its last completed run in
``out_dir`` is reused (the fingerprint is a hash of the resolved config and of the fingerprints
of the steps it reads from); ``force=true`` reruns everything. Settings: ``conf/demo.yaml``.

    python -m fluid.demo
    python -m fluid.demo force=true
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fluid.config import CONF_DIR, register_resolvers
from fluid.utils.errors import FluidConfigError, one_line_errors
from fluid.utils.signals import GracefulStop, Terminated

log = logging.getLogger("fluid.demo")


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


def run_demo(demo: DictConfig) -> dict[str, Any]:
    from fluid.demo.plot import plot
    from fluid.demo.report import markdown, print_report, report
    from fluid.demo.steps import pipeline
    from fluid.utils.runinfo import write_json

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
    write_json(out / "report.json", rep)
    (out / "report.md").write_text(markdown(rep))
    plot(rep, out / "speed_accuracy.png")
    print_report(rep, out)
    return rep


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
