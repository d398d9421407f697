"""LoRA via peft: rank 16, alpha 32, all linear layers by default; the MASK row trainable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoraSettings:
    enabled: bool = True  # False: full fine-tuning
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    train_mask_embedding: bool = True


def apply_lora(model, settings: LoraSettings, trainable_token_ids: list[int]):
    """Wrap ``model`` with LoRA adapters; ``trainable_token_ids`` rows of the embedding train too."""
    if not settings.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, task_type="CAUSAL_LM",
        trainable_token_indices=list(trainable_token_ids) if settings.train_mask_embedding and trainable_token_ids
        else None,
    )
    return get_peft_model(model, cfg)


def merge(model):
    """A plain transformers model with adapters (and trained token rows) merged in."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
