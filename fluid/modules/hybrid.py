"""Stage 1: strictly causal lane training (``HybridDiffusionModule``), docs/method.md sections 1-3.

Orchestration only: the maths lives in :mod:`fluid.lanes` (expansion, attention rule).
Loss ``L = L_AR + L_Diff``: cross-entropy on main tokens plus on lane slots, averaged over
all supervised tokens jointly by default (as the reference does), with optional weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from hydra.utils import instantiate

from fluid.backbones.compat import kv_cache
from fluid.backbones.tokens import noise_token_ids, num_embeddings, resolve_mask_token
from fluid.checkpoint import CheckpointMeta
from fluid.exact import LANE_ADAPTER_DIR, save_lane_adapter, unload_lanes
from fluid.lanes import AttentionBackend, LaneBatch
from fluid.lanes.attention import attention_mask_for, split_main_slots
from fluid.modules.lanes import LaneModule
from fluid.modules.lora import LoraSettings, apply_lora, merge
from fluid.nn import IGNORE, decoder_and_lm_head, to_float_mask, token_ce


@dataclasses.dataclass
class LaneLoss:
    """What a lane slot is trained toward (``stage.module.loss``, docs/method.md section 1).

    ``lane_target``: ``token`` (cross-entropy on the next token of the text) or ``teacher`` (forward
    KL to the original model's next-token distribution after the real prefix ``x[0..p]``, the
    distribution verification accepts from; exact mode only, where it is the main tokens' own
    logits). ``teacher_weight`` mixes the two (1: teacher only). ``teacher_topk`` keeps the
    teacher's top-k tokens (renormalised) to save memory. ``depth_decay`` weights slot ``j`` by
    ``exp(-(j - 1) / depth_decay)`` (null: every slot alike)."""

    reduction: str = "joint"
    ar_weight: float = 1.0
    diff_weight: float = 1.0
    lane_target: str = "token"
    teacher_weight: float = 1.0
    teacher_topk: int | None = None
    depth_decay: float | None = None
    # set by the module, not by config: the original model's vocabulary (rows a resize added have no
    # teacher output and get no teacher probability)
    teacher_vocab: int | None = None

    @property
    def teacher(self) -> bool:
        return self.lane_target == "teacher"


def slot_weights(slot: torch.Tensor, depth_decay: float | None) -> torch.Tensor:
    """Per-slot weight of the lane loss: 1, or ``exp(-(j - 1) / depth_decay)`` for slot depth ``j``."""
    if depth_decay is None:
        return torch.ones(slot.shape, dtype=torch.float32, device=slot.device)
    return torch.exp(-(slot.float() - 1).clamp(min=0) / depth_decay)


def teacher_kl(student: torch.Tensor, teacher: torch.Tensor, topk: int | None = None,
               vocab: int | None = None) -> torch.Tensor:
    """Per-row forward KL ``KL(q || p)`` of student logits ``(N, V)`` from teacher logits ``(N, V)``
    (float32); with ``topk`` the teacher keeps its ``topk`` most likely tokens, renormalised; with
    ``vocab`` only the first ``vocab`` columns are the teacher's (the rest get probability 0)."""
    logp = torch.log_softmax(student.float(), -1)
    t = teacher.detach().float()
    if vocab is not None and vocab < t.shape[-1]:
        t = t.clone()
        t[:, vocab:] = torch.finfo(t.dtype).min
    if topk is not None and topk < t.shape[-1]:
        val, idx = t.topk(topk, -1)
        logq = torch.log_softmax(val, -1)
        return (logq.exp() * (logq - torch.gather(logp, 1, idx))).sum(-1)
    logq = torch.log_softmax(t, -1)
    return (logq.exp() * (logq - logp)).sum(-1)


