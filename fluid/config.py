"""Config helpers: OmegaConf resolvers and the early check of config-group overrides."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def auto_precision() -> str:
    import torch

    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def subdir(base: str | None, name: str) -> str | None:
    """``${fluid.subdir:BASE,NAME}``: ``BASE/NAME``, or null when BASE is unset (null or empty)."""
    return f"{base}/{name}" if base else None


def local_copy(base: str | None, name: str) -> str | None:
    """``${fluid.local_copy:BASE,NAME}``: ``BASE/NAME`` when that directory exists, else null (a
    benchmark then loads its public copy): ``FLUID_DATA`` need not hold every data set."""
    return f"{base}/{name}" if base and Path(base, name).is_dir() else None


def register_resolvers() -> None:
    from fluid.sweep import sweep_group

    if not OmegaConf.has_resolver("fluid.auto_precision"):
        OmegaConf.register_new_resolver("fluid.auto_precision", auto_precision)
    if not OmegaConf.has_resolver("fluid.sweep_group"):
        OmegaConf.register_new_resolver("fluid.sweep_group", sweep_group)
    if not OmegaConf.has_resolver("fluid.subdir"):
        OmegaConf.register_new_resolver("fluid.subdir", subdir)
    if not OmegaConf.has_resolver("fluid.local_copy"):
        OmegaConf.register_new_resolver("fluid.local_copy", local_copy)


def _with_default_paths(**nodes) -> DictConfig:
    return OmegaConf.create({"paths": OmegaConf.load(CONF_DIR / "paths" / "default.yaml"), **nodes})


def default_path(key: str) -> str:
    """A ``paths.<key>`` of ``conf/paths/default.yaml`` resolved outside Hydra (for scripts)."""
    return str(OmegaConf.select(_with_default_paths(), f"paths.{key}", throw_on_missing=True))


def default_backbone_path(option: str) -> str:
    """``backbone.path`` of ``conf/backbone/<option>.yaml`` resolved outside Hydra (for scripts)."""
    cfg = _with_default_paths(backbone=OmegaConf.load(CONF_DIR / "backbone" / f"{option}.yaml"))
    return str(OmegaConf.select(cfg, "backbone.path", throw_on_missing=True))


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
            v = v.strip().strip("'\"")  # a relaunched rank sees the quoted form (stage='1')
            if v and v != "null" and v not in options:
                return f"{key}={v}: unknown option for '{key}'; choose from: {', '.join(options)}"
    return _check_recipe(overrides, conf_dir) or _check_run_dir(overrides)


def creatable(path: str | os.PathLike) -> str | None:
    """Why directory ``path`` cannot be created or written (an ancestor that is a file, or not
    writable), else None: checked before work, instead of failing after it."""
    p = Path(path).absolute()
    for anc in (p, *p.parents):
        if anc.exists():
            if not anc.is_dir():
                return f"cannot create {str(p)!r}: {str(anc)!r} is a file"
            if not os.access(anc, os.W_OK | os.X_OK):
                return f"cannot create or write {str(p)!r}: {str(anc)!r} is not writable"
            return None
    return None


def _check_run_dir(overrides: list[str]) -> str | None:
    """``hydra.run.dir=DIR`` that cannot be created: Hydra would fail on it with a traceback."""
    for ov in overrides:
        if ov.startswith("hydra.run.dir="):
            why = creatable(ov.split("=", 1)[1])
            if why:
                return f"hydra.run.dir: {why}"
    return None


def unknown_key_message(error: Exception, overrides: list[str], cfg_keys: list[str]) -> str | None:
    """Hydra's several-line "Could not override 'KEY'" / "Key 'x' is not in struct" as one line
    naming the key and the closest valid keys."""
    text = str(error)
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"full_key: (\S+)", text)
    if not m:
        return None
    key = m.group(1)
    close = difflib.get_close_matches(key, cfg_keys, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see the config with --cfg job"
    return f"{key}: not a key of this config ({hint}; +{key}=VALUE adds a new one)"


def dotted_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config (values not resolved)."""
    out = []
    for k in node.keys() if isinstance(node, DictConfig) else []:
        child = node._get_node(k)
        full = f"{prefix}{k}"
        out.append(full)
        if isinstance(child, DictConfig):
            out += dotted_keys(child, full + ".")
    return out


