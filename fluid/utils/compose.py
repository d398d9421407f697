"""Compose a project config outside a Hydra app (scripts, notebooks): the same files, defaults
and overrides as ``python -m fluid.train`` / ``fluid.generate``, no second copy of a default."""

from __future__ import annotations

from typing import Sequence

from omegaconf import DictConfig


def compose(config_name: str, overrides: Sequence[str] = (), *, hydra_runtime: bool = False) -> DictConfig:
    """``compose("generate", ["decode.k_max=8"])``: the composed config (Hydra's own nodes left out).
    ``hydra_runtime``: also make ``HydraConfig.get()`` answer as inside the app (the group
    choices a run reports, such as the recipe), as a test of an entry point needs."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from fluid.config import CONF_DIR, quote_numeric_group_overrides, register_resolvers
    from fluid.decoding.config import register_decode_config

    register_resolvers()
    register_decode_config()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=quote_numeric_group_overrides(list(overrides)),
                            return_hydra_config=hydra_runtime)
    if hydra_runtime:
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra
    return cfg
