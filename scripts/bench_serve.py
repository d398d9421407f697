"""Serving benchmark: the FLUID server against the AR server on the same checkpoint.

Starts ``python -m fluid.serve`` twice as subprocesses on 127.0.0.1 (``decode.algorithm=fluid``
with the given decode settings, and ``decode.algorithm=ar``: plain greedy AR through the same
engine), drives each with the real ``openai`` client at each concurrency (streamed chat requests
on a fixed prompt set, every request bounded), interleaving the two servers in every round so that
the machine's drift hits both alike, then stops them. Prints a table and writes JSON: requests/s,
generated tokens/s, p50/p95 latency and time to first token, mean rows per forward and TPF (from
the servers' own /metrics), and the FLUID/AR ratio of tokens/s.

    python scripts/bench_serve.py --checkpoint outputs/demo/stage2/checkpoint --out outputs/bench/serve.json
    python scripts/bench_serve.py --concurrency 1 4 16 --requests 32 --rounds 2 --set decode.confidence=0.5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from fluid.serve.process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def arith_prompts(n: int) -> list[str]:
    """The embedded task's test questions (conf/data/arith.yaml), the demo's evaluation set."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fluid.config import CONF_DIR

    source = instantiate(OmegaConf.load(CONF_DIR / "data" / "arith.yaml").source)
    return [r["messages"][0]["content"] for r in source.examples("test")[:n]]


def read_prompts(spec: str, n: int) -> list[str]:
    if spec == "arith":
        return arith_prompts(n)
    path = Path(spec)
    if not path.exists():
        sys.exit(f"error: --prompts: {spec!r} is neither 'arith' nor a file")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = [json.loads(ln).get("prompt") or json.loads(ln).get("question") for ln in lines] if path.suffix == ".jsonl" \
        else lines
    return out[:n]


class Server(ServerProcess):
    def __init__(self, name: str, checkpoint: str, overrides: list[str], log_dir: Path, start_timeout: float):
        self.name = name
        try:
            super().__init__(checkpoint, [f"model_name={name}", *overrides], log_dir / f"server_{name}.log", start_timeout)
        except RuntimeError as e:
            sys.exit(f"error: the {name} server: {e}")


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    t1 = time.perf_counter()
    return {"latency": t1 - t0, "ttft": (first or t1) - t0, "tokens": tokens}


def drive(srv: Server, prompts: list[str], concurrency: int, n_requests: int, max_tokens: int, timeout: float) -> dict:
    """``n_requests`` streamed requests, ``concurrency`` at a time; the level's figures."""
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=timeout)
    before = srv.metrics()
    results, errors, lock = [], [], threading.Lock()
    todo = iter(range(n_requests))

    def worker():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                r = one_request(client, srv.name, prompts[i % len(prompts)], max_tokens)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - counted and reported, the level goes on
                with lock:
                    errors.append(repr(e)[:200])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = srv.metrics()

    def delta(k):
        return after.get(k, 0.0) - before.get(k, 0.0)

    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    tokens = sum(r["tokens"] for r in results)
    forwards = delta("fluid_forwards_total")
    return {"requests": len(results), "errors": len(errors), "error_examples": errors[:3], "wall_s": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": tokens / wall, "generated_tokens": tokens,
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "mean_rows_per_forward": delta("fluid_row_forwards_total") / forwards if forwards else float("nan"),
            "tpf": delta("fluid_generated_tokens_total") / max(1.0, delta("fluid_row_forwards_total")),
            "mean_latency_s": statistics.mean(lat) if lat else float("nan")}


