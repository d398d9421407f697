"""One way from a checkpoint and decode settings to a ready decoder.

``fluid.generate``, ``fluid.evaluate``, the lm-eval model (``fluid.eval.harness``), the scripts and
the server build theirs with :func:`build_decoder`; the rules it applies live here and nowhere else:

- decode settings are parsed and checked by :func:`decode_config` (one line naming the key);
- a setting that needs a K-head (``horizon=head``) or a MASK token is refused on a checkpoint
  without one (:func:`check_decode`), before anything is decoded;
- an explicit ``mask_token_id`` overrides the checkpoint's and must lie in the vocabulary;
- the pad id of a batch is the tokenizer's pad token, else its EOS
  (:func:`fluid.backbones.tokens.pad_token_id`, which the decoder and the export use);
- device and dtype names resolve through :func:`fluid.validate.resolve_device` / ``torch_dtype``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from fluid.decoding.config import DecodeConfig
from fluid.utils.errors import FluidConfigError

DECODE_FIELDS = tuple(f.name for f in dataclasses.fields(DecodeConfig))


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def decode_config(raw: Mapping[str, Any] | DecodeConfig | None = None, key: str = "decode",
                  base: DecodeConfig | None = None) -> DecodeConfig:
    """``raw`` (a mapping of :class:`DecodeConfig` fields, applied on ``base``) as a checked
    config; an unknown field or a bad value is one :class:`FluidConfigError` naming ``key``."""
    if isinstance(raw, DecodeConfig):
        fields = dataclasses.asdict(raw)
    elif raw is None:
        fields = {}
    elif isinstance(raw, Mapping):
        fields = dict(raw)
    else:
        raise FluidConfigError(key, f"must be a mapping of decode fields, got {raw!r}")
    unknown = sorted(set(fields) - set(DECODE_FIELDS))
    if unknown:
        raise FluidConfigError(key, f"unknown decode field(s) {unknown}", f"valid: {', '.join(DECODE_FIELDS)}")
    try:
        return dataclasses.replace(base or DecodeConfig(), **fields).validate()
    except (TypeError, ValueError) as e:
        if isinstance(e, FluidConfigError):
            raise
        raise FluidConfigError(key, str(e)) from None


def field_value(key: str, value):
    """``value`` (from text: lm-eval's ``model_args``, a request; maybe still a string) as
    :class:`DecodeConfig` field ``key``'s type; a value that is not one is a one-line error."""
    kind = str(next(f.type for f in dataclasses.fields(DecodeConfig) if f.name == key))
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if "None" in kind:
            return None
        raise FluidConfigError(key, "cannot be None")
    base = kind.split("|")[0].strip()
    try:
        if base == "bool":
            return as_bool(key, value)
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            return float(value)
        return str(value)
    except (KeyError, TypeError, ValueError):
        raise FluidConfigError(key, f"{value!r} is not a valid {base}") from None


def as_bool(key: str, value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "1", "false", "0"):
            raise FluidConfigError(key, f"{value!r} is not a valid bool")
        return value.lower() in ("true", "1")
    return bool(value)


def check_decode(cfg: DecodeConfig, has_head: bool, mask_id: int | None, key: str = "decode") -> None:
    """What the checkpoint must have for ``cfg``: a K-head for ``horizon=head``, a MASK token for lanes."""
    if cfg.needs_head and not has_head:
        raise FluidConfigError(_key(key, "horizon"), "is 'head' but the checkpoint has no K-head",
                               "use a stage-2 checkpoint or horizon=fixed")
    if cfg.needs_mask and mask_id is None:
        raise FluidConfigError(_key(key, "mask_token_id"), "the checkpoint's tokenizer has no MASK token",
                               "pass mask_token_id=ID, decode with algorithm=ar, or training-free with "
                               "window=cost ngram=true lane_len=0")


def resolve_mask(fm, mask_token_id: int | None = None, key: str = "mask_token_id") -> int | None:
    """The MASK id to decode with: an explicit ``mask_token_id`` (checked against the vocabulary), else the checkpoint's."""
    if mask_token_id is None:
        return fm.mask_token_id
    vocab = fm.model.get_input_embeddings().num_embeddings
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab:
        raise FluidConfigError(key, f"{mask_token_id!r} is outside the model's vocabulary (0..{vocab - 1})",
                               "leave it null to use the checkpoint's")
    return mask_token_id


def build_decoder(checkpoint, decode: Mapping[str, Any] | DecodeConfig | None = None, *, device: str | None = "auto",
                  dtype="float32", mask_token_id: int | None = None, stop_strings: Sequence[str] = (),
                  key: str = "decode", fm=None, device_fallback: bool = False):
    """``(FluidModel, FluidDecoder)`` for ``checkpoint`` (a directory, or an already loaded
    :class:`~fluid.checkpoint.FluidModel` passed as ``fm``) decoding with ``decode``; every check
    above runs before the first token is decoded. ``dtype``: a name (float32, bf16, ...) or a
    torch dtype; ``device_fallback``: cuda without CUDA warns and uses the CPU (lm-eval's default)."""
    from fluid.checkpoint import load_fluid
    from fluid.decoding.decoder import FluidDecoder
    from fluid.validate import resolve_device, torch_dtype

    cfg = decode_config(decode, key)
    if fm is None:
        fm = load_fluid(checkpoint, device=resolve_device(device, fallback=device_fallback), dtype=torch_dtype(dtype))
    mask = resolve_mask(fm, mask_token_id)
    check_decode(cfg, fm.head is not None, mask, key)
    dec = FluidDecoder(fm.model, fm.tokenizer, head=fm.head, mask_token_id=mask, config=cfg, stop_strings=stop_strings)
    return fm, dec
