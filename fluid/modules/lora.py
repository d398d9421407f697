"""LoRA via peft: rank 16, alpha 32, all linear layers by default; the MASK row trainable.

``scope``: ``all`` (the update applies to every token; exported merged) or ``lanes`` (exact
mode, :mod:`fluid.exact`: the update and a learned MASK embedding apply at MASK slots only, so
main tokens run the original weights; exported unmerged)."""

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
    scope: str = "all"  # all | lanes (exact mode)

    def __post_init__(self):
        from fluid.validate import check

        check("stage.module.lora.scope", self.scope)
        if self.scope == "lanes" and not self.enabled:
            raise ValueError("stage.module.lora.scope=lanes needs stage.module.lora.enabled=true (exact mode gates "
                             "a LoRA update; full fine-tuning changes the weights every token uses)")



def apply_lora(model, settings: LoraSettings, trainable_token_ids: list[int], added_token_ids: list[int] = ()):
    """Wrap ``model`` with LoRA adapters; ``trainable_token_ids`` rows of the embedding train too
    (``added_token_ids``: those of them that stage 1 added to the vocabulary)."""
    if not settings.enabled:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lanes = settings.scope == "lanes"
    cfg = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, task_type="CAUSAL_LM",
        # exact mode learns the MASK embedding as a gated offset instead: a trained row of a tied
        # embedding would also move that token's output logit
        trainable_token_indices=list(trainable_token_ids) if settings.train_mask_embedding and trainable_token_ids
        and not lanes else None,
    )
    if lanes:
        from fluid.exact import apply_lanes_lora

        if len(trainable_token_ids) != 1:
            raise ValueError("lora.scope=lanes gates on exactly one MASK token id")
        return apply_lanes_lora(model, cfg, trainable_token_ids[0], settings.train_mask_embedding,
                                mask_added=trainable_token_ids[0] in set(added_token_ids))
    return get_peft_model(model, cfg)


def merge(model):
    """A plain transformers model with adapters (and trained token rows) merged in."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
