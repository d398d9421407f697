#!/usr/bin/env python
"""Training-step benchmark for stage 1 (and stage 2 once it exists): tokens/s and peak memory.

Cases, all on the same expanded batch and the same model, trained as stage 1 trains the
embedded backbone (``--finetune``: full fine-tuning by default, as the composed stage-1
recipe says; ``--finetune lora`` for LoRA r=16 as on the real backbones):
  (a) dense   : our lane expansion + a 4-D float mask in the model dtype (SDPA)
  (b) flex    : our lane expansion + a flex-attention BlockMask (CUDA only)
  (c) ref     : reference-style: a full float32 (B,1,L,L) mask with -inf built per batch
                by Python loops over the rows (as the published code does)
  (d) causal  : a plain causal step over a sequence of the same expanded length
  (e) khead   : a stage-2 step on the same input batch: full-length lanes, frozen no-grad
                backbone forward, K* targets, K-head update (its own expansion, as stage 2 does),
                with the module's default frozen forward for the device (``prefix`` on CPU:
                a causal forward, then each lane over its row's KV cache; ``expanded`` on CUDA)
  (f) khead_expanded : the same step with the frozen forward over the expanded batch
  (g) two_pass : exact mode's training step (``--finetune exact``: LoRA gated to MASK slots,
                ``lora.scope=lanes``): the main tokens in a no-grad forward, then the slots after
                their cache (``two_pass_lane_losses``); ``dense`` is then the same model's expanded step

``--backbone NAME`` takes a configured backbone (conf/backbone/NAME.yaml, its weights and
tokenizer) instead of the scratch Llama, on synthetic rows of ``--seq-len`` tokens.

Each case runs in its own process, forked from a server that imported torch and the model code,
so that peak memory is its own (CUDA: max allocated; CPU: peak RSS growth over the loaded model,
from the forked process's own high-water mark: a spawned process inherited the parent's, which
could hide a small case's growth). Prints a table, writes JSON.

  python scripts/bench_train.py --out outputs/bench/train.json
  python scripts/bench_train.py --out bench.json --device cuda --seq-len 1000 --batch-size 2
  python scripts/bench_train.py --out outputs/bench/train_exact.json --backbone smollm2_135m --finetune exact \
      --seq-len 280 --batch-size 2 --max-expanded-len 512 --cases dense,two_pass
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = ["dense", "flex", "ref", "causal", "khead", "khead_expanded", "two_pass"]
# what run_case imports, loaded once by the process server that forks the cases
CASE_MODULES = ["transformers", "fluid.backbones.spec", "fluid.data.sft", "fluid.lanes", "fluid.modules.lora",
                "fluid.khead.frozen", "fluid.modules.hybrid", "fluid.modules.khead"]


def build(args):
    from fluid.backbones.spec import BackboneSpec
    from fluid.backbones.tokens import noise_token_ids, resolve_mask_token
    from fluid.data.arith import ArithTask
    from fluid.data.sft import SFTDataset, collate_sft
    from fluid.data.tokenizer import build_arith_tokenizer
    from fluid.lanes import FluidSchedule, expand_lanes
    from fluid.lanes.attention import FLEX_BLOCK_SIZE
    from fluid.modules.lora import LoraSettings, apply_lora
    from fluid.nn import IGNORE

    torch.manual_seed(0)
    from fluid.config import default_path

    if args.backbone:
        from fluid.utils.compose import compose

        spec = BackboneSpec.from_config(compose("train", [f"backbone={args.backbone}"]).backbone)
        if args.dtype != "auto":
            spec.dtype = args.dtype
        tok = spec.load_tokenizer()
        model = spec.build_model().to(args.device)
    else:
        tok = build_arith_tokenizer(default_path("cache_dir"))
        scratch = dict(model_type="llama", hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                       num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 48),
                       max_position_embeddings=max(4096, 2 * args.seq_len), tie_word_embeddings=True)
        spec = BackboneSpec(name="bench", scratch=scratch, dtype=args.dtype, mask_token="<|mask|>")
        model = spec.build_model(from_scratch=True, vocab_size=len(tok)).to(args.device)
    mask_id, _ = resolve_mask_token(tok, model, spec.mask_token)
    vocab = model.get_input_embeddings().weight.shape[0]
    if args.finetune != "full":
        model = apply_lora(model, LoraSettings(scope="lanes" if args.finetune == "exact" else "all"), [mask_id])
    if args.seq_len:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, min(len(tok), vocab) - 1, (args.batch_size, args.seq_len), generator=g)
        labels = torch.full_like(ids, IGNORE)
        prompt = args.seq_len // 5
        labels[:, prompt - 1: -1] = ids[:, prompt:]
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    else:
        ds = SFTDataset(ArithTask(seed=0).examples("train", args.batch_size), tok, 512)
        batch = collate_sft([ds[i] for i in range(args.batch_size)], tok.pad_token_id)
    lb = expand_lanes(batch["input_ids"], batch["labels"], batch["attention_mask"], FluidSchedule(),
                      mask_token_id=mask_id, noise_token_ids=noise_token_ids(tok, vocab),
                      pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                      max_expanded_len=args.max_expanded_len or None,
                      pad_to_multiple=FLEX_BLOCK_SIZE if args.device == "cuda" else 1)  # whole flex tiles
    return model, lb.to(args.device), batch, mask_id, tok.pad_token_id


def default_finetune() -> str:
    """The embedded pipeline's stage-1 setting (its recipe experiment=tiny_stage1: stage.module.lora.enabled)."""
    from fluid.utils.compose import compose

    return "lora" if compose("train", ["experiment=tiny_stage1"]).stage.module.lora.enabled else "full"


