"""Log-likelihoods under a model's plain causal forward (the AR head), batched.

:func:`loglikelihood` scores ``(context_ids, continuation_ids)`` pairs the way lm-eval's
Hugging Face model does (left-truncated to ``max_length`` model inputs, fp32 log-softmax,
greedy flag), :func:`loglikelihood_rolling` a whole document in disjoint rolling windows
(:func:`rolling_windows`). Token ids in, floats out: no lm-eval import, usable by any scorer.

Batching: requests are sorted by length (longest first), right-padded and run with explicit
``position_ids`` and no attention mask. Under the causal mask a real position only sees the
positions before it, all real, so the padding after it changes nothing; the LM head only runs
on the positions that predict a continuation token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fluid.nn import decoder_and_lm_head

Request = tuple[Sequence[int], Sequence[int]]


def _max_length(model, max_length: int | None) -> int | None:
    return max_length if max_length is not None else getattr(model.config, "max_position_embeddings", None)


def _prepare(req: Request, max_length: int | None, prefix_token_id: int | None) -> tuple[list[int], int]:
    """The model input of one request and its continuation length.

    The scored sequence is ``context + continuation``; the model reads all of it but the last
    token (so ``len(input) = len(context) + len(continuation) - 1``), left-truncated to the
    last ``max_length`` tokens as lm-eval does (the context loses its first tokens)."""
    ctx, cont = list(req[0]), list(req[1])
    if not ctx:
        if prefix_token_id is None:
            raise ValueError("an empty context needs prefix_token_id (the tokenizer's BOS, else EOS)")
        ctx = [prefix_token_id]
    if max_length is not None and len(cont) > max_length:
        raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length={max_length}")
    seq = ctx + cont
    if max_length is not None:
        seq = seq[-(max_length + 1):]
    return seq[:-1], len(cont)


@torch.inference_mode()
def loglikelihood(model, requests: Sequence[Request], batch_size: int = 16, max_length: int | None = None,
                  prefix_token_id: int | None = None, progress: bool = False) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), greedy)`` for each ``(context_ids, continuation_ids)``,
    in input order. ``greedy``: the argmax equals the continuation at every position.

    ``max_length`` (default ``model.config.max_position_embeddings``) caps the model input;
    ``prefix_token_id`` is the context of a request whose context is empty (lm-eval: BOS, else EOS).
    An empty continuation scores ``(0.0, True)``."""
    max_length = _max_length(model, max_length)
    prepared = [_prepare(r, max_length, prefix_token_id) for r in requests]
    results: list[tuple[float, bool] | None] = [None] * len(prepared)
    todo = [i for i, (_, n) in enumerate(prepared) if n > 0]
    for i, (_, n) in enumerate(prepared):
        if n == 0:
            results[i] = (0.0, True)
    todo.sort(key=lambda i: -len(prepared[i][0]))
    body, head = decoder_and_lm_head(model)
    device = next(model.parameters()).device
    starts = range(0, len(todo), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="loglikelihood batches")
    for start in starts:
        rows = todo[start: start + batch_size]
        width = len(prepared[rows[0]][0])
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            inp = prepared[i][0]
            ids[r, : len(inp)] = torch.tensor(inp)
        pos = torch.arange(width).expand(len(rows), width)
        hidden = body(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False).last_hidden_state
        # the last n inputs of row r predict its n continuation tokens
        row_idx, pos_idx, targets, counts = [], [], [], []
        for r, i in enumerate(rows):
            inp, n = prepared[i]
            row_idx += [r] * n
            pos_idx += range(len(inp) - n, len(inp))
            targets += list(requests[i][1])
            counts.append(n)
        h = hidden[torch.tensor(row_idx, device=device), torch.tensor(pos_idx, device=device)]
        logp = torch.log_softmax(head(h).float(), dim=-1)
        tgt = torch.tensor(targets, device=device)
        tok_lp = logp.gather(-1, tgt[:, None])[:, 0].cpu()
        hit = (logp.argmax(-1) == tgt).cpu()
        for i, lp, ok in zip(rows, tok_lp.split(counts), hit.split(counts)):
            results[i] = (float(lp.sum()), bool(ok.all()))
    return results  # type: ignore[return-value]


def rolling_windows(token_ids: Sequence[int], prefix_token_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, continuation)`` windows that score every token of ``token_ids`` once.

    With ``S = [prefix] + token_ids``, the tokens are cut into chunks of ``max_length``; the chunk
    ``token_ids[p:e]`` is predicted from as many tokens before it as fit: context
    ``S[max(0, e - max_length) : p + 1]``, so each window is at most ``max_length + 1`` tokens
    (a model input of ``max_length``). The first window's context is ``[prefix]``; the last one
    gets a full context even when its chunk is short. The same windows as lm-eval's
    ``make_disjoint_window(get_rolling_token_windows(..., context_len=1))``."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    seq = [prefix_token_id] + list(token_ids)
    out = []
    for p in range(0, len(token_ids), max_length):
        e = min(p + max_length, len(token_ids))
        out.append((seq[max(0, e - max_length): p + 1], seq[p + 1: e + 1]))
    return out


def loglikelihood_rolling(model, token_ids: Sequence[int], prefix_token_id: int, max_length: int,
                          batch_size: int = 16) -> float:
    """The log-likelihood of a whole document ``token_ids`` conditioned on ``prefix_token_id``
    (perplexity tasks), summed over :func:`rolling_windows`."""
    windows = rolling_windows(token_ids, prefix_token_id, max_length)
    return sum(lp for lp, _ in loglikelihood(model, windows, batch_size=batch_size, max_length=max_length))
