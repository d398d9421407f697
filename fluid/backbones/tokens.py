"""The special tokens' rules: the MASK token (resolve the configured one, or add it; docs/method.md
section 1) and the pad id of a batch."""

from __future__ import annotations

import logging

import torch

from fluid.utils.errors import FluidConfigError

log = logging.getLogger(__name__)


def resolve_mask_token(tokenizer, model, mask_token: str | int | None) -> tuple[int, bool]:
    """Return ``(mask_token_id, added)``.

    ``mask_token`` is a token string (``"[unused32]"``) or an id. A string the vocabulary
    lacks is added as a special token and the embeddings are resized; the caller must make
    that row trainable (a frozen random row under LoRA is a silent bug).
    """
    if mask_token is None:
        if tokenizer.mask_token_id is None:
            raise FluidConfigError("backbone.mask_token", "is not set and the tokenizer has no mask token",
                                   "set backbone.mask_token to a reserved token or a new token string")
        return int(tokenizer.mask_token_id), False
    if isinstance(mask_token, int):
        if not 0 <= mask_token < len(tokenizer):
            raise FluidConfigError("backbone.mask_token", f"id {mask_token} is outside the vocabulary ({len(tokenizer)})")
        return mask_token, False
    existing = tokenizer.convert_tokens_to_ids(mask_token)
    if existing is not None and existing != tokenizer.unk_token_id:
        if tokenizer.mask_token != mask_token:
            tokenizer.mask_token = mask_token
        return int(existing), False
    tokenizer.add_special_tokens({"mask_token": mask_token})
    mask_id = int(tokenizer.convert_tokens_to_ids(mask_token))
    if mask_id >= num_embeddings(model):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    log.info("added mask token %r as id %d (vocabulary %d)", mask_token, mask_id, len(tokenizer))
    return mask_id, True


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (every decoder masks pads)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise FluidConfigError("tokenizer", "has neither a pad nor an EOS token", "set one in the checkpoint's tokenizer")
    return tokenizer.eos_token_id


def num_embeddings(model) -> int:
    """Rows of the input embedding; under ZeRO-3 the local tensor is an empty shard and the
    real shape is ``ds_shape``."""
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def noise_token_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids a noised slot may take: every non-special token of the model's vocabulary."""
    special = set(tokenizer.all_special_ids)
    special.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    ids = [i for i in range(min(vocab_size, len(tokenizer))) if i not in special]
    return torch.tensor(ids, dtype=torch.long)
