"""A small BPE tokenizer trained locally for the embedded task.

Digits are split individually (arithmetic is much easier to learn that way), words are
learned by byte-level BPE, and the result is a ``PreTrainedTokenizerFast`` with BOS, EOS,
PAD and MASK special tokens and a chat template, saved like any Hugging Face tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {
    "bos_token": "<|bos|>",
    "eos_token": "<|eos|>",
    "pad_token": "<|pad|>",
    "mask_token": "<|mask|>",
}
ROLE_TOKENS = ["<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values()) + ROLE_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS, additional_special_tokens=ROLE_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_arith_tokenizer(cache_dir: str | os.PathLike, vocab_size: int = 512, seed: int = 0,
                          max_operand: int = 30, corpus_size: int = 2000) -> PreTrainedTokenizerFast:
    """Train (or load from ``cache_dir``) the tokenizer of the arith task; deterministic."""
    from fluid.data.arith import ArithTask

    key = json.dumps({"v": 1, "vocab": vocab_size, "seed": seed, "max": max_operand, "n": corpus_size})
    out = Path(cache_dir) / f"arith-tokenizer-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (out / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(out)
    tok = train_tokenizer(ArithTask(seed=seed, max_operand=max_operand).corpus(corpus_size), vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # a concurrent run won the race: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("trained arith tokenizer (%d tokens) -> %s", len(tok), out)
    return PreTrainedTokenizerFast.from_pretrained(out)
