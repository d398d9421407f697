"""Elastic-horizon decoding (DESIGN section 3), lossless by verification, batched.

The DESIGN step, per row: 1. horizon ``K_t`` from the K-head on the anchor's hidden state
(or fixed, or an oracle); 2. draft: slot 0 is the argmax of the anchor's logits (exact),
the other slots start as MASK; a forward over the block predicts slot ``s`` from the logits
at slot ``s-1``; the first empty slot takes its argmax, later empty slots whose top
probability exceeds ``confidence`` are filled too; repeat until the block is full;
3. verify: accept the longest prefix equal to the AR argmax; at the first mismatch emit the
AR argmax instead.

How this module runs it (``algorithm="fluid"``, :meth:`FluidDecoder._decode_fluid`):

* **Every forward verifies and drafts.** A slot's logits depend only on the slots before
  it, and filled slots never change, so in any draft forward the leading run of filled
  slots already gets exactly the AR argmax that the separate verify forward would compute.
  The decoder checks it there: the verified run is committed at once (its KV entries are
  exact: kept, never recomputed), a mismatch ends the block at once (its remaining draft
  forwards would be wasted), and the block's first empty slot is filled with an exact
  token. The accepted tokens and horizons are those of the DESIGN loop for the same
  drafts; only the forwards spent after a block's fate is known disappear.
* **Verify t and draft t+1 share one forward:** a fully drafted block carries ``lane_len``
  MASK slots after it; if the block is accepted whole they draft the next block. The prefill
  carries such a lane too: it drafts the first block.
* **Token budget:** at a large batch the forward is compute-bound, so ``token_budget`` caps the
  block (and lane) length by the number of active rows.
* **Ragged rows:** every row has its own block and position; a forward runs every active
  row's window (right-padded); committed entries stay valid in the cache, the rest become
  masked holes (trailing ones cropped, the rest compacted when they dominate); finished
  rows leave the batch.

A single row takes :meth:`FluidDecoder._decode_fluid_one`, the same loop on Python scalars.

``algorithm="ar"`` is greedy decoding on the same state, and ``algorithm="published"`` the
reference loop (one prompt at a time, draft until full, verify, re-run the committed
segment after a mismatch), both for comparison. With ``verify`` on the output is exactly
greedy AR (fp32).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from fluid.decoding.engine import DecodeBatch, RowStats


@dataclass
class DecodeConfig:
    algorithm: str = "fluid"       # fluid | ar | published
    horizon: str = "head"          # head | fixed | oracle
    fixed_k: int = 8
    k_min: int = 4
    k_max: int = 16
    # draft-fill threshold; None: 0.3 with verification (a wrong draft only ends a block early,
    # an empty slot costs a forward: measured fastest), DESIGN's reference 0.9 without (drafts
    # are then committed as they are)
    confidence: float | None = None
    verify: bool = True
    max_new_tokens: int = 256
    batch_size: int = 16
    share_verify_draft: bool = True
    lane_len: int | None = None    # MASK slots after a fully drafted block (None: k_max - 1)
    # tokens per forward across the batch (None: no cap): with n active rows a block holds at most
    # max(k_min, token_budget // (2 n)) slots and a lane one fewer. Batched forwards are compute
    # bound, so wide windows at a large batch cost more than their drafts bring; as rows finish
    # the cap widens again.
    token_budget: int | None = None
    # torch.compile the transformer body (dynamic shapes) for every algorithm alike: faster
    # forwards once compiled (tens of seconds on first use), same tokens
    compile: bool = False

    @property
    def fill_threshold(self) -> float:
        """The confidence above which a later empty slot takes its draft."""
        if self.confidence is not None:
            return self.confidence
        return 0.3 if self.verify else 0.9

    def validate(self) -> "DecodeConfig":
        if self.algorithm not in ("fluid", "ar", "published"):
            raise ValueError(f"decode.algorithm: unknown {self.algorithm!r} (fluid | ar | published)")
        if self.horizon not in ("head", "fixed", "oracle"):
            raise ValueError(f"decode.horizon: unknown {self.horizon!r} (head | fixed | oracle)")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"decode.k_min/k_max: need 1 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        if self.confidence is not None and not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"decode.confidence must be in [0, 1] or null, got {self.confidence}")
        if self.lane_len is not None and self.lane_len < 1:
            raise ValueError(f"decode.lane_len must be >= 1 or null, got {self.lane_len}")
        if self.token_budget is not None and self.token_budget < 2:
            raise ValueError(f"decode.token_budget must be >= 2 or null, got {self.token_budget}")
        if self.max_new_tokens < 1:
            raise ValueError("decode.max_new_tokens must be >= 1")
        return self


def top_token(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmax of ``logits (..., V)`` and its softmax probability, without the full softmax."""
    top_logit, tok = logits.max(-1)
    return torch.exp(top_logit - torch.logsumexp(logits, -1)), tok


