"""FLUID as an lm-evaluation-harness model: ``--model fluid``.

Command line (lm_eval's own CLI, with this model registered first)::

    python -m fluid.eval.harness --model fluid --model_args checkpoint=DIR --tasks gsm8k
    python -m fluid.eval.harness --model fluid --model_args checkpoint=DIR,horizon=fixed,fixed_k=8 \\
        --device cpu --batch_size 16 --tasks my_task --include_path DIR_OF_YAMLS --no_default_tasks --limit 20

Python::

    import lm_eval
    from fluid.eval.harness import FluidLM
    lm_eval.simple_evaluate(model=FluidLM(checkpoint=DIR), tasks=["gsm8k"])

``model_args``: ``checkpoint`` (default: ``checkpoint`` of ``conf/generate.yaml``), ``device``
(auto | cpu | cuda[:N]), ``dtype`` (float32 | bfloat16 | float16), ``batch_size``,
``max_new_tokens`` (when a task gives no ``max_gen_toks``), ``mask_token_id`` (default: the
checkpoint's), ``max_length`` (default: the model config's), ``add_bos_token`` (encode with
the tokenizer's special tokens; default False) and any :class:`DecodeConfig` field
(``algorithm``, ``horizon``, ``fixed_k``, ...). On the CLI, ``device`` and ``batch_size`` come
from lm_eval's own ``--device`` (its default ``cuda:0``: cpu when there is no GPU) and
``--batch_size`` (its default 1; "auto" means 16), not from ``--model_args``.
``--no_default_tasks`` (this module's only flag) skips indexing lm_eval's ~14k built-in task
YAMLs (~14 s on 2 CPU cores) when only ``--include_path`` tasks are run.

Why a module and not ``lm_eval --model fluid``: lm_eval 0.4.13 finds models only in its
registry (``lm_eval.api.registry.get_model``: built-in lazy ``MODEL_MAPPING`` entries plus
whatever was registered in-process); it reads no entry-point group and ``--model`` takes no
``module:Class``. So this module registers ``fluid`` and then runs ``lm_eval.__main__.cli_evaluate``
(all its flags: ``--tasks``, ``--include_path``, ``--limit``, ``--apply_chat_template``,
``--gen_kwargs``, ``--output_path``, ``--log_samples``, ...).

Requests: ``generate_until`` decodes with :class:`~fluid.decoding.FluidDecoder` (greedy; with
verification in fp32 the same text as greedy AR), grouped by ``gen_kwargs``; ``until`` are the
decoder's stop strings and texts are cut at the first one. ``do_sample`` / ``temperature`` /
other sampling options are ignored with a warning. ``loglikelihood`` and
``loglikelihood_rolling`` use the plain causal forward (:mod:`fluid.eval.likelihood`),
tokenized like lm-eval's HF model (context + continuation encoded whole, then split; trailing
spaces of the context go to the continuation; an empty context is the BOS, else EOS token).
Chat: ``--apply_chat_template`` renders with the tokenizer's chat template (text that holds
its special tokens, encoded as it is). Single process only (rank 0, world size 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

import lm_eval.models  # noqa: F401  (the built-in models' lazy entries: get_model adds them only to an empty registry)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from fluid.decoding.config import DecodeConfig
from fluid.decoding.setup import as_bool
from fluid.eval import likelihood
from fluid.utils.errors import FluidConfigError

log = logging.getLogger(__name__)

DEFAULTS = DecodeConfig()  # the decode defaults live in fluid/decoding/config.py only
DEFAULT_BATCH_SIZE = DEFAULTS.batch_size
OWN_KEYS = ("checkpoint", "device", "dtype", "batch_size", "max_new_tokens", "mask_token_id", "max_length",
            "add_bos_token")
DECODE_KEYS = tuple(f.name for f in dataclasses.fields(DecodeConfig) if f.name not in ("batch_size", "max_new_tokens"))
GREEDY_KEYS = ("do_sample", "temperature")  # normalize_gen_kwargs always sets them; greedy values pass silently


def _int_or(value, default: int) -> int:
    try:
        return int(value) if not isinstance(value, bool) else default
    except (TypeError, ValueError):
        return default


class FluidLM(TemplateLM):
    """A FLUID checkpoint behind lm-eval's ``LM`` interface (see the module docstring)."""

    def __init__(self, checkpoint: str | None = None, device: str | None = "auto", dtype: str | torch.dtype = "float32",
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_new_tokens: int = DEFAULTS.max_new_tokens, max_batch_size=None,
                 mask_token_id: int | None = None, max_length: int | None = None, add_bos_token: bool = False,
                 trust_remote_code: bool = False, **decode):
        # max_batch_size, trust_remote_code: passed by lm-eval's evaluator / CLI, not used
        super().__init__()
        from fluid.decoding.setup import build_decoder, decode_config, field_value

        unknown = sorted(set(decode) - set(DECODE_KEYS))
        if unknown:
            raise FluidConfigError("model_args", f"unknown key(s) {', '.join(unknown)}",
                                   f"valid: {', '.join(OWN_KEYS + DECODE_KEYS)}")
        if checkpoint is None:
            from fluid.utils.compose import compose

            checkpoint = str(compose("generate").checkpoint)
        self._batch_size = _int_or(batch_size, DEFAULT_BATCH_SIZE)
        if self._batch_size < 1:
            raise FluidConfigError("batch_size", f"must be >= 1, got {batch_size!r}")
        cfg = decode_config({"batch_size": self._batch_size, "max_new_tokens": _int_or(max_new_tokens, 0),
                             **{k: field_value(k, v) for k, v in decode.items()}}, key="model_args")
        mask = None if mask_token_id is None else _int_or(mask_token_id, -1)
        fm, self.decoder = build_decoder(checkpoint, cfg, device=device, dtype=dtype, mask_token_id=mask, key="",
                                         device_fallback=True)
        self.model, self.head, self.tokenizer, self.meta, self.path = fm.model, fm.head, fm.tokenizer, fm.meta, fm.path
        self.decode_config = cfg
        self._device = self.model.device
        self._max_length = _int_or(max_length, 0) or None
        self.add_bos_token = as_bool("add_bos_token", add_bos_token)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty context (and of a rolling window's first token): BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(self.model.config, self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        return self.decode_config.max_new_tokens

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        """Added to the results' ``config`` by lm-eval."""
        return {"fluid_checkpoint": str(self.path), "fluid_stage": self.meta.stage,
                "fluid_decode": dataclasses.asdict(self.decode_config),
                "model_dtype": str(next(self.model.parameters()).dtype)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = self.add_bos_token and not (bos and string.startswith(bos))
        ids = self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ``((context, continuation) | None, context_ids, continuation_ids)``."""
        out = likelihood.loglikelihood(self.model, [(c, k) for _, c, k in requests], batch_size=self.batch_size,
                                       max_length=self.max_length, prefix_token_id=self.prefix_token_id,
                                       progress=not disable_tqdm)
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            w = likelihood.rolling_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length)
            windows += [(None, c, k) for c, k in w]
            owner += [i] * len(w)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)

    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        """``(stop strings, max new tokens)`` of a request's ``gen_kwargs``; warns about what is ignored."""
        from lm_eval.models.utils import normalize_gen_kwargs

        kw = dict(normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks))
        until = kw.pop("until", None) or []
        until = [s for s in ([until] if isinstance(until, str) else until) if isinstance(s, str) and s]
        max_gen = int(kw.pop("max_gen_toks"))
        if kw.get("do_sample") or float(kw.get("temperature") or 0.0) > 0.0:
            self._warn_once("sample", f"gen_kwargs {gen_kwargs}: sampling ignored, FLUID decodes greedily")
        ignored = sorted(set(kw) - set(GREEDY_KEYS))
        if ignored:
            self._warn_once(f"ignored:{ignored}", f"gen_kwargs: ignored {', '.join(ignored)} (FLUID decodes greedily)")
        return until, max_gen

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import postprocess_generated_text

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests (FLUID)")
        for idx in groups.values():
            until, max_gen = self._gen_settings(requests[idx[0]].args[1])
            room = self.max_length - max_gen
            if room < 1:
                raise FluidConfigError("max_gen_toks", f"{max_gen} leaves no room for a prompt in max_length={self.max_length}")
            ids = [self.tok_encode(requests[i].args[0], left_truncate_len=room) or [self.prefix_token_id] for i in idx]
            order = sorted(range(len(idx)), key=lambda j: -len(ids[j]))  # longest first: the first batch is the largest
            self.decoder.stop_strings = until  # the decoder stops rows on them and cuts its texts
            for start in range(0, len(order), self.batch_size):
                chunk = order[start: start + self.batch_size]
                texts = self.decoder.generate([ids[j] for j in chunk], max_new_tokens=max_gen)["texts"]
                for j, text in zip(chunk, texts):
                    text = postprocess_generated_text(text, until, None)
                    out[idx[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[idx[j]].args, text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


if __name__ != "__main__":  # `python -m` runs a second copy of this file: the imported module registers
    register_model("fluid")(FluidLM)


NO_DEFAULT_TASKS = "--no_default_tasks"


def _local_tasks_only() -> None:
    """Make the CLI's TaskManager skip lm-eval's built-in tasks (indexing those ~14k YAMLs takes
    ~14 s on 2 CPU cores): only ``--include_path`` tasks (or YAML paths given to ``--tasks``) exist."""
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager

    class LocalTaskManager(base):
        def __init__(self, *args, include_defaults: bool = False, **kwargs):
            super().__init__(*args, include_defaults=include_defaults, **kwargs)

    lm_eval.tasks.TaskManager = LocalTaskManager  # the CLI imports it from there when it runs


def main(argv: list[str] | None = None) -> None:
    """lm_eval's CLI with ``--model fluid`` available; ``argv`` defaults to ``sys.argv[1:]``.
    One flag of its own: ``--no_default_tasks`` (see :func:`_local_tasks_only`)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if NO_DEFAULT_TASKS in args:
        args.remove(NO_DEFAULT_TASKS)
        _local_tasks_only()
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    from fluid.eval.harness import main as _main  # importing registers FluidLM under "fluid"

    _main()

