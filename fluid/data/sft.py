"""Chat-formatted supervised examples -> token ids with response-only targets.

Convention used everywhere in FLUID: ``labels[i]`` is the target *of position i*, i.e. the
next token ``x[i+1]`` when that token belongs to the response, else ``IGNORE``. Position
``i`` is *supervised* iff ``labels[i] != IGNORE`` (docs/method.md sections 1-3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

from fluid.nn import IGNORE
from fluid.utils.errors import FluidConfigError

log = logging.getLogger(__name__)



@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode_chat(tokenizer, messages: Sequence[dict]) -> Encoded:
    """Render with the tokenizer's own chat template; supervise the last assistant turn only."""
    return encode_chats(tokenizer, [messages])[0]


def encode_chats(tokenizer, conversations: Sequence[Sequence[dict]]) -> list[Encoded]:
    """:func:`encode_chat` of many conversations, tokenized in two batched calls (the fast
    tokenizers' batch path is several times quicker than one call per text)."""
    prompts, responses = [], []
    for messages in conversations:
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("an example must end with an assistant message")
        prompt_text = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(list(messages), tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        prompts.append(prompt_text)
        responses.append(full_text[len(prompt_text):])
    if not prompts:
        return []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return [_encoded(tokenizer, p, r) for p, r in zip(prompt_ids, response_ids)]


def _encoded(tokenizer, prompt_ids: list[int], response_ids: list[int]) -> Encoded:
    eos = tokenizer.eos_token_id
    if eos in response_ids:  # nothing after the end of the turn is worth learning
        response_ids = response_ids[: response_ids.index(eos) + 1]
    elif eos is not None:
        response_ids = response_ids + [eos]
    ids = list(prompt_ids) + response_ids
    labels = [IGNORE] * len(ids)
    for i in range(len(prompt_ids) - 1, len(ids) - 1):
        labels[i] = ids[i + 1]
    return Encoded(ids, labels)


def encode_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Prompt ids for generation (drops a trailing assistant turn if present)."""
    msgs = list(messages[:-1]) if messages and messages[-1].get("role") == "assistant" else list(messages)
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class SFTDataset(Dataset):
    """Pre-tokenised training examples. Over-long examples are dropped and counted, never cut.
    ``encoded``: the examples already as prompt + response ids (self-distilled responses)."""

    def __init__(self, examples: Sequence[dict], tokenizer, max_length: int, encoded: Sequence[Encoded] | None = None):
        self.items: list[Encoded] = []
        self.dropped = 0
        if encoded is None:
            encoded = encode_chats(tokenizer, [ex["messages"] for ex in examples])
        for enc in encoded:
            if len(enc.input_ids) > max_length:
                self.dropped += 1
                continue
            self.items.append(enc)
        if self.dropped:
            log.warning("dropped %d of %d examples longer than data.max_length=%d",
                        self.dropped, len(examples), max_length)
        if not examples:
            raise FluidConfigError("data.source", "the split has no examples", "check the data files and their sizes")
        if not self.items:
            raise FluidConfigError("data.max_length", f"none of the {len(examples)} examples fits in {max_length} tokens",
                                   "raise data.max_length")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Encoded:
        return self.items[i]


class PromptDataset(Dataset):
    """Prompts and reference answers for generation-based evaluation."""

    def __init__(self, examples: Sequence[dict], tokenizer):
        self.items = [(encode_prompt(tokenizer, ex["messages"]), str(ex.get("answer", ""))) for ex in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate_sft(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; ``attention_mask`` marks real tokens, padded labels are IGNORE."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for r, e in enumerate(batch):
        ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[r, : len(e.labels)] = torch.tensor(e.labels)
        mask[r, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_prompts(batch) -> dict[str, list]:
    return {"prompt_ids": [p for p, _ in batch], "answers": [a for _, a in batch]}