# the groups a recipe's values are written for: a command line that chooses another option of
# one of them next to the recipe is refused (its values would land on the wrong stage or model);
# any other group the recipe chooses (trainer, strategy, data) the command line may change
RECIPE_GROUPS = ("stage", "backbone")


def experiment_choices(name: str, conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """The group choices ``conf/experiment/NAME.yaml`` makes (``override /stage: "1"`` -> stage: 1)."""
    path = conf_dir / "experiment" / f"{name}.yaml"
    out = {}
    for d in (OmegaConf.load(path).get("defaults") or []) if path.exists() else []:
        if isinstance(d, DictConfig):
            for k, v in d.items():
                if str(k).startswith("override /"):
                    out[str(k)[len("override /"):]] = str(v)
    return out


def _check_recipe(overrides: list[str], conf_dir: Path) -> str | None:
    """``experiment=tiny_stage1 stage=0``: the recipe's stage-1 values would land on stage 0."""
    chosen = {}
    for ov in overrides:
        if "=" in ov and not ov.startswith(("~", "hydra")):
            key, value = ov.split("=", 1)
            chosen[key.lstrip("+")] = [v.strip().strip("'\"") for v in value.split(",")]
    for name in chosen.get("experiment", []):
        made = experiment_choices(name, conf_dir)
        for group in RECIPE_GROUPS:
            other = [v for v in chosen.get(group, []) if group in made and v != made[group]]
            if other:
                return (f"{group}={other[0]}: experiment={name} is a recipe for {group}={made[group]}; "
                        f"drop {group}={other[0]} or choose a recipe for it (conf/experiment)")
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


def preflight(config_name: str, argv: list[str]) -> str | None:
    """The one-line message for command-line overrides that cannot work, checked before Hydra
    runs (whose own messages span several lines): an unknown group option, a recipe for another
    stage, a run directory that cannot be created, a key the config does not have."""
    msg = check_group_overrides(argv)
    if msg or any(a in ("-m", "--multirun") for a in argv):
        return msg
    overrides = [a for a in argv if not a.startswith(("-", "hydra.", "hydra/"))]
    try:
        from fluid.utils.compose import compose

        cfg = compose(config_name, overrides)
    except Exception as e:  # noqa: BLE001 - only an unknown key is reported here; Hydra reports the rest
        keys = _keys_of(config_name)
        return unknown_key_message(e, overrides, keys) if keys else None
    missing = missing_keys(cfg)
    if missing:  # `???` in a config file: OmegaConf would fail on it with a traceback at first use
        return f"{missing[0]}: must be set ({missing[0]}=VALUE)"
    return None


def missing_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys whose value is ``???`` (interpolations are not resolved)."""
    out = []
    for k in node.keys() if isinstance(node, DictConfig) else []:
        child = node._get_node(k)
        if OmegaConf.is_missing(node, k):
            out.append(f"{prefix}{k}")
        elif isinstance(child, DictConfig):
            out += missing_keys(child, f"{prefix}{k}.")
    return out


def _keys_of(config_name: str) -> list[str]:
    try:
        from fluid.utils.compose import compose

        return dotted_keys(compose(config_name, []))
    except Exception:  # noqa: BLE001
        return []


def run_entry_point(config_name: str, hydra_main, argv: list[str] | None = None) -> None:
    """An entry point's ``main``: :func:`preflight` the command line (one line, exit 2), then
    Hydra on it (``stage=1`` quoted, as Hydra takes a group choice only as a string)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    msg = preflight(config_name, argv)
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = quote_numeric_group_overrides(argv)
    hydra_main()
