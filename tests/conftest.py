"""Shared fixtures: tiny models and tokenizers built locally, configs composed with Hydra's
compose API into tmp_path, everything on CPU in float32."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fluid.config import CONF_DIR, quote_numeric_group_overrides, register_resolvers  # noqa: E402

register_resolvers()
ROOT = Path(__file__).resolve().parent.parent


def compose_cfg(overrides: list[str], out_dir: Path, cache_dir: Path | None = None):
    """Compose the real ``train`` config, with run outputs in ``out_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=quote_numeric_group_overrides(overrides),
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.output_root = str(out_dir / "outputs")
        if cache_dir is not None:
            cfg.paths.cache_dir = str(cache_dir)
        del cfg.hydra
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fluid-cache")


@pytest.fixture(scope="session")
def arith_tokenizer(cache_dir):
    from fluid.data.tokenizer import build_arith_tokenizer

    return build_arith_tokenizer(cache_dir)


TINY_ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
}


def tiny_model(arch: str = "llama", vocab_size: int = 128, seed: int = 0, **kw):
    """A tiny random causal LM of the given architecture (fp32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, vocab_size=vocab_size)
    params.update({k: v for k, v in TINY_ARCHS[arch].items() if k != "model_type"})
    params.update(kw)
    config = AutoConfig.for_model(TINY_ARCHS[arch]["model_type"], **params)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, arith_tokenizer) -> Path:
    """A tiny random Llama + the arith tokenizer saved as a plain HF directory."""
    out = tmp_path_factory.mktemp("tiny-ckpt")
    model = tiny_model("llama", vocab_size=len(arith_tokenizer), tie_word_embeddings=True)
    model.save_pretrained(out)
    arith_tokenizer.save_pretrained(out)
    return out