def merge(levels: list[dict]) -> dict:
    """Rounds of one level and server: totals over the rounds, percentiles' mean."""
    wall = sum(r["wall_s"] for r in levels)
    out = {"requests": sum(r["requests"] for r in levels), "errors": sum(r["errors"] for r in levels), "wall_s": wall,
           "generated_tokens": sum(r["generated_tokens"] for r in levels)}
    out["requests_per_s"] = out["requests"] / wall
    out["tokens_per_s"] = out["generated_tokens"] / wall
    for k in ("latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s", "mean_rows_per_forward", "tpf"):
        out[k] = statistics.mean(r[k] for r in levels)
    out["rounds"] = levels
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "outputs" / "demo" / "stage2" / "checkpoint"))
    ap.add_argument("--prompts", default="arith", help="'arith' (the embedded task's test split) or a .txt/.jsonl file")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32, help="requests per level, server and round")
    ap.add_argument("--rounds", type=int, default=2, help="each round runs AR then FLUID (alternating first)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=120, help="seconds one request may take")
    ap.add_argument("--warmup", type=int, default=4, help="requests per server before the timed levels")
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a fluid.serve override for the FLUID server (e.g. decode.confidence=0.5)")
    ap.add_argument("--start-timeout", type=float, default=180)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "serve.json"))
    args = ap.parse_args(argv)
    if not Path(args.checkpoint).exists():
        sys.exit(f"error: --checkpoint: {args.checkpoint!r} does not exist (make demo writes outputs/demo/stage2/checkpoint)")
    if min(args.concurrency) < 1 or args.requests < 1 or args.rounds < 1:
        sys.exit("error: --concurrency, --requests and --rounds must be >= 1")
    prompts = read_prompts(args.prompts, args.n_prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    common = [f"max_rows={args.max_rows}", f"max_tokens={max(args.max_tokens, 16)}"]
    servers = {"ar": Server("ar", args.checkpoint, [*common, "decode.algorithm=ar"], out.parent, args.start_timeout)}
    try:
        servers["fluid"] = Server("fluid", args.checkpoint, [*common, *args.set], out.parent, args.start_timeout)
        for srv in servers.values():
            drive(srv, prompts, min(4, args.warmup), args.warmup, args.max_tokens, args.timeout)
        runs: dict = {name: {c: [] for c in args.concurrency} for name in servers}
        for rnd in range(args.rounds):
            for c in args.concurrency:
                order = ["ar", "fluid"] if (rnd + c) % 2 == 0 else ["fluid", "ar"]
                for name in order:
                    runs[name][c].append(drive(servers[name], prompts, c, args.requests, args.max_tokens, args.timeout))
                    r = runs[name][c][-1]
                    print(f"  round {rnd + 1} c={c:>2} {name:>5}: {r['tokens_per_s']:7.1f} tok/s, "
                          f"{r['requests']} ok / {r['errors']} errors", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    table = []
    for c in args.concurrency:
        ar, fl = merge(runs["ar"][c]), merge(runs["fluid"][c])
        table.append({"concurrency": c, "ar": ar, "fluid": fl, "speedup": fl["tokens_per_s"] / ar["tokens_per_s"]})
    import torch

    result = {"checkpoint": args.checkpoint, "prompts": args.prompts, "n_prompts": len(prompts),
              "requests_per_level": args.requests, "rounds": args.rounds, "max_tokens": args.max_tokens,
              "fluid_overrides": args.set, "max_rows": args.max_rows, "machine": f"{os.cpu_count()} CPUs",
              "torch_threads": torch.get_num_threads(), "levels": table}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'conc.':>5} {'server':>6} {'req/s':>7} {'tok/s':>8} {'p50 lat':>8} {'p95 lat':>8} {'p50 TTFT':>9} "
          f"{'p95 TTFT':>9} {'rows/fwd':>8} {'TPF':>5} {'errors':>6}")
    for row in table:
        for name in ("ar", "fluid"):
            r = row[name]
            print(f"{row['concurrency']:>5} {name:>6} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
                  f"{r['latency_p50_s']:>8.3f} {r['latency_p95_s']:>8.3f} {r['ttft_p50_s']:>9.3f} {r['ttft_p95_s']:>9.3f} "
                  f"{r['mean_rows_per_forward']:>8.2f} {r['tpf']:>5.2f} {r['errors']:>6}")
        print(f"{'':>5} {'FLUID / AR tokens/s':>24}: {row['speedup']:.2f}x")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
