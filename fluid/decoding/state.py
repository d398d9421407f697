"""The batched decoding state every algorithm runs on, and the one commit rule.

Rows are left-padded prompts; the KV cache may contain *holes* (entries of rejected draft
slots, or of prompt padding) that a per-row ``key_valid`` mask hides. Every forward gets an
explicit 4-D float mask and explicit position ids, so a row's result never depends on the
other rows. Finished rows are dropped from the batch (cache included), so they stop costing
compute; the cache is compacted when holes dominate it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import DynamicCache

from fluid.backbones.compat import kv_cache
from fluid.nn import decoder_and_lm_head, to_float_mask

COMPACT_MIN = 64    # a cache shorter than this is never compacted (the gather costs more than the holes)


@dataclass
class RowStats:
    """One row's output and statistics. NFE rule, the same for every algorithm: a forward commits
    the tokens whose KV it writes; ``nfe`` counts the decoding forwards the row took part in (the
    prefill excluded), so greedy AR has exactly one forward per token."""

    tokens: list[int] = field(default_factory=list)
    nfe: int = 0
    accepted: list[int] = field(default_factory=list)   # tokens committed per block (per step for AR)
    horizons: list[int] = field(default_factory=list)   # horizon chosen per block
    draft_forwards: int = 0          # forwards that only drafted (verified nothing past slot 0)
    finished: str = ""               # eos | max_new_tokens | stop
    # this row's own commit rule (a server's request: its max_tokens and stop strings); None: the batch's
    rule: "StopRule | None" = field(default=None, repr=False, compare=False)


class StopRule:
    """The commit rule of every algorithm: tokens are appended up to EOS (included),
    ``max_new_tokens`` or a stop string; a block's statistics are closed when it ends."""

    def __init__(self, max_new_tokens: int, eos_token_id: int | Sequence[int] | None, tokenizer=None,
                 stop_strings: Sequence[str] = ()):
        """``eos_token_id``: one id or several (a generation config may list some); None: none."""
        self.max_new_tokens = max_new_tokens
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_ids = frozenset(int(i) for i in ids)
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self._longest = max((len(s) for s in self.stop_strings), default=0)

    def room(self, row: RowStats) -> int:
        """Tokens ``row`` may still generate (under its own rule when it has one)."""
        rule = row.rule or self
        return rule.max_new_tokens - len(row.tokens)

    def cut(self, row: RowStats, toks: list[int]) -> tuple[list[int], str]:
        """``toks`` cut at EOS / max_new_tokens, and why the row is finished ('' if it is not)."""
        room = self.max_new_tokens - len(row.tokens)
        reason = ""
        end = next((i for i, t in enumerate(toks[:room]) if t in self.eos_ids), None) if self.eos_ids else None
        if end is not None:
            toks = toks[: end + 1]
            reason = "eos"
        if len(toks) >= room:
            toks = toks[:room]
            reason = reason or "max_new_tokens"
        if not reason and self.stop_strings and self._stops(row.tokens, toks):
            # the row ends at the token that completes the stop string, as greedy AR (one token a
            # commit) would end it: a block's later tokens are not committed
            toks = next(toks[:k] for k in range(1, len(toks) + 1) if self._stops(row.tokens, toks[:k]))
            reason = "stop"
        return toks, reason

    def _stops(self, done: list[int], new: list[int]) -> bool:
        """A stop string ends in the text of ``new`` (after ``done``). Only the tail that can hold
        one is decoded (each token is at least one character), the same cost per commit for every
        algorithm."""
        tail = (done + new)[-(len(new) + self._longest + 8):]
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s in text for s in self.stop_strings)

    def commit(self, row: RowStats, toks: list[int], *, block_done: bool, block_acc: int,
               horizon: int | None = None) -> bool:
        """Append ``toks`` to ``row``; ``block_acc``: the block's committed tokens including these.
        Closes the block's statistics when it is done or the row finishes; True while the row lives."""
        kept, reason = (row.rule or self).cut(row, toks)
        row.tokens.extend(kept)
        if reason or block_done:
            row.accepted.append(block_acc - (len(toks) - len(kept)))
            if horizon is not None:
                row.horizons.append(horizon)
        if reason:
            row.finished = reason
        return not reason


