"""Elastic-horizon decoding (DESIGN section 3), lossless by verification, batched.

State per row: the KV cache of committed tokens, the logits of the last committed token
(the *anchor*) and its hidden state. One step:

1. horizon ``K_t`` from the K-head on the anchor's hidden state (or fixed, or an oracle);
2. draft: block slot 0 is the argmax of the anchor's logits (exact); the other slots start
   as MASK; a forward over the block predicts slot ``s`` from the logits at slot ``s-1``;
   the first empty slot takes its argmax and later empty slots whose top probability
   exceeds ``confidence`` are filled too; repeat until the block is full (drafts are never
   committed: the cache is cropped after each draft forward);
3. verify: run the filled block; slot ``s`` is accepted while it equals the AR argmax at
   slot ``s-1``. The accepted prefix's KV entries are exact and are kept (no re-commit
   forward); the AR argmax at the first mismatch is the next block's slot 0, so no extra
   forward is spent on it either. With ``verify`` on the output is exactly greedy AR.

The verify forward also carries a lane of MASK tokens after the block: for every row that
accepts its whole block, these give the next block's first draft for free (verify t and
draft t+1 share one forward). Rows accept different lengths (ragged); rejected slots stay in the
cache as masked holes (compacted when they dominate) and finished rows leave the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from fluid.decoding.engine import DecodeBatch, RowStats


@dataclass
class DecodeConfig:
    algorithm: str = "fluid"       # fluid | ar | published
    horizon: str = "head"          # head | fixed | oracle
    fixed_k: int = 8
    k_min: int = 4
    k_max: int = 16
    confidence: float = 0.9
    verify: bool = True
    max_new_tokens: int = 256
    batch_size: int = 16
    share_verify_draft: bool = True

    def validate(self) -> "DecodeConfig":
        if self.algorithm not in ("fluid", "ar", "published"):
            raise ValueError(f"decode.algorithm: unknown {self.algorithm!r} (fluid | ar | published)")
        if self.horizon not in ("head", "fixed", "oracle"):
            raise ValueError(f"decode.horizon: unknown {self.horizon!r} (head | fixed | oracle)")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"decode.k_min/k_max: need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"decode.confidence must be in [0, 1], got {self.confidence}")
        if self.max_new_tokens < 1:
            raise ValueError("decode.max_new_tokens must be >= 1")
        return self


def fill_drafts(block: torch.Tensor, need: torch.Tensor, logits: torch.Tensor, confidence: float,
                offset: int = 0) -> None:
    """Fill empty slots in place. Slot ``s`` (>= 1) is predicted by ``logits[:, offset + s - 1]``.

    The first empty slot of each row takes its argmax; later empty slots only when their
    top probability exceeds ``confidence``.
    """
    w = block.shape[1]
    pred_logits = logits[:, offset: offset + w - 1]
    probs = torch.softmax(pred_logits.float(), -1)
    top_p, top = probs.max(-1)                      # (B, W-1) for slots 1..W-1
    slots_need = need[:, 1:]
    first = slots_need & (torch.cumsum(slots_need.long(), -1) == 1)
    take = slots_need & (first | (top_p > confidence))
    block[:, 1:] = torch.where(take, top, block[:, 1:])
    need[:, 1:] &= ~take


class FluidDecoder:
    """``FluidDecoder(model, tokenizer, head).generate(prompts)`` -> completions and statistics."""

    def __init__(self, model, tokenizer, head=None, mask_token_id: int | None = None,
                 config: DecodeConfig | None = None, stop_strings: Sequence[str] = ()):
        self.model, self.tokenizer, self.head = model.eval(), tokenizer, head
        self.mask_id = mask_token_id if mask_token_id is not None else tokenizer.mask_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.config = (config or DecodeConfig()).validate()
        self.stop_strings = list(stop_strings)

    # ------------------------------------------------------------------ API
    def generate(self, prompts: Sequence[Sequence[int] | str], reference: Sequence[Sequence[int]] | None = None,
                 **overrides) -> dict:
        """Decode ``prompts`` (token ids or chat-free strings) in batches; returns texts and stats."""
        cfg = replace(self.config, **overrides).validate() if overrides else self.config
        if cfg.algorithm == "fluid" and cfg.horizon == "head" and self.head is None:
            raise ValueError("decode.horizon=head needs a K-head (load a stage-2 checkpoint) or use horizon=fixed")
        if cfg.algorithm != "ar" and self.mask_id is None:
            raise ValueError("the tokenizer has no mask token; pass mask_token_id (see the checkpoint's fluid.json)")
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
               for p in prompts]
        if cfg.horizon == "oracle" and reference is None:
            reference = self.generate(ids, algorithm="ar", max_new_tokens=cfg.max_new_tokens)["tokens"]
        stats: list[RowStats] = []
        t0 = time.perf_counter()
        bs = 1 if cfg.algorithm == "published" else cfg.batch_size
        for start in range(0, len(ids), bs):
            chunk = ids[start: start + bs]
            ref = reference[start: start + bs] if reference is not None else None
            stats.extend(self._decode(chunk, cfg, ref))
        wall = time.perf_counter() - t0
        texts = [self._text(s.tokens) for s in stats]
        n_tok = sum(len(s.tokens) for s in stats)
        # forwards of the batches (a forward serves every active row of its batch)
        return {"texts": texts, "tokens": [s.tokens for s in stats], "rows": stats, "wall_time_s": wall,
                "generated_tokens": n_tok, "tokens_per_s": n_tok / wall if wall > 0 else float("nan"),
                "tpf": n_tok / max(1, sum(s.nfe for s in stats)),
                "nfe": sum(s.nfe for s in stats)}

    def _text(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in self.stop_strings:
            if s in text:
                text = text[: text.index(s)]
        return text

    # ------------------------------------------------------------- decoding
    @torch.no_grad()
    def _decode(self, prompts, cfg: DecodeConfig, reference) -> list[RowStats]:
        batch = DecodeBatch(self.model, prompts, self.pad_id)
        stats = [RowStats() for _ in prompts]
        drafts: torch.Tensor | None = None  # next-block drafts from a shared verify forward
        while batch.size:
            if cfg.algorithm == "ar":
                accepted = self._ar_step(batch, stats)
            elif cfg.algorithm == "published":
                accepted = self._published_step(batch, stats, cfg)
            else:
                accepted, drafts = self._fluid_step(batch, stats, cfg, drafts, reference)
            alive = self._commit(batch, stats, accepted, cfg)
            if drafts is not None:
                drafts = drafts[alive]
            batch.keep(alive)
            batch.compact()
        return stats

    def _ar_step(self, batch: DecodeBatch, stats) -> list[list[int]]:
        tok = batch.pending.argmax(-1)
        logits, hidden = batch.forward(tok[:, None], batch.next_pos[:, None])
        for r in batch.rows.tolist():
            stats[r].nfe += 1
        batch.pending, batch.h_anchor = logits[:, -1], hidden[:, -1]
        batch.next_pos = batch.next_pos + 1
        return [[int(t)] for t in tok]

    def _horizon(self, batch: DecodeBatch, cfg: DecodeConfig) -> torch.Tensor:
        if cfg.horizon == "fixed":
            k = torch.full((batch.size,), cfg.fixed_k, dtype=torch.long, device=batch.device)
        elif cfg.horizon == "head":
            k = self.head.predict_k(batch.h_anchor.to(self.head.net[0].weight.dtype))
        else:
            k = torch.full((batch.size,), cfg.k_max, dtype=torch.long, device=batch.device)
        return k.clamp(min=cfg.k_min, max=cfg.k_max)

    def _draft(self, batch: DecodeBatch, stats, cfg: DecodeConfig, k: torch.Tensor,
               drafts: torch.Tensor | None) -> torch.Tensor:
        """A filled block (B, W); slots >= k of a row stay MASK (they lead the next lane)."""
        w = int(k.max())
        block = torch.full((batch.size, w), self.mask_id, dtype=torch.long, device=batch.device)
        block[:, 0] = batch.pending.argmax(-1)
        need = torch.arange(w, device=batch.device)[None, :] < k[:, None]
        need[:, 0] = False
        if drafts is not None:  # the shared verify forward already drafted this block (rows without: NaN)
            has = ~torch.isnan(drafts[:, 0, 0])
            if bool(has.any()):
                sub = need[has]
                sub_block = block[has]
                fill_drafts(sub_block, sub, drafts[has, :w], cfg.confidence)
                block[has], need[has] = sub_block, sub
        pos = batch.next_pos[:, None] + torch.arange(w, device=batch.device)[None, :]
        while bool(need.any()):
            active = need.any(-1)
            logits, _ = batch.forward(block, pos)
            batch.crop(w)
            for r in batch.rows[active].tolist():
                stats[r].nfe += 1
                stats[r].draft_forwards += 1
            sub_need = need.clone()
            fill_drafts(block, sub_need, logits, cfg.confidence)
            need = torch.where(active[:, None], sub_need, need)
        return block

    def _fluid_step(self, batch: DecodeBatch, stats, cfg: DecodeConfig, drafts, reference):
        k = self._horizon(batch, cfg)
        block = self._draft(batch, stats, cfg, k, drafts)
        if cfg.horizon == "oracle":
            k = self._oracle_k(batch, stats, block, reference, cfg)
        w = block.shape[1]
        extra = cfg.k_max if cfg.share_verify_draft else 0
        lane = torch.full((batch.size, extra), self.mask_id, dtype=torch.long, device=batch.device)
        inputs = torch.cat([block, lane], dim=1)
        pos = batch.next_pos[:, None] + torch.arange(w + extra, device=batch.device)[None, :]
        logits, hidden = batch.forward(inputs, pos)
        batch.crop(extra)
        for r in batch.rows.tolist():
            stats[r].nfe += 1
        slot = torch.arange(w, device=batch.device)[None, :]
        if cfg.verify:
            ar = logits[:, : w - 1].argmax(-1)                      # AR argmax for slots 1..W-1
            ok = torch.cat([torch.ones_like(block[:, :1], dtype=torch.bool), block[:, 1:] == ar], dim=1)
            ok &= slot < k[:, None]
            m = torch.cumprod(ok.long(), -1).sum(-1)               # accepted prefix length, >= 1
        else:
            m = k.clone()
        rows = torch.arange(batch.size, device=batch.device)
        t = batch.key_valid.shape[1]
        batch.key_valid[:, t - w:] &= slot < m[:, None]             # rejected slots become holes
        batch.pending = logits[rows, m - 1]
        batch.h_anchor = hidden[rows, m - 1]
        batch.next_pos = batch.next_pos + m
        next_drafts = None
        if cfg.share_verify_draft:
            # A row that accepted its whole block has the MASK lane after its anchor in this forward:
            # logits at index m-1+s predict slot s of its next block (read at column s-1). Rows with a
            # mismatch get no shared draft (NaN): the tail after a rejected slot drafts badly (measured).
            idx = m[:, None] + torch.arange(cfg.k_max, device=batch.device)[None, :]
            next_drafts = logits[rows[:, None], idx]
            next_drafts[m < k] = float("nan")
        accepted = []
        for i, r in enumerate(batch.rows.tolist()):
            stats[r].horizons.append(int(k[i]))
            accepted.append(block[i, : int(m[i])].tolist())
        return accepted, next_drafts

    def _oracle_k(self, batch, stats, block, reference, cfg) -> torch.Tensor:
        """Analysis only: the horizon that a perfect K-head would pick for this draft."""
        k = []
        for i, r in enumerate(batch.rows.tolist()):
            done = len(stats[r].tokens)
            ref = reference[r][done: done + block.shape[1]]
            match = 0
            for a, b in zip(block[i].tolist(), ref):
                if a != b:
                    break
                match += 1
            k.append(min(max(match, cfg.k_min), block.shape[1]))
        return torch.tensor(k, device=batch.device)

    def _published_step(self, batch: DecodeBatch, stats, cfg: DecodeConfig) -> list[list[int]]:
        """The reference loop (batch 1): draft until full, verify, and after a mismatch re-run
        the committed segment with one more forward instead of reusing the verify KV."""
        k = self._horizon(batch, cfg) if cfg.horizon != "oracle" else torch.full(
            (batch.size,), cfg.k_max, device=batch.device)
        block = self._draft(batch, stats, cfg, k, None)
        w = block.shape[1]
        pos = batch.next_pos[:, None] + torch.arange(w, device=batch.device)[None, :]
        logits, hidden = batch.forward(block, pos)
        for r in batch.rows.tolist():
            stats[r].nfe += 1
            stats[r].horizons.append(int(k[0]))
        if cfg.verify:
            ar = logits[:, : w - 1].argmax(-1)
            ok = torch.cat([torch.ones_like(block[:, :1], dtype=torch.bool), block[:, 1:] == ar], dim=1)
            m = int(torch.cumprod(ok[0].long(), -1).sum())
        else:
            m = w
        if m == w:
            batch.pending, batch.h_anchor = logits[:, -1], hidden[:, -1]
            batch.next_pos = batch.next_pos + w
            return [block[0].tolist()]
        # mismatch: accepted prefix + the AR correction, recomputed from scratch
        committed = torch.cat([block[:, :m], ar[:, m - 1: m]], dim=1)
        batch.crop(w)
        pos = batch.next_pos[:, None] + torch.arange(m + 1, device=batch.device)[None, :]
        logits, hidden = batch.forward(committed, pos)
        stats[batch.rows[0].item()].nfe += 1
        batch.pending, batch.h_anchor = logits[:, -1], hidden[:, -1]
        batch.next_pos = batch.next_pos + m + 1
        return [committed[0].tolist()]

    def _commit(self, batch: DecodeBatch, stats, accepted: list[list[int]], cfg: DecodeConfig) -> torch.Tensor:
        """Append accepted tokens; cut at EOS / max_new_tokens / stop strings; rows still alive."""
        alive = torch.ones(batch.size, dtype=torch.bool, device=batch.device)
        for i, r in enumerate(batch.rows.tolist()):
            toks = accepted[i]
            room = cfg.max_new_tokens - len(stats[r].tokens)
            reason = ""
            if self.eos_id is not None and self.eos_id in toks[:room]:
                toks = toks[: toks.index(self.eos_id) + 1]
                reason = "eos"
            if len(toks) >= room:
                toks = toks[:room]
                reason = reason or "max_new_tokens"
            stats[r].tokens.extend(toks)
            stats[r].accepted.append(len(toks))
            if not reason and self.stop_strings:
                text = self.tokenizer.decode(stats[r].tokens[-64:], skip_special_tokens=True)
                if any(s in text for s in self.stop_strings):
                    reason = "stop"
            if reason:
                stats[r].finished = reason
                alive[i] = False
        return alive
