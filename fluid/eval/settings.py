"""``fluid.evaluate``'s ``settings``: named decode settings on top of ``decode``, checked against
the checkpoint before anything is decoded (the checks themselves: fluid/decoding/setup.py)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fluid.decoding.config import DecodeConfig
from fluid.decoding.setup import check_decode, decode_config
from fluid.utils.errors import FluidConfigError


def decoder_settings(cfg: DictConfig, base: DecodeConfig, has_head: bool, mask_id: int | None) -> dict[str, DecodeConfig]:
    """``settings`` (name -> DecodeConfig overrides on top of ``decode``), each also at every
    value of ``confidences`` (``<name>_c<value>``); checked before anything is decoded."""
    raw = OmegaConf.to_container(cfg.settings, resolve=True) if cfg.get("settings") else {}
    if not raw:  # settings=null: AR greedy alone (a plain or stage-0 model's accuracy and speed)
        return {}
    shared = ["algorithm", "batch_size", "compile", "max_new_tokens"]
    confidences = list(cfg.get("confidences") or [])  # checked by validate_evaluate
    settings = {}
    for name, ov in raw.items():
        if ov is not None and not isinstance(ov, dict):
            raise FluidConfigError(f"settings.{name}", f"must be a mapping of decode fields, got {ov!r}",
                                   "e.g. +settings.noverify='{verify: false}'")
        ov = dict(ov or {})
        fixed = sorted(set(ov) & set(shared))
        if fixed:  # AR runs with the base batching: a setting's speedup is only fair with the same
            raise FluidConfigError(f"settings.{name}", f"sets {fixed}, which AR and every setting share",
                                   f"set decode.{fixed[0]}=... for the whole run instead")
        settings[name] = ov
        for c in confidences:  # the setting as it is, and at each draft confidence
            settings[f"{name}_c{c:g}"] = {**ov, "confidence": float(c)}
    out = {}
    for name, ov in settings.items():
        if name == "ar" or "/" in name:
            raise FluidConfigError(f"settings.{name}", "is a reserved or invalid name", "pick another name")
        out[name] = decode_config(ov, f"settings.{name}", base=base)
        check_decode(out[name], has_head, mask_id, f"settings.{name}")
    return out