def visible_text(tokenizer, tokens: list[int], stop_strings: Sequence[str] = ()) -> str:
    """The text of ``tokens`` as a user sees it: special tokens dropped, cut before a stop string."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for s in stop_strings:
        if s and s in text:
            text = text[: text.index(s)]
    return text


def decode_result(stats: list[RowStats], texts: list[str], wall: float) -> dict:
    """What every decoder's ``generate`` returns: texts, tokens, row statistics, time, TPF."""
    n_tok = sum(len(s.tokens) for s in stats)
    nfe = sum(s.nfe for s in stats)
    return {"texts": texts, "tokens": [s.tokens for s in stats], "rows": stats, "wall_time_s": wall,
            "generated_tokens": n_tok, "tokens_per_s": n_tok / wall if wall > 0 else float("nan"),
            "tpf": n_tok / max(1, nfe), "nfe": nfe}


@dataclass
class Context:
    """What an algorithm needs besides the batch and the config: where horizons come from
    (:mod:`fluid.decoding.horizon`), the commit rule, and the MASK id."""

    horizon: object
    rule: StopRule
    mask_id: int | None
    prompts: Sequence[Sequence[int]] = ()   # the batch's prompt ids (n-gram drafts look them up)
    cost: object = None                     # a ForwardCost (window=cost)
    acceptance: object = None               # running acceptance estimates (window=cost)


