"""Every setting of an evaluation decodes the same prompts in interleaved rounds, so that a slow
spell of a shared machine hits every setting alike (``fluid.evaluate``'s timing)."""

from __future__ import annotations

from dataclasses import asdict

from fluid.decoding.config import DecodeConfig


def decode_all(dec, ids, settings: dict[str, DecodeConfig], repeats: int, progress: bool,
               interleave: int | None = None, stop=None) -> dict[str, dict]:
    """Every setting's outputs on ``ids``, timed fairly on a machine whose speed drifts.

    ``interleave`` (prompts per round, rounded up to a multiple of the batch size; None or 0: all
    of them): the prompts are decoded round by round, every setting decoding each round's prompts
    in turn (the order rotating), so a slow spell of a shared machine lasting seconds hits every
    setting alike instead of whichever ran then. Batches are the same as in one pass. With
    ``repeats`` > 1 each round runs every setting that many times and its fastest run counts;
    decoding is deterministic, so the tokens must agree. ``stop`` (a
    :class:`~fluid.utils.signals.GracefulStop`): after a signal the rounds end and the outputs
    cover the prompts decoded so far (the first ones, for every setting alike)."""
    from fluid.validate import check

    check("repeats", repeats)
    check("interleave", interleave)
    names = list(settings)
    bs = max(d.batch_size for d in settings.values() if isinstance(d, DecodeConfig))
    chunk = max(1, len(ids)) if not interleave else -(-interleave // bs) * bs
    parts: dict[str, list[dict]] = {n: [] for n in names}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids) * len(names) * repeats, desc=f"decoding ({len(names)} settings)", unit="prompt",
                   dynamic_ncols=True)
    for k, start in enumerate(range(0, len(ids), chunk)):
        if stop is not None and stop.requested:
            break
        part, best = ids[start: start + chunk], {}
        for _ in range(repeats):
            for name in names[k % len(names):] + names[: k % len(names)]:
                s = settings[name]
                out = dec.generate(part, **fields_of(s)) if isinstance(s, DecodeConfig) else s.generate(part)
                if name in best and out["tokens"] != best[name]["tokens"]:
                    raise RuntimeError(f"{name}: two runs decoded different tokens (decoding must be deterministic)")
                if name not in best or out["wall_time_s"] < best[name]["wall_time_s"]:
                    best[name] = out
                if bar is not None:
                    bar.update(len(part))
        for name in names:
            parts[name].append(best[name])
    if bar is not None:
        bar.close()
    return {name: merge_outputs(parts[name]) for name in names}


def merge_outputs(parts: list[dict]) -> dict:
    """One ``FluidDecoder.generate`` result from those of consecutive prompt chunks."""
    out = {key: [x for p in parts for x in p[key]] for key in ("texts", "tokens", "rows")}
    wall, n_tok, nfe = (sum(p[k] for p in parts) for k in ("wall_time_s", "generated_tokens", "nfe"))
    return {**out, "wall_time_s": wall, "generated_tokens": n_tok, "nfe": nfe,
            "tokens_per_s": n_tok / wall if wall > 0 else float("nan"), "tpf": n_tok / max(1, nfe)}


def fields_of(dcfg: DecodeConfig) -> dict:
    return asdict(dcfg)
