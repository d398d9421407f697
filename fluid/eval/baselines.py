"""Peers timed beside FLUID in ``fluid.evaluate`` (``baselines=[hf_greedy,hf_prompt_lookup]``):
transformers' own ``generate``, greedy and with prompt lookup decoding, on the same model object,
prompts and stop rule, returning what :meth:`fluid.decoding.FluidDecoder.generate` returns.

Forwards are counted with a hook on the model: every forward, the prefill included (for greedy that
is exactly one forward per generated token, TPF 1, as the repository's AR loop counts it).
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch

from fluid.backbones.tokens import pad_token_id
from fluid.decoding.state import RowStats, decode_result, visible_text

BASELINES = ("hf_greedy", "hf_prompt_lookup")


class HFBaseline:
    """``generate(prompts)`` with ``model.generate`` (greedy; ``prompt_lookup`` > 0: prompt lookup
    decoding with that many looked-up tokens per forward), one prompt at a time."""

    def __init__(self, model, tokenizer, max_new_tokens: int, stop_strings: Sequence[str] = (),
                 prompt_lookup: int = 0, ngram_size: int = 2):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.stop_strings = max_new_tokens, [s for s in stop_strings if s]
        self.prompt_lookup, self.ngram_size = prompt_lookup, ngram_size
        self.eos = tokenizer.eos_token_id
        self.pad = pad_token_id(tokenizer)

    def _kwargs(self, max_new_tokens: int) -> dict:
        kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
              "top_k": None, "eos_token_id": self.eos, "pad_token_id": self.pad}
        if self.prompt_lookup:
            kw.update(prompt_lookup_num_tokens=self.prompt_lookup, max_matching_ngram_size=self.ngram_size)
        if self.stop_strings:
            kw.update(stop_strings=self.stop_strings, tokenizer=self.tokenizer)
        return kw

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | None = None, **_ignored) -> dict:
        calls = [0]
        hook = self.model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        dev = next(self.model.parameters()).device
        stats, texts = [], []
        t0 = time.perf_counter()
        try:
            for p in prompts:
                before = calls[0]
                ids = torch.tensor([list(p)], device=dev)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                              **self._kwargs(max_new_tokens or self.max_new_tokens))
                toks = out[0, ids.shape[1]:].tolist()
                if self.eos is not None and self.eos in toks:
                    toks = toks[: toks.index(self.eos) + 1]
                st = RowStats(tokens=toks, nfe=calls[0] - before)
                st.finished = "eos" if toks and toks[-1] == self.eos else "max_new_tokens"
                stats.append(st)
                texts.append(visible_text(self.tokenizer, toks, self.stop_strings))
        finally:
            hook.remove()
        return decode_result(stats, texts, time.perf_counter() - t0)


def build_baselines(names, model, tokenizer, max_new_tokens: int, batch_size: int, stop_strings=(),
                    prompt_lookup: int = 4) -> dict[str, HFBaseline]:
    """The named peers; raises ``ValueError`` (one line) for an unknown name or a batch size they
    cannot run at (transformers' prompt lookup decodes one prompt at a time)."""
    out = {}
    for name in names or []:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r} ({' | '.join(BASELINES)})")
        if batch_size != 1:
            raise ValueError(f"{name} decodes one prompt at a time: compare it at decode.batch_size=1")
        out[name] = HFBaseline(model, tokenizer, max_new_tokens, stop_strings,
                               prompt_lookup=prompt_lookup if name == "hf_prompt_lookup" else 0)
    return out
