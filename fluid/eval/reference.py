"""Comparison with a reference model's greedy outputs (``python -m fluid.evaluate reference=RUN``).

``RUN`` is an earlier evaluation's run directory on the same benchmark and prompts (usually the
original checkpoint's, ``settings=null``); its ``samples.jsonl`` holds each prompt's ``ar`` token ids.
Two measures of how far an adapted model moved from it:

- identical to reference: the fraction of prompts on which a setting's output tokens equal the
  reference's greedy tokens (exact mode, ``lora.scope=lanes``: 1.0 for AR and lossless FLUID);
- argmax agreement: teacher-forcing the reference's greedy responses through the evaluated model,
  the fraction of response positions where its next-token argmax is the reference's token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fluid.utils.errors import FluidConfigError


def load_reference(run_dir: str | Path, sample_ids: list, prompts: list[str]) -> list[list[int]]:
    """The reference's ``ar`` token ids for each sample, in ``sample_ids`` order; prompts must match."""
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise FluidConfigError("reference", f"{str(path)!r} not found",
                               "give the run directory of an earlier python -m fluid.evaluate")
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["id"]] = r
    out = []
    for sid, prompt in zip(sample_ids, prompts):
        r = rows.get(sid)
        if r is None:
            raise FluidConfigError("reference", f"sample {sid!r} is not in {str(path)!r} ({len(rows)} samples)",
                                   "evaluate the reference with the same benchmark and at least this limit")
        if r.get("prompt") != prompt:
            raise FluidConfigError("reference", f"sample {sid!r} was prompted differently in {str(path)!r}",
                                   "use the same benchmark options (chat, num_fewshot) as the reference")
        ids = (r.get("ar") or {}).get("ids")
        if ids is None:
            raise FluidConfigError("reference", f"{str(path)!r} has no AR token ids",
                                   "re-run the reference evaluation with this version of fluid.evaluate")
        out.append(list(ids))
    return out


def identical_fraction(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """The fraction of prompts whose output tokens equal the reference's (the one definition of
    ``identical_to_ar`` and ``identical_to_reference``)."""
    if len(tokens) != len(reference):
        raise ValueError(f"{len(tokens)} outputs compared with {len(reference)} references")
    return sum(list(a) == list(b) for a, b in zip(tokens, reference)) / max(1, len(reference))


@torch.no_grad()
def argmax_agreement(model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]],
                     batch_size: int = 8, pad_id: int = 0) -> tuple[int, int]:
    """(matched, total) response positions where ``model``'s teacher-forced next-token argmax equals
    the response token. Rows are right-padded: under the causal mask no real token sees a pad, so
    no attention mask is needed; positions run 0.. on every row."""
    device = next(model.parameters()).device
    matched = total = 0
    pairs = [(p, r) for p, r in zip(prompts, responses) if r]
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b: b + batch_size]
        seqs = [list(p) + list(r) for p, r in chunk]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        pos = torch.arange(length).expand(len(seqs), -1)
        logits = model(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False).logits
        for i, (p, r) in enumerate(chunk):
            pred = logits[i, len(p) - 1: len(p) + len(r) - 1].argmax(-1).cpu()
            matched += int((pred == torch.tensor(r)).sum())
            total += len(r)
    return matched, total