def reference_mask(lb) -> torch.Tensor:
    """Published-code style: float32 -inf mask, filled entry by entry per row and lane."""
    b, n = lb.input_ids.shape
    mask = torch.full((b, 1, n, n), float("-inf"), dtype=torch.float32)
    is_main, lane, valid = lb.is_main.cpu().tolist(), lb.lane.cpu().tolist(), lb.valid.cpu().tolist()
    for r in range(b):
        mains = [k for k in range(n) if is_main[r][k]]
        for q in range(n):
            if not valid[r][q]:
                mask[r, 0, q, q] = 0.0
                continue
            for k in mains:
                if k > q:
                    break
                mask[r, 0, q, k] = 0.0
            if not is_main[r][q]:
                k = q
                while k >= 0 and lane[r][k] == lane[r][q]:
                    mask[r, 0, q, k] = 0.0
                    k -= 1
    return mask.to(lb.input_ids.device)


def khead_setup(model, batch, mask_id, pad_id, horizon=16):
    """Stage 2 on the same input batch: its own (full-lane) expansion and a fresh head."""
    from fluid.khead import KHead
    from fluid.lanes import FullLanes, expand_lanes
    from fluid.modules.khead import NO_NOISE

    lb = expand_lanes(batch["input_ids"], batch["labels"], batch["attention_mask"], FullLanes(0.5, horizon),
                      mask_token_id=mask_id, noise_token_ids=NO_NOISE, pad_token_id=pad_id,
                      generator=torch.Generator().manual_seed(0))
    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model  # stage 2 loads a merged model
    base.requires_grad_(False)
    head = KHead(base.config.hidden_size, horizon).to(next(base.parameters()).device)
    return base, head, lb


def khead_step(base, head, opt, lb, batch, mask_id, lane_forward, tau=2.8):
    """One KHeadModule step after expansion: the frozen forward (no grad), K*, a head update."""
    from fluid.khead import k_star, kl_to_soft_labels, soft_labels
    from fluid.khead.frozen import expanded_lane_losses, prefix_lane_losses

    if lane_forward == "prefix":
        hidden, losses, valid = prefix_lane_losses(base, batch["input_ids"], batch["attention_mask"], lb,
                                                   head.horizon, mask_id)
    else:
        hidden, losses, valid = expanded_lane_losses(base, lb, head.horizon)
    kstar = k_star(losses, valid, tau)
    loss = kl_to_soft_labels(head(hidden), soft_labels(kstar, head.horizon))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def step(model, opt, case, lb, pad_id):
    from fluid.lanes.attention import block_mask, dense_float_mask
    from fluid.modules.hybrid import combine, lane_losses, two_pass_lane_losses

    dtype = next(model.parameters()).dtype
    if case == "two_pass":
        parts = two_pass_lane_losses(model, lb, pad_id)
    elif case == "causal":
        pos = torch.arange(lb.length, device=lb.input_ids.device).expand_as(lb.input_ids)
        parts = lane_losses(model(input_ids=lb.input_ids, position_ids=pos, use_cache=False).logits, lb)
    else:
        if case == "dense":
            mask = dense_float_mask(lb, dtype)
        elif case == "flex":
            mask = block_mask(lb)
        else:
            mask = reference_mask(lb)
        logits = model(input_ids=lb.input_ids, attention_mask=mask, position_ids=lb.position_ids,
                       use_cache=False).logits
        parts = lane_losses(logits, lb)
    loss = combine(parts)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def skip_reason(case, args) -> str | None:
    """Why ``case`` cannot run with ``args`` (decided before a process is started for it)."""
    if case == "flex" and args.device != "cuda":
        return "flex attention training needs CUDA"
    if case == "two_pass" and args.finetune != "exact":
        return "the two-pass step is exact mode's (--finetune exact)"
    return None


