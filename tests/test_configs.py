"""Every option of every config group composes; cheap ones also instantiate."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from fluid.backbones.spec import BackboneSpec
from fluid.config import CONF_DIR, check_group_overrides, group_options
from tests.conftest import compose_cfg

GROUPS = ["stage", "backbone", "masking", "tau", "data", "trainer", "strategy", "logger", "callbacks",
          "experiment", "debug", "paths"]
EXTRA = {"data": {"jsonl": ["data.source.train_path=/tmp/x.jsonl"]}}
CASES = [(g, o) for g in GROUPS for o in group_options(g)]


def test_every_required_group_has_options():
    for g in GROUPS:
        assert group_options(g), f"config group {g} is empty"
    assert {"0", "1", "2"} <= set(group_options("stage"))
    assert {"tiny", "smollm2_135m", "qwen2_5_0_5b", "qwen2_5_7b", "llama3_8b", "pangu7b"} <= set(
        group_options("backbone"))


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}", *EXTRA.get(group, {}).get(option, [])], tmp_path)
    assert cfg.seed is not None
    # every value resolves (no dangling interpolations)
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group == "backbone":
        spec = BackboneSpec.from_config(cfg.backbone)
        assert spec.name == option
        assert spec.mask_token
        assert spec.trust_remote_code == (option == "pangu7b")
    if group in ("logger", "callbacks"):
        for node in cfg[group].values():
            instantiate(node)
    if group == "trainer":
        instantiate(cfg.trainer, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    if group == "strategy" and "_target_" in cfg.strategy:
        instantiate(cfg.strategy)  # DeepSpeed constructs on CPU; it only refuses at fit time


def test_pangu_mask_token_is_reserved_token():
    cfg = compose_cfg(["backbone=pangu7b"], Path("/tmp"))
    assert cfg.backbone.mask_token == "[unused32]"


def test_unknown_group_option_is_one_line():
    msg = check_group_overrides(["backbone=nope"])
    assert msg.startswith("backbone=nope") and "tiny" in msg and "\n" not in msg
    assert check_group_overrides(["tau.value=1.5,2.8", "trainer.max_steps=3", "backbone=tiny"]) is None
    assert check_group_overrides(["-m", "stage=0,7"]).startswith("stage=7")  # multirun values are checked too
    assert CONF_DIR.is_dir()