def fill_drafts(block: torch.Tensor, need: torch.Tensor, logits: torch.Tensor, confidence: float) -> None:
    """Fill empty slots in place. Slot ``s`` (>= 1) is predicted by ``logits[:, s - 1]``.

    The first empty slot of each row takes its argmax; later empty slots only when their
    top probability exceeds ``confidence``.
    """
    w = block.shape[1]
    top_p, top = top_token(logits[:, : w - 1].float())  # (B, W-1) for slots 1..W-1
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
        self.force_batched = False  # tests: run a single row through the batched loop too
        self._compiled = None

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
    def _decoder(self, cfg: DecodeConfig):
        """The transformer body to run: the model's own, or (``compile``) one compiled copy of it."""
        if not cfg.compile:
            return None
        if self._compiled is None:
            import torch._dynamo

            # shapes vary by design (rows leave, blocks and the cache change length): allow more
            # recompiles than the default before dynamo falls back to eager
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            body = getattr(self.model, self.model.base_model_prefix)
            self._compiled = torch.compile(body, dynamic=True)
        return self._compiled

    @torch.inference_mode()
    def _decode(self, prompts, cfg: DecodeConfig, reference) -> list[RowStats]:
        stats = [RowStats() for _ in prompts]
        if cfg.algorithm == "fluid":
            batch = DecodeBatch(self.model, prompts, self.pad_id, lane=self._caps(cfg, len(prompts))[1],
                                mask_token_id=self.mask_id, decoder=self._decoder(cfg))
            if len(prompts) == 1 and cfg.horizon != "oracle" and not self.force_batched:
                self._decode_fluid_one(batch, stats[0], cfg)
            else:
                self._decode_fluid(batch, stats, cfg, reference)
            return stats
        batch = DecodeBatch(self.model, prompts, self.pad_id, decoder=self._decoder(cfg))
        while batch.size:
            if cfg.algorithm == "ar":
                accepted = self._ar_step(batch, stats)
            else:
                accepted = self._published_step(batch, stats, cfg)
            alive = self._commit(batch, stats, accepted, cfg)
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

    @staticmethod
    def _caps(cfg: DecodeConfig, n_rows: int) -> tuple[int, int]:
        """(largest block, lane length) for a forward over ``n_rows`` rows (``token_budget``)."""
        k_cap = cfg.k_max
        if cfg.token_budget is not None:
            k_cap = max(cfg.k_min, min(cfg.k_max, cfg.token_budget // (2 * n_rows)))
        # a lane of k - 1 MASK slots drafts slots 1..k-1 of the next block (slot 0 is exact)
        lane = min(cfg.lane_len or cfg.k_max - 1, k_cap - 1) if cfg.share_verify_draft else 0
        return k_cap, lane

    def _horizon(self, batch: DecodeBatch, cfg: DecodeConfig) -> torch.Tensor:
        if cfg.horizon == "fixed":
            k = torch.full((batch.size,), cfg.fixed_k, dtype=torch.long, device=batch.device)
        elif cfg.horizon == "head":
            k = self.head.predict_k(batch.h_anchor.to(self.head.net[0].weight.dtype))
        else:
            k = torch.full((batch.size,), cfg.k_max, dtype=torch.long, device=batch.device)
        return k.clamp(min=cfg.k_min, max=cfg.k_max)

    def _draft(self, batch: DecodeBatch, stats, cfg: DecodeConfig, k: torch.Tensor) -> torch.Tensor:
        """A filled block (B, W) by draft forwards until full; slots >= k of a row stay MASK."""
        w = int(k.max())
        block = torch.full((batch.size, w), self.mask_id, dtype=torch.long, device=batch.device)
        block[:, 0] = batch.pending.argmax(-1)
        need = torch.arange(w, device=batch.device)[None, :] < k[:, None]
        need[:, 0] = False
        pos = batch.next_pos[:, None] + torch.arange(w, device=batch.device)[None, :]
        while bool(need.any()):
            active = need.any(-1)
            logits, _ = batch.forward(block, pos)
            batch.crop(w)
            for r in batch.rows[active].tolist():
                stats[r].nfe += 1
                stats[r].draft_forwards += 1
            sub_need = need.clone()
            fill_drafts(block, sub_need, logits, cfg.fill_threshold)
            need = torch.where(active[:, None], sub_need, need)
        return block

    # ------------------------------------------------------- FLUID (early verification)
    def _decode_fluid(self, batch: DecodeBatch, stats, cfg: DecodeConfig, reference) -> None:
        """Every forward verifies and drafts at once; rows advance independently (ragged).

        A row's *window* holds its current block from the first token whose KV is not yet
        cached: slot 0 is that token (always exact: the AR argmax after the cached prefix),
        later slots are drafts or MASK. One forward over the window gives, for each slot, the
        prediction of the next one. The leading run of slots that were non-MASK inputs and equal
        the AR argmax before them is exact (nothing in its context is a guess): it is committed,
        its KV entries kept. Then

        * the run reached a MASK slot: that slot is the block's first empty slot, its argmax is
          exact; later empty slots whose top probability exceeds ``confidence`` are drafted and
          the block goes on (a draft forward, DESIGN 3.2);
        * the run stopped at a filled slot that is not the AR argmax: the block ends there with
          the AR argmax as the next block's slot 0 (verification's mismatch, DESIGN 3.3);
        * the run covers the block: it is accepted whole.

        Filled slots never change and a slot's logits depend only on the slots before it, so
        this accepts exactly the prefix that DESIGN's separate verify forward would accept, for
        the same drafts and horizons: it is that algorithm, minus the draft forwards spent on a
        block after its fate is already known. A row whose block is fully drafted also carries
        a lane of MASK tokens after it; if the block is accepted whole, the lane drafts the next
        block in the same forward (verify t and draft t+1 share one forward).
        """
        # Row bookkeeping lives in small numpy arrays (a torch op costs microseconds of dispatch
        # on CPU, dozens of them per forward add up); tensors are only what the model needs.
        dev, kmax, mask_id = batch.device, cfg.k_max, self.mask_id
        n = batch.size
        win = np.full((n, kmax), mask_id, dtype=np.int64)
        filled = np.zeros((n, kmax), dtype=bool)
        blen = np.zeros(n, dtype=np.int64)         # slots of the current block in the window
        block_k = np.zeros(n, dtype=np.int64)      # horizon of the current block
        block_acc = np.zeros(n, dtype=np.int64)    # its tokens committed so far
        n_tok = np.zeros(n, dtype=np.int64)        # tokens generated per row
        exact = batch.pending.argmax(-1).cpu().numpy()  # slot 0 of a new block
        next_pos = batch.next_pos.cpu().numpy()         # position of each window's slot 0
        start = np.ones(n, dtype=bool)
        lane_p = lane_tok = None                   # next-block drafts from a shared lane
        slot = np.arange(kmax)[None, :]
        if batch.lane_logits is not None:          # the prefill drafted the first block
            p, top_t = top_token(batch.lane_logits)
            p = p.cpu().numpy()
            m = min(p.shape[1], kmax)
            lane_p = np.full((n, kmax), -1.0)
            lane_p[:, :m] = p[:, :m]
            lane_tok = np.full((n, kmax), mask_id, dtype=np.int64)
            lane_tok[:, :m] = top_t.cpu().numpy()[:, :m]
            batch.lane_logits = None
        while batch.size:
            n = batch.size
            k_cap, lane_len = self._caps(cfg, n)
            if start.any():  # new blocks: horizon from the head on the anchor's hidden state
                k = self._horizon(batch, cfg).cpu().numpy()
                k = np.maximum(np.minimum(np.minimum(k, k_cap), cfg.max_new_tokens - n_tok), 1)
                fresh = np.where(slot == 0, exact[:, None], mask_id)
                fresh_filled = np.broadcast_to(slot == 0, (n, kmax)).copy()
                if lane_p is not None:  # drafts of the next block made by the previous forward's lane
                    take = (lane_p > cfg.fill_threshold) & (slot > 0) & (slot < k[:, None])
                    fresh = np.where(take, lane_tok, fresh)
                    fresh_filled |= take
                s = start[:, None]
                win, filled = np.where(s, fresh, win), np.where(s, fresh_filled, filled)
                blen, block_k = np.where(start, k, blen), np.where(start, k, block_k)
                block_acc = np.where(start, 0, block_acc)
            in_block = slot < blen[:, None]
            full = (filled | ~in_block).all(-1)    # nothing left to draft
            if cfg.horizon == "oracle":
                blen = self._oracle_trim(batch, stats, win, blen, full, reference, cfg)
                in_block = slot < blen[:, None]
            lane = np.where(full, lane_len, 0)
            qlen = blen + lane
            q = int(qlen.max())
            qslot = np.arange(q)[None, :]
            ids = np.full((n, max(q, kmax)), mask_id, dtype=np.int64)
            ids[:, :kmax] = np.where(in_block, win, mask_id)
            logits, hidden = batch.forward(torch.from_numpy(ids[:, :q]).to(dev),
                                           torch.from_numpy(next_pos[:, None] + qslot).to(dev),
                                           new_valid=None if qlen.min() == q else
                                           torch.from_numpy(qslot < qlen[:, None]).to(dev))
            for r, f in zip(batch.rows.tolist(), full.tolist()):
                stats[r].nfe += 1
                stats[r].draft_forwards += not f
            top_p, top_t = top_token(logits)
            top_p, ar = top_p.cpu().numpy(), top_t.cpu().numpy()  # ar[:, j]: the AR token for slot j + 1
            rows = np.arange(n)
            # verification: the leading run of filled inputs that equal the AR argmax before them
            w = min(q, kmax)
            ok = filled[:, :w] & in_block[:, :w]
            if cfg.verify:
                ok[:, 1:] &= win[:, 1:w] == ar[:, : w - 1]
            ok[:, 0] = True
            c = np.cumprod(ok, -1).sum(-1)            # committed this forward, >= 1
            complete = c >= blen
            nxt = ar[rows, c - 1]                     # exact token after the committed run
            # the committed run's KV entries are exact: keep them, the rest are holes (trailing ones cropped)
            if n > 1:  # (one row: everything left after the crop is committed and valid)
                batch.hide_tail(torch.from_numpy(qslot < c[:, None]).to(dev))
            batch.crop(q - int(c.max()))
            next_pos = next_pos + c
            committed = [row[:m] for row, m in zip(win.tolist(), c.tolist())]
            c_at = np.clip(np.minimum(c, blen - 1), 0, None)
            mismatch = ~complete & filled[rows, c_at]  # stopped at a wrong draft: block ends
            cont = ~complete & ~mismatch              # stopped at the first empty slot
            # drafts for the rest of a continuing block: empty slots after c above the confidence
            later = (slot[:, 1:w] > c[:, None]) & (slot[:, 1:w] < blen[:, None]) & ~filled[:, 1:w]
            take = later & (top_p[:, : w - 1] > cfg.fill_threshold) & cont[:, None]
            win[:, 1:w] = np.where(take, ar[:, : w - 1], win[:, 1:w])
            filled[:, 1:w] |= take
            # shift the window left by c: slot c (the exact token) becomes slot 0
            idx = slot + c[:, None]
            inside = idx < kmax
            idx = np.minimum(idx, kmax - 1)
            win = np.where(inside, np.take_along_axis(win, idx, 1), mask_id)
            filled = inside & np.take_along_axis(filled, idx, 1)
            win[:, 0], filled[:, 0] = nxt, True
            blen = blen - c
            block_acc = block_acc + c
            n_tok = n_tok + c
            ended = complete | mismatch
            if ended.any():  # the K-head input for the next block: the last committed token's state
                batch.h_anchor = hidden[torch.arange(n, device=dev), torch.from_numpy(c - 1).to(dev)]
            # next-block drafts from the lane (rows that carried one and accepted their whole block)
            lane_p = lane_tok = None
            if lane_len and (complete & full).any():
                li = c[:, None] - 1 + slot            # slot s of the next block <- logits at c-1+s
                has_lane = (complete & full)[:, None] & (li < (c + lane)[:, None])
                li = np.minimum(li, q - 1)
                lane_p = np.where(has_lane, np.take_along_axis(top_p, li, 1), -1.0)
                lane_tok = np.take_along_axis(ar, li, 1)
            alive = self._commit_fluid(batch, stats, committed, ended, block_acc, block_k, cfg)
            exact, start = nxt, ended
            if not all(alive):  # finished rows leave the batch
                m = np.array(alive)
                win, filled, blen, block_k, block_acc, n_tok, exact, start = (
                    x[m] for x in (win, filled, blen, block_k, block_acc, n_tok, exact, start))
                if lane_p is not None:
                    lane_p, lane_tok = lane_p[m], lane_tok[m]
                batch.next_pos = torch.from_numpy(next_pos).to(dev)
                batch.keep(torch.from_numpy(m).to(dev))
                next_pos = next_pos[m]
            batch.compact()

    def _decode_fluid_one(self, batch: DecodeBatch, row: RowStats, cfg: DecodeConfig) -> None:
        """:meth:`_decode_fluid` for a single row, on plain Python scalars and lists.

        The same steps and the same results (a test compares the two on every statistic); at
        batch 1 the array bookkeeping of the batched loop costs about as much per forward as
        the Python around it, so the common interactive case gets this lean copy."""
        dev, mask_id, conf = batch.device, self.mask_id, cfg.fill_threshold
        k_cap, lane_len = self._caps(cfg, 1)
        exact = int(batch.pending[0].argmax())
        next_pos = int(batch.next_pos[0])
        lane = None                                # (top prob, token) per slot of the next block
        if batch.lane_logits is not None:          # the prefill drafted the first block
            p, t = top_token(batch.lane_logits[0])
            lane = (p.tolist(), t.tolist())
            batch.lane_logits = None
        while True:
            # a new block: horizon from the head; slot 0 exact, later slots from the lane's drafts
            k = int(self._horizon(batch, cfg)[0])
            k = max(min(k, k_cap, cfg.max_new_tokens - len(row.tokens)), 1)
            win, filled = [exact] + [mask_id] * (k - 1), [True] + [False] * (k - 1)
            if lane is not None:
                lp, lt = lane
                for s in range(1, min(k, len(lp))):
                    if lp[s] > conf:
                        win[s], filled[s] = lt[s], True
            acc, lane = 0, None
            while True:  # forwards over this block until it ends
                blen = len(win)
                full = all(filled)
                q = blen + (lane_len if full else 0)
                ids = win + [mask_id] * (q - blen)
                logits, hidden = batch.forward(torch.tensor([ids], device=dev),
                                               torch.arange(next_pos, next_pos + q, device=dev)[None])
                row.nfe += 1
                row.draft_forwards += not full
                p, t = top_token(logits[0])
                top_p, ar = p.tolist(), t.tolist()
                c = 1  # verification: the leading run of filled slots equal to the AR argmax before them
                while c < blen and filled[c] and (not cfg.verify or win[c] == ar[c - 1]):
                    c += 1
                batch.crop(q - c)
                next_pos += c
                acc += c
                committed, nxt = win[:c], ar[c - 1]
                ended = c >= blen or filled[c]   # accepted whole, or a wrong draft ends the block
                if not ended:  # draft the rest: empty slots after c above the confidence
                    for s in range(c + 1, blen):
                        if not filled[s] and top_p[s - 1] > conf:
                            win[s], filled[s] = ar[s - 1], True
                    win, filled = [nxt] + win[c + 1:], [True] + filled[c + 1:]
                toks, reason = self._cut(row, committed, cfg)
                row.tokens.extend(toks)
                if reason or ended:
                    row.accepted.append(acc - (len(committed) - len(toks)))
                    row.horizons.append(k)
                if reason:
                    row.finished = reason
                    return
                if ended:
                    break
            batch.h_anchor = hidden[:, c - 1]
            exact = nxt
            if lane_len and c >= blen and full:  # next-block drafts from this forward's lane
                lane = (top_p[c - 1: c + lane_len], ar[c - 1: c + lane_len])

    def _oracle_trim(self, batch, stats, win, blen, now, reference, cfg) -> np.ndarray:
        """Analysis only: once a block is fully drafted, cut it to the prefix that matches the
        reference (what a perfect K-head would have picked for this draft)."""
        blen = blen.copy()
        for i in np.nonzero(now)[0].tolist():
            r = int(batch.rows[i])
            done = len(stats[r].tokens)
            ref = reference[r][done: done + int(blen[i])]
            match = 0
            for a, b in zip(win[i, : int(blen[i])].tolist(), ref):
                if a != b:
                    break
                match += 1
            blen[i] = min(max(match, cfg.k_min, 1), int(blen[i]))
        return blen

    def _commit_fluid(self, batch, stats, committed, ended, block_acc, block_k, cfg) -> list[bool]:
        """Append each row's committed tokens; close finished blocks; which rows are still alive."""
        alive = [True] * batch.size
        for i, (r, end, acc, k) in enumerate(zip(batch.rows.tolist(), ended.tolist(), block_acc.tolist(),
                                                 block_k.tolist())):
            toks, reason = self._cut(stats[r], committed[i], cfg)
            stats[r].tokens.extend(toks)
            if reason or end:
                stats[r].accepted.append(acc - (len(committed[i]) - len(toks)))
                stats[r].horizons.append(k)
            if reason:
                stats[r].finished = reason
                alive[i] = False
        return alive

    def _published_step(self, batch: DecodeBatch, stats, cfg: DecodeConfig) -> list[list[int]]:
        """The reference loop (batch 1): draft until full, verify, and after a mismatch re-run
        the committed segment with one more forward instead of reusing the verify KV."""
        k = self._horizon(batch, cfg) if cfg.horizon != "oracle" else torch.full(
            (batch.size,), cfg.k_max, device=batch.device)
        block = self._draft(batch, stats, cfg, k)
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

    def _cut(self, row: RowStats, toks: list[int], cfg: DecodeConfig) -> tuple[list[int], str]:
        """``toks`` cut at EOS / max_new_tokens, and why the row is finished ('' if it is not)."""
        room = cfg.max_new_tokens - len(row.tokens)
        reason = ""
        if self.eos_id is not None and self.eos_id in toks[:room]:
            toks = toks[: toks.index(self.eos_id) + 1]
            reason = "eos"
        if len(toks) >= room:
            toks = toks[:room]
            reason = reason or "max_new_tokens"
        if not reason and self.stop_strings:
            text = self.tokenizer.decode((row.tokens + toks)[-64:], skip_special_tokens=True)
            if any(s in text for s in self.stop_strings):
                reason = "stop"
        return toks, reason

    def _commit(self, batch: DecodeBatch, stats, accepted: list[list[int]], cfg: DecodeConfig) -> torch.Tensor:
        """Append accepted tokens (one step of the AR or published loop); rows still alive."""
        alive = torch.ones(batch.size, dtype=torch.bool, device=batch.device)
        for i, r in enumerate(batch.rows.tolist()):
            toks, reason = self._cut(stats[r], accepted[i], cfg)
            stats[r].tokens.extend(toks)
            stats[r].accepted.append(len(toks))
            if reason:
                stats[r].finished = reason
                alive[i] = False
        return alive
