"""The demo's rows, declared once: the FLUID settings of the stage-2 evaluation (each its name in
``fluid.evaluate``'s ``settings`` and metrics, its decode fields, the table row or sweep point it
fills). The evaluation's override, the report and the plot all read :func:`settings`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from omegaconf import DictConfig

# the table, top to bottom: AR of each model, then the FLUID rows (``Setting.row``)
ROWS = ("ar_prior", "ar_stage1", "fluid", "fluid_fixed_k", "fluid_noverify")
COLUMNS = ("accuracy", "tpf", "tokens_per_s", "speedup_vs_ar", "identical_to_ar")


@dataclass(frozen=True)
class Setting:
    name: str                      # the key in fluid.evaluate's `settings` (and its metrics' prefix)
    decode: dict = field(default_factory=dict)   # DecodeConfig fields over the evaluation's own
    row: str | None = None         # the table row it fills (fluid_fixed_k: the best of its settings)
    sweep: str | None = None       # the confidence-sweep point it is, e.g. "verify_c0.1"

    @property
    def verify(self) -> bool:
        return self.decode.get("verify", True)

    @property
    def confidence(self) -> float | None:
        return self.decode.get("confidence")


def _pct(c: float) -> str:
    """A confidence as a name Hydra's override grammar takes as a key (0.5 -> 50)."""
    return f"{round(float(c) * 100):d}"


def settings(demo: DictConfig) -> list[Setting]:
    """The K-head, each fixed horizon, no verification, and the confidence sweep with and without
    verification (for the plot); a sweep point that equals the no-verification row is that row."""
    ev = demo.evaluate
    nv = float(ev.noverify_confidence)
    sweep = [float(c) for c in ev.sweep]
    out = [Setting("fluid", {}, row="fluid")]
    out += [Setting(f"fixed_k{int(k)}", {"horizon": "fixed", "fixed_k": int(k)}, row="fluid_fixed_k") for k in ev.fixed_k]
    out.append(Setting("noverify", {"verify": False, "confidence": nv}, row="fluid_noverify",
                       sweep=f"noverify_c{nv:g}" if nv in sweep else None))
    for c in sweep:
        out.append(Setting(f"sweep_verify_c{_pct(c)}", {"confidence": c}, sweep=f"verify_c{c:g}"))
        if c != nv:
            out.append(Setting(f"sweep_noverify_c{_pct(c)}", {"verify": False, "confidence": c},
                               sweep=f"noverify_c{c:g}"))
    return out


_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def hydra_value(v) -> str:
    """``v`` (dicts, lists, strings, numbers, booleans, None) in Hydra's override grammar."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    if _PLAIN.match(s) and s.lower() not in ("true", "false", "null", "none", "nan", "inf"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def settings_override(demo: DictConfig) -> str:
    """The evaluation's ``+settings=...`` value."""
    return hydra_value({s.name: s.decode for s in settings(demo)})