def slot_loss_terms(slot_logits: torch.Tensor, targets: torch.Tensor, slot: torch.Tensor,
                    teacher: torch.Tensor | None, cfg: LaneLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, weight)`` of the lane loss over slots with a target: ``slot_logits (N, V)``, their
    ``targets (N,)`` and depths ``slot (N,)``; ``teacher (N, V)`` the original model's logits at the
    same positions (needed for ``lane_target=teacher``)."""
    w = slot_weights(slot, cfg.depth_decay)
    per = torch.nn.functional.cross_entropy(slot_logits.float(), targets, reduction="none")
    if cfg.teacher:
        kl = teacher_kl(slot_logits, teacher, cfg.teacher_topk, cfg.teacher_vocab)
        per = cfg.teacher_weight * kl + (1 - cfg.teacher_weight) * per if cfg.teacher_weight < 1 else kl
    return (w * per).sum(), w.sum()


def teacher_rows(main_pos: torch.Tensor, main_keep: torch.Tensor, slot_pos: torch.Tensor) -> torch.Tensor:
    """For each slot (row-major over ``slot_pos``'s selected entries), the index of the main token at
    the same position among ``main_keep``'s selected entries (row-major): the teacher's row.
    ``main_pos (B, M)`` / ``main_keep (B, M)``: main positions and which have logits; ``slot_pos``
    ``(B, S)`` with -1 where a slot has no target."""
    b = main_pos.shape[0]
    size = int(max(int(main_pos.max()), int(slot_pos.max()))) + 1
    where = torch.full((b, size), -1, dtype=torch.long, device=main_pos.device)
    rows = torch.arange(b, device=main_pos.device)[:, None].expand_as(main_pos)
    where[rows[main_keep], main_pos[main_keep]] = torch.arange(int(main_keep.sum()), device=main_pos.device)
    srows = torch.arange(b, device=slot_pos.device)[:, None].expand_as(slot_pos)
    sel = slot_pos >= 0
    idx = where[srows[sel], slot_pos[sel]]
    if bool((idx < 0).any()):
        raise RuntimeError("a lane slot's position has no main-token logits (its target is not supervised)")
    return idx


def lane_losses(logits: torch.Tensor, lb: LaneBatch, cfg: LaneLoss | None = None) -> dict[str, torch.Tensor]:
    """Summed losses and token counts (weights) of main tokens (AR) and slots (Diff) of one
    expanded forward's ``logits``; teacher targets are its main tokens' logits (exact mode)."""
    cfg = cfg or LaneLoss()
    ce = token_ce(logits, lb.targets)
    has = lb.targets != IGNORE
    ar, diff = has & lb.is_main, has & ~lb.is_main
    teacher = None
    if cfg.teacher:
        main_keep = has & lb.is_main
        slot_pos = torch.where(diff, lb.position_ids, torch.full_like(lb.position_ids, -1))
        teacher = logits[main_keep][teacher_rows(lb.position_ids, main_keep, slot_pos)].detach()
    diff_sum, diff_n = slot_loss_terms(logits[diff], lb.targets[diff], lb.slot[diff], teacher, cfg)
    return {"ar_sum": ce[ar].sum(), "ar_n": ar.sum(), "diff_sum": diff_sum, "diff_n": diff_n,
            **slot_agreement(logits[diff], lb.targets[diff], lb.slot[diff], teacher)}


def slot_agreement(slot_logits: torch.Tensor, targets: torch.Tensor, slot: torch.Tensor,
                   teacher: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Depth-1 slots whose argmax is the teacher's argmax (else the target token): the share that
    verification would accept, logged as ``acc_slot1``."""
    with torch.no_grad():
        one = slot == 1
        want = teacher[one].argmax(-1) if teacher is not None else targets[one]
        return {"slot1_hit": (slot_logits[one].argmax(-1) == want).sum(), "slot1_n": one.sum()}


def two_pass_lane_losses(model, lb: LaneBatch, pad_token_id: int, cfg: LaneLoss | None = None) -> dict[str, torch.Tensor]:
    """:func:`lane_losses` of an exact-mode model (``lora.scope=lanes``) in two forwards: the main
    tokens alone without autograd, then the lane slots after their cache (their outputs and gradients
    are the expanded forward's, since no main-token output depends on a trained parameter); the LM
    head runs only where there is a target. Dense attention masks (SDPA/eager). With teacher targets
    the main forward's logits are the targets: they cost nothing extra."""
    from transformers import DynamicCache

    cfg = cfg or LaneLoss()
    sp = split_main_slots(lb)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, lm_head = decoder_and_lm_head(hf)
    dtype = next(model.parameters()).dtype
    cache = DynamicCache()

    def run(kind: str):
        idx, ok = sp[f"{kind}_idx"], sp[f"{kind}_ok"]
        ids = torch.gather(lb.input_ids, 1, idx).masked_fill(~ok, pad_token_id)
        targets = torch.gather(lb.targets, 1, idx).masked_fill(~ok, IGNORE)
        pos = torch.gather(lb.position_ids, 1, idx)
        h = decoder(input_ids=ids, attention_mask=to_float_mask(sp[f"{kind}_allowed"], dtype),
                    position_ids=pos, **kv_cache(cache), use_cache=True).last_hidden_state
        keep = targets != IGNORE
        return lm_head(h[keep]).float(), targets, keep, pos, torch.gather(lb.slot, 1, idx)

    with torch.no_grad():
        main_logits, main_t, main_keep, main_pos, _ = run("main")
        ar_sum = torch.nn.functional.cross_entropy(main_logits, main_t[main_keep], reduction="sum")
    slot_logits, slot_t, slot_keep, slot_pos, slot = run("slot")
    teacher = None
    if cfg.teacher:
        teacher = main_logits[teacher_rows(main_pos, main_keep, torch.where(slot_keep, slot_pos, -1))]
    diff_sum, diff_n = slot_loss_terms(slot_logits, slot_t[slot_keep], slot[slot_keep], teacher, cfg)
    return {"ar_sum": ar_sum, "ar_n": main_keep.sum(), "diff_sum": diff_sum, "diff_n": diff_n,
            **slot_agreement(slot_logits, slot_t[slot_keep], slot[slot_keep], teacher)}


def combine(parts: dict[str, torch.Tensor], w_ar: float = 1.0, w_diff: float = 1.0, joint: bool = True):
    """``joint``: (w_ar * sum_AR + w_diff * sum_Diff) / (n_AR + n_Diff); else mean_AR + mean_Diff."""
    n_ar, n_diff = parts["ar_n"].clamp(min=1), parts["diff_n"].clamp(min=1)
    if joint:
        return (w_ar * parts["ar_sum"] + w_diff * parts["diff_sum"]) / (parts["ar_n"] + parts["diff_n"]).clamp(min=1)
    return w_ar * parts["ar_sum"] / n_ar + w_diff * parts["diff_sum"] / n_diff


class HybridDiffusionModule(LaneModule):
    stage_id = 1

    def __init__(self, backbone, tokenizer, masking: dict, optim: dict | None = None, lora: dict | None = None,
                 attention: str = "auto", max_expanded_len: int | None = None, pad_to_multiple: int = 1,
                 loss: dict | None = None, seed: int = 0, eval_max_new_tokens: int = 128,
                 gradient_checkpointing: bool = False):
        super().__init__(backbone, tokenizer, optim, eval_max_new_tokens, gradient_checkpointing)
        self.masking_cfg = dict(masking)
        self.schedule = instantiate(self.masking_cfg)
        self.lora = LoraSettings(**(lora or {}))
        self.backend = AttentionBackend(attention)
        self.max_expanded_len, self.pad_to_multiple, self.seed = max_expanded_len, pad_to_multiple, seed
        loss = dict(loss or {})
        self.loss_cfg = LaneLoss(**loss)
        self.w_ar, self.w_diff = float(self.loss_cfg.ar_weight), float(self.loss_cfg.diff_weight)
        self.joint = self.loss_cfg.reduction == "joint"
        if self.loss_cfg.teacher and not (self.lora.enabled and self.lora.scope == "lanes"):
            raise ValueError("stage.module.loss.lane_target=teacher needs exact mode (stage.module.lora.scope=lanes, "
                             "where the main tokens' logits are the original model's)")
        self.mask_token_id: int | None = None
        self.noise_ids: torch.Tensor | None = None
        self.save_hyperparameters({"masking": self.masking_cfg, "lora": vars(self.lora), "attention": attention,
                                   "max_expanded_len": max_expanded_len, "loss": loss, "seed": seed})

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.build_backbone(flex=self.uses_flex(self.backend))
        self.loss_cfg.teacher_vocab = num_embeddings(model)  # before a MASK row is added
        # the MASK id is decided here, once, and recorded in fluid.json for everything after stage 1
        self.mask_token_id, added = resolve_mask_token(self.tokenizer, model, self.spec.mask_token)
        self.noise_ids = noise_token_ids(self.tokenizer, num_embeddings(model))
        self.model = apply_lora(self.checkpoint_activations(model), self.lora, [self.mask_token_id],
                                added_token_ids=[self.mask_token_id] if added else []).train()

    # ------------------------------------------------------------------ steps
    def expand(self, batch: dict, generator: torch.Generator) -> LaneBatch:
        return self.expand_batch(batch, self.schedule, generator, mask_token_id=self.mask_token_id,
                                 noise_token_ids=self.noise_ids, max_expanded_len=self.max_expanded_len,
                                 pad_to_multiple=self.pad_to_multiple)

    def forward_lanes(self, lb: LaneBatch) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        mask = attention_mask_for(lb, self.backend, dtype)
        return self.model(input_ids=lb.input_ids, attention_mask=mask, position_ids=lb.position_ids,
                          use_cache=False).logits

    def two_pass(self) -> bool:
        """Exact mode on the dense path: main tokens run the original weights and never see a slot, so
        their outputs do not depend on any trained parameter. They go through one forward without
        autograd and only the slots, after its cache, through backward (same losses and gradients as
        the expanded forward, for about the slots' share of its cost). Gradient checkpointing and
        flex attention keep the single expanded forward."""
        return (self.lora.enabled and self.lora.scope == "lanes" and not self.gradient_checkpointing
                and self.backend.resolve(self.device) is AttentionBackend.DENSE)

    def lane_parts(self, lb: LaneBatch) -> dict[str, torch.Tensor]:
        """:func:`lane_losses` of ``lb``, by the cheapest exact route (:meth:`two_pass`)."""
        if self.two_pass():
            return two_pass_lane_losses(self.model, lb, self.tokenizer.pad_token_id, self.loss_cfg)
        return lane_losses(self.forward_lanes(lb), lb, self.loss_cfg)

    def _step(self, batch: dict, generator: torch.Generator, prefix: str) -> torch.Tensor:
        lb = self.expand(batch, generator)
        parts = self.lane_parts(lb)
        loss = combine(parts, self.w_ar, self.w_diff, self.joint)
        bs = batch["input_ids"].shape[0]
        sync = prefix == "val"
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=sync)
        self.log(f"{prefix}/loss_ar", parts["ar_sum"] / parts["ar_n"].clamp(min=1), batch_size=bs, sync_dist=sync)
        self.log(f"{prefix}/loss_diff", parts["diff_sum"] / parts["diff_n"].clamp(min=1), prog_bar=True,
                 batch_size=bs, sync_dist=sync)
        self.log(f"{prefix}/acc_slot1", parts["slot1_hit"].float() / parts["slot1_n"].clamp(min=1).float(),
                 prog_bar=prefix == "val", batch_size=bs, sync_dist=sync)
        if prefix == "train":
            self.log("train/tokens_ar", parts["ar_n"].float(), batch_size=1)
            self.log("train/tokens_diff", parts["diff_n"].float(), batch_size=1)
            self.log("train/expanded_len", float(lb.length), batch_size=1)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.step_generator(self.seed), "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, self.val_generator(batch_idx), "val")

    # ---------------------------------------------------------------- export
    def _adapter_dir(self, out: Path) -> Path:
        return out.parent / "adapter"

    def checkpoint_meta(self, out: Path) -> CheckpointMeta:
        lanes = self.lora.scope == "lanes"
        return dataclasses.replace(super().checkpoint_meta(out), mask_token_id=self.mask_token_id,
                                   horizon=self.schedule.horizon, masking=self.masking_cfg,
                                   adapter_dir=str(self._adapter_dir(out).resolve())
                                   if self.lora.enabled and not lanes else None,
                                   lane_adapter=LANE_ADAPTER_DIR if lanes else None)

    def export_hf(self, out_dir, **fields) -> Path:
        """LoRA adapter beside a merged plain-HF checkpoint; ``self.model`` becomes the merged model.
        Exact mode (``lora.scope=lanes``): the original weights, unmerged, with the adapter and
        the MASK offset in ``lane_adapter/`` inside it; ``self.model`` becomes the original model."""
        out = Path(out_dir)
        if self.lora.scope == "lanes":
            out.mkdir(parents=True, exist_ok=True)
            save_lane_adapter(self.model, out)
        elif self.lora.enabled:
            self.model.save_pretrained(self._adapter_dir(out))
        self.as_exported()
        return super().export_hf(out, **fields)

    def as_exported(self) -> None:
        """``self.model`` as the export holds it (merged LoRA; exact mode: the original model),
        without writing: the ranks that do not export call it so that every rank tests one model."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return
        self.model = unload_lanes(self.model) if self.lora.scope == "lanes" else merge(self.model)