def top_token(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmax of ``logits (..., V)`` and its softmax probability, without the full softmax."""
    top_logit, tok = logits.max(-1)
    return torch.exp(top_logit - torch.logsumexp(logits, -1)), tok


class DecodeBatch:
    """The decoding state of the still-active rows of one batch."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], pad_token_id: int, lane: int = 0,
                 mask_token_id: int | None = None, decoder=None):
        """Prefill ``prompts``. With ``lane`` > 0 the prefill forward also carries ``lane`` MASK
        slots after every prompt (their KV is dropped again): ``lane_logits[:, s]`` predicts slot
        ``s`` of the first block (slot 0 from the prompt's last token), so the first block is
        drafted by the prefill itself instead of by a forward of its own. ``decoder`` replaces
        the model's transformer body (a ``torch.compile`` of it)."""
        self.model = model
        self.decoder, self.lm_head = decoder_and_lm_head(model)
        if decoder is not None:
            self.decoder = decoder
        p0 = next(model.parameters())
        self.device, self.dtype = p0.device, p0.dtype
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), pad_token_id, dtype=torch.long, device=self.device)
        valid = torch.zeros((len(prompts), n), dtype=torch.bool, device=self.device)
        for r, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {r} is empty")
            ids[r, n - len(p):] = torch.tensor(list(p), device=self.device)
            valid[r, n - len(p):] = True
        self.rows = torch.arange(len(prompts), device=self.device)  # original index of each active row
        self.cache = DynamicCache()
        self.key_valid = torch.zeros((len(prompts), 0), dtype=torch.bool, device=self.device)
        self.holes = False  # whether some cache entry is hidden (padding, rejected drafts): key_valid matters
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        self.lane_logits = None
        if lane > 0:
            if mask_token_id is None:
                raise ValueError("a prefill lane needs the mask token id")
            ids = torch.cat([ids, torch.full((len(prompts), lane), mask_token_id, dtype=torch.long,
                                             device=self.device)], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(lane, device=self.device)[None]], dim=1)
            valid = torch.cat([valid, torch.ones((len(prompts), lane), dtype=torch.bool, device=self.device)], 1)
        logits, hidden = self.forward(ids, pos, new_valid=valid, logits_from=n - 1)
        if lane > 0:
            self.crop(lane)
            self.lane_logits = logits
        self.pending = logits[:, 0]        # logits of the anchor (last committed, cached token)
        self.h_anchor = hidden[:, n - 1]   # its final hidden state (K-head input)
        self.next_pos = pos[:, n - 1] + 1  # position of the next token

    @property
    def size(self) -> int:
        return int(self.rows.numel())

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, new_valid: torch.Tensor | None = None,
                logits_from: int = 0):
        """Run ``ids`` (B, Q) after the cache; their KV is appended (callers crop/invalidate).

        ``new_valid`` (B, Q): which new entries stay visible to later queries (None: all).
        Returns the logits of positions ``logits_from..Q-1`` (the prefill needs only its last
        ones) and the final hidden states of all positions."""
        b, q = ids.shape
        t = self.key_valid.shape[1]
        if new_valid is None and not self.holes:
            # nothing to hide: the plain causal mask over cache + block (one op, no boolean detour)
            mask = torch.full((q, t + q), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
            mask = mask.triu_(t + 1)[None, None].expand(b, 1, q, t + q)
        else:
            if new_valid is None:
                new_valid = torch.ones((b, q), dtype=torch.bool, device=self.device)
            causal = torch.ones((q, q), dtype=torch.bool, device=self.device).tril()
            allowed = torch.cat([self.key_valid[:, None, :].expand(b, q, t), causal[None].expand(b, q, q) &
                                 new_valid[:, None, :]], dim=-1)
            allowed[:, :, t:] |= torch.eye(q, dtype=torch.bool, device=self.device)[None]  # never fully blocked
            mask = to_float_mask(allowed, self.dtype)
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, **kv_cache(self.cache),
                           use_cache=True)
        if new_valid is None:
            new_valid = torch.ones((b, q), dtype=torch.bool, device=self.device)
        else:
            self.holes = self.holes or not bool(new_valid.all())
        self.key_valid = torch.cat([self.key_valid, new_valid], dim=1)
        hidden = out.last_hidden_state
        return self.lm_head(hidden[:, logits_from:]).float(), hidden

    def hide_tail(self, valid: torch.Tensor) -> None:
        """Set the visibility of the last ``valid.shape[1]`` cache entries (False: a hole)."""
        self.key_valid[:, -valid.shape[1]:] = valid
        self.holes = self.holes or not bool(valid.all())

    def crop(self, n: int) -> None:
        """Drop the last ``n`` cache entries (a draft forward is never committed)."""
        if n > 0:
            self.cache.crop(-n)
            self.key_valid = self.key_valid[:, :-n]

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only rows where ``mask`` is True (finished rows stop costing compute)."""
        if bool(mask.all()):
            return
        idx = torch.nonzero(mask).flatten()
        self.cache.batch_select_indices(idx)
        for name in ("rows", "key_valid", "pending", "h_anchor", "next_pos"):
            setattr(self, name, getattr(self, name)[idx])

    def extend(self, other: "DecodeBatch") -> None:
        """Append the rows of ``other`` (a batch prefilled since; its row ids must be new): the
        shorter cache is left-padded with hidden entries, so every row keeps its own positions and
        mask and decodes as it would alone. A running batch takes new rows between forwards."""
        if self.size == 0:
            for name in ("rows", "cache", "key_valid", "holes", "pending", "h_anchor", "next_pos"):
                setattr(self, name, getattr(other, name))
            return
        t_self, t_other = self.key_valid.shape[1], other.key_valid.shape[1]
        t = max(t_self, t_other)

        def left_pad(x: torch.Tensor, width: int, dim: int, value=0) -> torch.Tensor:
            if width == 0:
                return x
            shape = list(x.shape)
            shape[dim] = width
            return torch.cat([torch.full(shape, value, dtype=x.dtype, device=x.device), x], dim=dim)

        layers = [{name: torch.cat([left_pad(getattr(mine, name), t - t_self, 2),
                                    left_pad(getattr(theirs, name), t - t_other, 2)], dim=0) for name in ("keys", "values")}
                  for mine, theirs in zip(self.cache.layers, other.cache.layers)]
        key_valid = torch.cat([left_pad(self.key_valid, t - t_self, 1, False),
                               left_pad(other.key_valid, t - t_other, 1, False)], dim=0)
        rest = {name: torch.cat([getattr(self, name), getattr(other, name)], dim=0)
                for name in ("rows", "pending", "h_anchor", "next_pos")}
        for layer, new in zip(self.cache.layers, layers):  # nothing is assigned until everything is built
            layer.keys, layer.values = new["keys"], new["values"]
        self.key_valid = key_valid
        self.holes = self.holes or other.holes or t_self != t_other
        for name, v in rest.items():
            setattr(self, name, v)

    def compact(self) -> None:
        """Squeeze cache holes out (left-aligned padding) once they dominate the cache."""
        t = self.key_valid.shape[1]
        if self.size == 0 or t < COMPACT_MIN or not self.holes:
            return
        counts = self.key_valid.sum(-1)
        width = int(counts.max())
        if width * 2 > t:
            return
        # stable order: invalid entries first, then valid ones in their original order
        order = torch.argsort(self.key_valid.long() * (t + 1) + torch.arange(t, device=self.device), dim=-1)
        idx = order[:, t - width:]
        for layer in self.cache.layers:
            g = idx[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = torch.gather(layer.keys, 2, g)
            layer.values = torch.gather(layer.values, 2, g)
        self.key_valid = torch.gather(self.key_valid, 1, idx)