def run_case(case, args, queue):
    try:
        torch.set_num_threads(args.threads)
        model, lb, batch, mask_id, pad_id = build(args)
        if case.startswith("khead"):
            from fluid.khead.frozen import resolve_lane_forward

            model, head, lb = khead_setup(model, batch, mask_id, pad_id)
            lb = lb.to(args.device)
            batch = {k: v.to(args.device) for k, v in batch.items()}
            opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
            how = "expanded" if case == "khead_expanded" else resolve_lane_forward("auto", args.device)
            run = lambda: khead_step(model, head, opt, lb, batch, mask_id, how)  # noqa: E731
        if case == "flex":
            model.config._attn_implementation = "flex_attention"
        if not case.startswith("khead"):
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            run = lambda: step(model, opt, case, lb, pad_id)  # noqa: E731
        first_loss = None  # the loss before any update: every case of one model and batch must agree
        for _ in range(args.warmup):
            first_loss = run() if first_loss is None else (run(), first_loss)[1]
        cuda = args.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            loss = run()
            first_loss = loss if first_loss is None else first_loss
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        t_med = sorted(times)[len(times) // 2]
        tokens = int(lb.valid.sum())
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else \
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
        queue.put({"case": case, "first_loss": first_loss,
                   "step_s": t_med, "tokens_per_s": tokens / t_med, "peak_mem_mb": peak / 2**20,
                   "expanded_len": lb.length, "tokens": tokens, "peak_kind": "cuda_max_allocated" if cuda else
                   "cpu_rss_growth"})
    except Exception as e:  # noqa: BLE001 - reported in the table
        queue.put({"case": case, "error": f"{type(e).__name__}: {e}"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=0, help="synthetic rows of this length (0: arith examples)")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--finetune", choices=["full", "lora", "exact"], default=default_finetune(),
                   help="how stage 1 trains (default: the embedded backbone's stage-1 setting; exact: LoRA "
                        "gated to MASK slots, lora.scope=lanes)")
    p.add_argument("--backbone", default="", help="a configured backbone (conf/backbone) instead of the scratch Llama")
    p.add_argument("--max-expanded-len", type=int, default=0, help="per-row lane budget (0: none)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cases", default=",".join(CASES))
    args = p.parse_args(argv)

    # each case in its own process (its own peak memory), forked from a server that has imported
    # torch and the model code once: a spawned process per case re-imported them (seconds each)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *CASE_MODULES])
    results = {}
    for case in args.cases.split(","):
        if skip_reason(case, args):
            results[case] = {"case": case, "skipped": skip_reason(case, args)}
            continue
        q = ctx.Queue()
        proc = ctx.Process(target=run_case, args=(case, args, q))
        proc.start()
        proc.join()
        results[case] = q.get() if not q.empty() else {"case": case, "error": f"exit code {proc.exitcode}"}
    ok = {k: v for k, v in results.items() if "tokens_per_s" in v}
    summary = {}
    if "dense" in ok and "causal" in ok:
        summary["lane_overhead_dense_vs_causal"] = ok["causal"]["tokens_per_s"] / ok["dense"]["tokens_per_s"]
    if "dense" in ok and "ref" in ok:
        summary["dense_speedup_vs_ref"] = ok["dense"]["tokens_per_s"] / ok["ref"]["tokens_per_s"]
    if "khead" in ok and "dense" in ok:
        summary["stage2_vs_stage1_step_time"] = ok["khead"]["step_s"] / ok["dense"]["step_s"]
    if "khead_expanded" in ok and "dense" in ok:
        summary["stage2_expanded_vs_stage1_step_time"] = ok["khead_expanded"]["step_s"] / ok["dense"]["step_s"]
    if "two_pass" in ok and "dense" in ok:
        summary["two_pass_speedup_vs_dense"] = ok["dense"]["step_s"] / ok["two_pass"]["step_s"]
    if "flex" in ok and "ref" in ok:
        summary["flex_speedup_vs_ref"] = ok["flex"]["tokens_per_s"] / ok["ref"]["tokens_per_s"]
        summary["flex_mem_ratio_vs_ref"] = ok["flex"]["peak_mem_mb"] / max(1e-9, ok["ref"]["peak_mem_mb"])
    report = {"config": vars(args), "torch": torch.__version__, "cases": results, "summary": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{'case':8} {'expanded L':>10} {'step (s)':>9} {'tokens/s':>10} {'peak MB':>9}")
    for case, r in results.items():
        if "tokens_per_s" in r:
            print(f"{case:8} {r['expanded_len']:>10} {r['step_s']:>9.3f} {r['tokens_per_s']:>10.0f} "
                  f"{r['peak_mem_mb']:>9.1f}")
        else:
            print(f"{case:8} {r.get('skipped') or r.get('error')}")
    for k, v in summary.items():
        print(f"{k}: {v:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
