"""Config helpers: OmegaConf resolvers and the early check of config-group overrides."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def auto_precision() -> str:
    import torch

    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def register_resolvers() -> None:
    from fluid.sweep import sweep_group

    if not OmegaConf.has_resolver("fluid.auto_precision"):
        OmegaConf.register_new_resolver("fluid.auto_precision", auto_precision)
    if not OmegaConf.has_resolver("fluid.sweep_group"):
        OmegaConf.register_new_resolver("fluid.sweep_group", sweep_group)


def default_path(key: str) -> str:
    """A ``paths.<key>`` of ``conf/paths/default.yaml`` resolved outside Hydra (for scripts)."""
    cfg = OmegaConf.create({"paths": OmegaConf.load(CONF_DIR / "paths" / "default.yaml")})
    return str(OmegaConf.select(cfg, f"paths.{key}", throw_on_missing=True))


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    d = conf_dir / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def check_group_overrides(overrides: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """One-line message for ``group=option`` overrides naming a config file that does not exist."""
    for ov in overrides:
        if "=" not in ov or ov.startswith(("+", "~", "hydra")):
            continue
        key, value = ov.split("=", 1)
        key = key.lstrip("+")
        if "." in key or not (conf_dir / key).is_dir():
            continue
        options = group_options(key, conf_dir)
        for v in value.split(","):  # multirun: a,b,c
            v = v.strip()
            if v and v != "null" and v not in options:
                return f"{key}={v}: unknown option for '{key}'; choose from: {', '.join(options)}"
    return None


def quote_numeric_group_overrides(argv: list[str], conf_dir: Path = CONF_DIR) -> list[str]:
    """``stage=1`` -> ``stage='1'``: Hydra parses a bare number as int, which it refuses as
    a config-group choice; quoting keeps ``stage=0,1,2`` sweeps working too."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and "." not in key and (conf_dir / key.lstrip("+")).is_dir():
            parts = value.split(",")
            if all(p.strip().isdigit() for p in parts):
                arg = key + "=" + ",".join(f"'{p.strip()}'" for p in parts)
        out.append(arg)
    return out
