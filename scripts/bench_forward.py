"""The cost of one decoding forward against the number of new tokens it carries.

FLUID's speedup over AR is roughly TPF divided by the cost of its verify-plus-draft window
relative to a one-token AR forward, so this curve is what block length (``decode.k_max``), lane
length (``decode.lane_len``) and ``decode.token_budget`` should be picked from.

    python scripts/bench_forward.py --checkpoint outputs/cache/smollm2-135m-instruct
    python scripts/bench_forward.py --checkpoint DIR --batch 1 16 --tokens 1 4 8 12 17 --cache 200

Prints a table (median and fastest ms per forward, cost relative to one token at that batch
size) and writes it as JSON (``--out``). Time one thing at a time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def measure(model, batch: int, cache: int, tokens: int, repeats: int, vocab: int) -> list[float]:
    """Seconds of ``repeats`` forwards of ``tokens`` new tokens per row over a ``cache``-token KV cache
    (the measurement ``decode.window=cost`` sizes its windows by: fluid/decoding/cost.py)."""
    from fluid.decoding.cost import time_forwards

    return time_forwards(model, batch, cache, tokens, repeats, vocab)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a FLUID or plain HF model directory")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 12, 17, 24, 32])
    ap.add_argument("--cache", type=int, default=200, help="tokens already in the KV cache")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="outputs/bench/forward_cost.json")
    args = ap.parse_args(argv)
    if min(args.batch) < 1 or min(args.tokens) < 1 or args.cache < 1 or args.repeats < 1:
        ap.error("--batch, --tokens, --cache and --repeats must be positive")

    from fluid.checkpoint import load_fluid
    from fluid.validate import resolve_device, torch_dtype

    fm = load_fluid(args.checkpoint, device=resolve_device(args.device), dtype=torch_dtype(args.dtype))
    vocab = min(fm.model.get_input_embeddings().num_embeddings, len(fm.tokenizer))
    measure(fm.model, 1, args.cache, 1, 2, vocab)  # warm-up: first forwards allocate and pick kernels
    rows = []
    for b in args.batch:
        base = None
        for q in args.tokens:
            ts = measure(fm.model, b, args.cache, q, args.repeats, vocab)
            med = statistics.median(ts)
            base = med if base is None or q == 1 else base
            rows.append({"batch": b, "tokens": q, "median_ms": 1e3 * med, "min_ms": 1e3 * min(ts),
                         "relative": med / base})
    print(f"forward cost: {args.checkpoint} ({fm.model.device}, {args.dtype}, {torch.get_num_threads()} threads), "
          f"cache {args.cache} tokens")
    print(f"{'batch':>5} {'tokens':>6} {'median ms':>10} {'min ms':>8} {'x first':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['tokens']:>6} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f} {r['relative']:>8.2f}")
    result = {"checkpoint": str(Path(args.checkpoint).resolve()), "device": str(fm.model.device),
              "dtype": args.dtype, "threads": torch.get_num_threads(), "cache": args.cache, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return result


if __name__ == "__main__":
    main()
