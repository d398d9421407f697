"""``model.generate`` with FLUID decoding, through transformers' ``custom_generate``.

An exported stage-1 or stage-2 checkpoint carries ``custom_generate/generate.py``, which imports
:func:`generate` from here (the installed ``fluid`` package; nothing is copied). Then

    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)

decodes greedily with FLUID's lossless decoder (the tokens of greedy AR, fewer forwards): a
stage-2 checkpoint with its K-head (``horizon=head``), a stage-1 one with fixed horizons; exact
mode's lane adapter is attached to ``model`` (gated to MASK slots, so its plain forward is the
original). ``fluid_decode={...}`` sets :class:`~fluid.decoding.config.DecodeConfig` fields.
The output is what transformers' greedy ``generate`` returns: the (left-padded) input followed by
the new tokens, rows that ended early padded with the pad id. A ``streamer`` gets the prompt,
then each forward's committed tokens (batch 1, as transformers requires). Anything else
(sampling, beams, several sequences, scores, a logits processor, assisted decoding) falls back
to transformers' own ``generate`` with a warning. Tested with transformers 5.17-5.x.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)
ENTRY_DIR = "custom_generate"
ENTRY = '''"""FLUID decoding for `model.generate` (transformers custom_generate). It uses the installed
`fluid` package (pip install fluid); see fluid/hf_generate.py there."""

from fluid.hf_generate import generate  # noqa: F401
'''
# arguments FLUID's greedy decoder honours; any other (non-None, non-default) one means the standard generate
HANDLED = {"input_ids", "inputs", "attention_mask", "generation_config", "streamer", "max_new_tokens", "max_length",
           "do_sample", "num_beams", "num_return_sequences", "eos_token_id", "pad_token_id", "bos_token_id",
           "use_cache", "fluid_decode", "tokenizer"}


def write_entry(out_dir: str | Path) -> Path:
    """Put ``custom_generate/generate.py`` into checkpoint ``out_dir``."""
    d = Path(out_dir) / ENTRY_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / "generate.py").write_text(ENTRY)
    return d / "generate.py"


# generation-config fields that change which tokens greedy decoding picks or where it stops
PROCESSING = ("repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
              "min_length", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
              "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "stop_strings",
              "max_time", "renormalize_logits", "guidance_scale", "watermarking_config", "prompt_lookup_num_tokens",
              "assistant_early_exit", "diversity_penalty", "constraints", "force_words_ids", "low_memory",
              "penalty_alpha", "dola_layers", "output_scores", "output_logits", "return_dict_in_generate",
              "output_attentions", "output_hidden_states")


def _why_not_fluid(gc, kwargs: dict) -> str | None:
    if gc.do_sample:
        return "sampling (do_sample=True)"
    if (gc.num_beams or 1) > 1:
        return f"beam search (num_beams={gc.num_beams})"
    if (gc.num_return_sequences or 1) > 1:
        return f"num_return_sequences={gc.num_return_sequences}"
    from transformers import GenerationConfig

    default = GenerationConfig()
    def norm(v):  # unset, False, 0 and empty all mean "off"
        return None if v is None or v is False or (isinstance(v, (int, float)) and v == 0) or v in ([], {}) else v

    changed = [k for k in PROCESSING if norm(getattr(gc, k, None)) != norm(getattr(default, k, None))]
    if changed:
        return ", ".join(changed)
    other = sorted(k for k, v in kwargs.items() if k not in HANDLED and v is not None)
    return f"{', '.join(other)}" if other else None


def _decoder(model, decode: dict | None):
    """The FLUID decoder of ``model``'s checkpoint, built once per model and settings."""
    from fluid.checkpoint import load_fluid
    from fluid.decoding.setup import build_decoder

    key = tuple(sorted((decode or {}).items()))
    cache = model.__dict__.setdefault("_fluid_decoders", {})
    if key not in cache:
        if "_fluid_model" not in model.__dict__:  # once: exact mode's adapter is attached to ``model``
            p = next(model.parameters())
            model.__dict__["_fluid_model"] = load_fluid(Path(model.name_or_path), device=p.device, dtype=p.dtype,
                                                        model=model)
        fm = model.__dict__["_fluid_model"]
        settings = {"horizon": "head" if fm.head is not None else "fixed"}
        settings.update(decode or {})
        cache[key] = build_decoder(None, settings, fm=fm)[1]
    return cache[key]


def generate(*args, model, **kwargs):
    """transformers calls this as ``model.generate(...)``; see the module docstring."""
    from transformers import GenerationMixin

    from fluid.decoding.running import RunningBatch
    from fluid.decoding.state import StopRule

    input_ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    gc = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    for k in kwargs:  # generate(**kwargs) fields of the generation config override it, as in transformers
        if hasattr(gc, k) and kwargs[k] is not None and k not in ("generation_config",):
            setattr(gc, k, kwargs[k])
    why = _why_not_fluid(gc, kwargs) if input_ids is not None else "no input_ids"
    if why:
        warnings.warn(f"FLUID decodes greedily; {why}: using transformers' standard generate", stacklevel=2)
        kwargs.pop("fluid_decode", None)
        return GenerationMixin.generate(model, *args, **kwargs)
    dec = _decoder(model, kwargs.get("fluid_decode"))
    ids = input_ids.to(next(model.parameters()).device)
    mask = kwargs.get("attention_mask")
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)] if mask is not None else ids.tolist()
    max_new = gc.max_new_tokens if gc.max_new_tokens is not None else max(0, (gc.max_length or 20) - ids.shape[1])
    streamer = kwargs.get("streamer")
    if streamer is not None and len(rows) > 1:
        raise ValueError("a streamer takes one sequence (batch size 1), as in transformers")
    eos = gc.eos_token_id if gc.eos_token_id is not None else dec.eos_id  # one id or a list, as transformers
    first_eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    pad = gc.pad_token_id if gc.pad_token_id is not None else first_eos  # transformers pads with pad, else EOS
    if pad is None:
        pad = dec.pad_id
    if streamer is not None:
        streamer.put(ids.cpu())
    new: list[list[int]] = [[] for _ in rows]
    if max_new > 0:
        rb = RunningBatch(dec)
        row_ids = rb.add(rows, [StopRule(max_new, eos, dec.tokenizer, dec.stop_strings)] * len(rows))
        sent = 0
        while rb.size:
            rb.step()
            if streamer is not None:
                toks = rb.stats[row_ids[0]].tokens
                if len(toks) > sent:
                    streamer.put(torch.tensor(toks[sent:]))
                    sent = len(toks)
        new = [rb.stats[r].tokens for r in row_ids]
    if streamer is not None:
        streamer.end()
    width = max((len(t) for t in new), default=0)
    out = torch.full((ids.shape[0], ids.shape[1] + width), pad, dtype=ids.dtype, device=ids.device)
    out[:, : ids.shape[1]] = ids
    for i, t in enumerate(new):
        out[i, ids.shape[1]: ids.shape[1] + len(t)] = torch.tensor(t, dtype=ids.dtype)
    return out
