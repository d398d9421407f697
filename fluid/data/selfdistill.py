"""Self-distilled responses (``data.responses=self``): train on what verification will accept.

With verification, FLUID keeps a draft only where it equals the backbone's own greedy token, so
the lanes are best taught the backbone's greedy continuation of each training prompt rather than
the dataset's reference answer (speculative decoders such as Medusa and EAGLE train their drafters
this way). :func:`self_responses` decodes every prompt once (batched greedy AR, the project's own
loop, with a progress bar) and caches the response token ids on disk under a fingerprint of the
model files, the prompt ids and the settings, so a re-run (or the next stage) reuses them. The
cache is written batch by batch: an interrupted generation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fluid.utils.errors import FluidConfigError

log = logging.getLogger(__name__)
MODEL_FILES = (".safetensors", ".bin", ".json", ".model")


@dataclass
class SelfResponses:
    """Where the greedy responses come from and how they are generated (``data.self_responses``)."""

    model: str | None = None          # the model whose greedy responses are learned (a HF / FLUID directory)
    max_new_tokens: int = 256
    batch_size: int = 16
    device: str = "auto"              # auto: CUDA when there is one
    dtype: str = "float32"            # the precision the model will be verified in
    cache_dir: str = "outputs/cache/self_responses"
    keep_truncated: bool = False      # responses cut at max_new_tokens (no EOS) are dropped by default


def model_fingerprint(path: str | Path) -> dict:
    """The identity of a model directory: its weight/config files' names, sizes and mtimes
    (and the files of a FLUID lane adapter inside it)."""
    root = Path(path)
    if not root.is_dir():
        raise FluidConfigError("data.self_responses.model", f"{str(path)!r} is not a model directory",
                               "point it at the backbone whose responses to learn (e.g. ${backbone.path})")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in MODEL_FILES)
    return {"path": str(root.resolve()),
            "files": [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_key(settings: SelfResponses, prompts: Sequence[Sequence[int]], eos_id: int | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_fingerprint(settings.model), "max_new_tokens": settings.max_new_tokens,
                         "dtype": settings.dtype, "eos": eos_id}, sort_keys=True).encode())
    for p in prompts:
        h.update(b"|" + ",".join(map(str, p)).encode())
    return h.hexdigest()[:20]


def _read_done(path: Path) -> dict[int, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: regenerated
                continue
            done[int(row["index"])] = row
    return done


def self_responses(settings: SelfResponses, prompts: Sequence[Sequence[int]], eos_id: int | None, pad_id: int,
                   label: str = "self-responses") -> list[dict]:
    """``[{"index", "response_ids", "finished"}]`` per prompt, from the cache or generated now."""
    if not settings.model:
        raise FluidConfigError("data.self_responses.model", "is not set",
                               "set it to the model whose greedy responses to learn (the recipes use ${backbone.path})")
    cache = Path(settings.cache_dir).expanduser()
    key = cache_key(settings, prompts, eos_id)
    final, partial = cache / f"{key}.jsonl", cache / f"{key}.partial.jsonl"
    if final.exists():
        rows = _read_done(final)
        if len(rows) == len(prompts):
            log.info("%s: reusing %d cached responses (%s)", label, len(rows), final)
            return [rows[i] for i in range(len(prompts))]
    done = _read_done(partial)
    todo = [i for i in range(len(prompts)) if i not in done]
    if todo:
        _generate(settings, prompts, todo, eos_id, pad_id, partial, label, resumed=len(done))
        done = _read_done(partial)
    if len(done) != len(prompts):
        raise RuntimeError(f"{label}: {len(prompts) - len(done)} responses are missing from {partial}")
    tmp = final.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(done[i]) + "\n" for i in range(len(prompts))))
    os.replace(tmp, final)
    partial.unlink(missing_ok=True)
    return [done[i] for i in range(len(prompts))]


def _generate(settings: SelfResponses, prompts, todo: list[int], eos_id, pad_id, partial: Path, label: str,
              resumed: int) -> None:
    import torch
    from tqdm.auto import tqdm

    from fluid.checkpoint import load_fluid
    from fluid.decoding.ar import greedy_generate
    from fluid.validate import resolve_device, torch_dtype

    device, dtype = resolve_device(settings.device), torch_dtype(settings.dtype)
    model = load_fluid(settings.model, device=device, dtype=dtype).model
    partial.parent.mkdir(parents=True, exist_ok=True)
    todo = sorted(todo, key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    log.info("%s: generating %d greedy responses with %s (%d cached before)", label, len(todo), settings.model, resumed)
    if partial.exists() and partial.stat().st_size and not partial.read_bytes().endswith(b"\n"):
        with partial.open("a") as f:  # a line cut by a kill: end it, so the next row starts a line
            f.write("\n")
    with partial.open("a") as f, tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=label,
                                      unit="prompt", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), settings.batch_size):
            idx = todo[start: start + settings.batch_size]
            with torch.inference_mode():
                res = greedy_generate(model, [prompts[i] for i in idx], max_new_tokens=settings.max_new_tokens,
                                      eos_token_id=eos_id, pad_token_id=pad_id)
            for i, toks in zip(idx, res.tokens):
                finished = "eos" if eos_id is not None and toks and toks[-1] == eos_id else "max_new_tokens"
                f.write(json.dumps({"index": i, "response_ids": toks, "finished": finished}) + "\n")
            f.flush()
            bar.update(len(idx))
