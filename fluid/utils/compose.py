"""Compose a project config outside a Hydra app (scripts, notebooks): the same files, defaults
and overrides as ``python -m fluid.train`` / ``fluid.generate``, no second copy of a default."""

from __future__ import annotations

from typing import Sequence

from omegaconf import DictConfig


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``compose("generate", ["decode.k_max=8"])``: the composed config (Hydra's own nodes left out)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fluid.config import CONF_DIR, quote_numeric_group_overrides, register_resolvers
    from fluid.decoding.config import register_decode_config

    register_resolvers()
    register_decode_config()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=quote_numeric_group_overrides(list(overrides)))
