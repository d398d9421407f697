"""``python -m fluid.evaluate benchmark=NAME checkpoint=DIR [limit=N]``: accuracy and speed of
AR greedy and FLUID decoding side by side, on the same model, prompts and batching.

Writes to the run directory (``hydra.run.dir``): ``metrics.json`` (flat keys ``ar/...``,
``fluid/...`` and one prefix per further decoder setting), ``samples.jsonl`` (prompt, reference,
every setting's output, correctness and TPF), ``results.md`` (the table), ``speed_accuracy.png``
and ``config.yaml``; with ``logger=wandb`` the same to W&B (offline by default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from fluid.config import CONF_DIR, register_resolvers, run_entry_point
from fluid.decoding.config import DecodeConfig, register_decode_config
from fluid.decoding.setup import build_decoder, decode_config
from fluid.eval.records import sample_records, sample_table
from fluid.eval.rounds import decode_all, fields_of
from fluid.eval.settings import decoder_settings
from fluid.utils.errors import FluidConfigError, one_line_errors
from fluid.utils.signals import GracefulStop, Terminated

log = logging.getLogger("fluid.evaluate")
register_resolvers()
register_decode_config()


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(name: str, out: dict, correct: list[bool], ar: dict | None) -> dict[str, Any]:
    """The flat ``<name>/...`` metrics of one decoding run (``ar``: the AR run it is compared with)."""
    from fluid.eval.reference import identical_fraction

    rows = out["rows"]
    m = {"accuracy": sum(correct) / len(correct), "tpf": out["tpf"], "tokens_per_s": out["tokens_per_s"],
         "wall_time_s": out["wall_time_s"], "generated_tokens": out["generated_tokens"], "nfe": out["nfe"],
         "mean_accepted": _mean([n for r in rows for n in r.accepted]),
         "mean_horizon": _mean([h for r in rows for h in r.horizons])}
    if ar is not None:
        m["speedup_vs_ar"] = out["tokens_per_s"] / ar["tokens_per_s"]
        m["identical_to_ar"] = identical_fraction(out["tokens"], ar["tokens"])
    return {f"{name}/{k}": v for k, v in m.items()}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    from fluid.utils.runinfo import git_revision, write_json

    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    write_json(run_dir / "git.json", git_revision(Path(__file__).parent))
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"status": "failed", "benchmark": cfg.benchmark.name}
    write_json(run_dir / "metrics.json", {"status": "running", "pid": os.getpid()})  # a kill -9 leaves this
    try:
        with GracefulStop() as stop:  # SIGTERM / SIGINT: the round in flight ends, what was measured is written
            _evaluate(cfg, run_dir, metrics, stop)  # fills ``metrics`` as it goes: a failure keeps what was measured
        metrics["status"] = "terminated" if stop.requested else "completed"
        if stop.requested:
            metrics["error"] = f"{Terminated(stop.signum)}: stopped after {metrics.get('n_decoded')} samples"
            metrics["exit_code"] = Terminated(stop.signum).exit_code
    except Terminated as e:
        metrics.update({"status": "terminated", "error": str(e), "exit_code": e.exit_code})
    except BaseException as e:
        metrics["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        metrics["wall_time_s"] = time.perf_counter() - t0
        metrics["run_dir"] = str(run_dir.resolve())
        write_json(run_dir / "metrics.json", metrics)
    return metrics


def _evaluate(cfg: DictConfig, run_dir: Path, metrics: dict[str, Any], stop: GracefulStop | None = None) -> None:
    from fluid.checkpoint import load_fluid
    from fluid.eval import report
    from fluid.utils.build import build, instantiate_dict
    from fluid.utils.runinfo import write_json, write_jsonl
    from fluid.validate import resolve_device, torch_dtype, validate_evaluate

    validate_evaluate(cfg)
    dtype, device = torch_dtype(cfg.dtype), resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    bench = build(cfg.benchmark)
    base = decode_config(OmegaConf.to_container(cfg.decode, resolve=True))
    if base.algorithm == "ar" or (base.algorithm == "published" and base.batch_size != 1):
        raise FluidConfigError("decode.algorithm", f"{base.algorithm!r}: the settings are compared with AR at the same "
                               "batching", "use fluid, or published with decode.batch_size=1 (it decodes one prompt "
                               "at a time)")
    samples = bench.samples(cfg.limit)
    fm = load_fluid(cfg.checkpoint, device=device, dtype=dtype)
    tok = fm.tokenizer
    settings = decoder_settings(cfg, base, fm.head is not None, fm.mask_token_id) if bench.mode == "generate" else {}
    loggers = instantiate_dict(cfg.get("logger"), "logger")
    ids = [bench.encode(s, tok) for s in samples]
    meta = {"checkpoint": str(Path(cfg.checkpoint).resolve()), "n_samples": len(samples), "mode": bench.mode,
            "device": str(fm.model.device), "dtype": cfg.dtype, "threads": torch.get_num_threads(),
            "batch_size": base.batch_size, "max_new_tokens": base.max_new_tokens}
    log.info("%s: %d samples, %s, checkpoint %s", bench.name, len(samples), bench.mode, cfg.checkpoint)
    metrics.update(meta)
    reference = None
    if cfg.get("reference"):  # checked before anything is decoded
        if bench.mode != "generate":
            raise FluidConfigError("reference", f"compares generated outputs; {bench.name} scores log-likelihoods")
        from fluid.eval.reference import load_reference

        reference = load_reference(cfg.reference, [s.id for s in samples],
                                   [tok.decode(x, skip_special_tokens=False) for x in ids])

    if bench.mode == "loglikelihood":
        records, names = _loglikelihood(bench, fm, samples, ids, base.batch_size, metrics, cfg.progress)
        x_label, x_key = "samples/s (log-likelihood scoring)", "samples_per_s"
    else:
        # the decoder's own settings are AR's (the `ar` row); every setting passes its fields per call,
        # checked against the checkpoint above (a stage-0 model has no K-head for the base's horizon)
        _, dec = build_decoder(cfg.checkpoint, replace(base, algorithm="ar"), stop_strings=list(bench.stop_strings), fm=fm)
        peers = _baselines(cfg, fm, base, bench, settings)
        for dcfg in settings.values():  # window=cost measures the model's forward-cost curve once, untimed
            dec.calibrate([base.batch_size], **fields_of(dcfg))
        if cfg.warmup:  # first forwards allocate and tune kernels: not in any timing
            for dcfg in [replace(base, algorithm="ar"), *settings.values()]:
                dec.generate(ids[: cfg.warmup], **fields_of(replace(dcfg, max_new_tokens=min(16, dcfg.max_new_tokens))))
            for peer in peers.values():
                peer.generate(ids[: cfg.warmup], max_new_tokens=min(16, base.max_new_tokens))
        with stop.rounds() if stop is not None else contextlib.nullcontext():
            outs = decode_all(dec, ids, {"ar": replace(base, algorithm="ar"), **settings, **peers}, cfg.repeats,
                              cfg.progress, cfg.get("interleave"), stop=stop)
        metrics["n_decoded"] = n = len(outs["ar"]["tokens"])
        if n < len(ids):  # stopped by a signal: the prompts decoded so far, by every setting alike
            if n == 0:
                raise Terminated(stop.signum)
            samples, ids = samples[:n], ids[:n]
            if reference is not None:
                reference = reference[:n]
        write_jsonl(run_dir / "samples.jsonl", sample_records(samples, ids, tok, outs, None))  # kept if scoring fails
        correct = {name: bench.score(samples, out["texts"]) for name, out in outs.items()}
        for name, out in outs.items():
            metrics.update(summarise(name, out, correct[name], outs["ar"] if name != "ar" else None))
        if reference is not None:
            metrics.update(_compare_reference(fm, ids, outs, reference, base.batch_size, cfg.reference))
        records = sample_records(samples, ids, tok, outs, correct)
        names = list(outs)
        x_label, x_key = "tokens/s", "tokens_per_s"

    # what every evaluation writes
    write_jsonl(run_dir / "samples.jsonl", records)
    write_json(run_dir / "metrics.json", {"status": "scored", **metrics})
    title = f"{bench.name}: {len(samples)} samples, {Path(cfg.checkpoint).name} ({meta['device']})"
    points = [{"name": n, "x": metrics.get(f"{n}/{x_key}") or 0.0, "accuracy": metrics[f"{n}/accuracy"],
               "ar": n == "ar", "note": f"TPF {metrics[f'{n}/tpf']:.2f}" if f"{n}/tpf" in metrics else ""}
              for n in names]
    plot = report.speed_accuracy_plot(points, run_dir / "speed_accuracy.png", title, x_label=x_label)
    table = report.text_table(metrics, names)
    (run_dir / "results.md").write_text(f"# {title}\n\n{report.markdown_table(metrics, names)}\n\n"
                                        f"`python -m fluid.evaluate {' '.join(_overrides())}`\n")
    print(f"\n{title}\n{table}\n", flush=True)
    columns, rows = sample_table(records, names)
    report.log_to_loggers(loggers, OmegaConf.to_container(cfg, resolve=True), metrics, columns, rows, plot)


def _baselines(cfg: DictConfig, fm, base: DecodeConfig, bench, settings: dict) -> dict:
    """``baselines``: transformers' generate, greedy and prompt lookup, as rows beside the settings."""
    from fluid.checkpoint import load_fluid
    from fluid.eval.baselines import build_baselines

    names = list(cfg.get("baselines") or [])
    clash = sorted(set(names) & set(settings))
    if clash:
        raise FluidConfigError("baselines", f"{clash[0]!r} is also a setting name", "rename the setting")
    if names and cfg.get("baseline_checkpoint"):  # e.g. the original model, loaded as plain HF
        fm = load_fluid(cfg.baseline_checkpoint, device=fm.model.device, dtype=next(fm.model.parameters()).dtype)
    try:
        return build_baselines(names, fm.model, fm.tokenizer, base.max_new_tokens, base.batch_size,
                               list(bench.stop_strings), prompt_lookup=int(cfg.get("prompt_lookup_tokens") or 4))
    except ValueError as e:
        raise FluidConfigError("baselines", str(e)) from None


def _compare_reference(fm, ids, outs: dict, reference: list[list[int]], batch_size: int, ref_dir) -> dict:
    """``<name>/identical_to_reference`` per setting and ``reference/argmax_agreement`` (fluid/eval/reference.py)."""
    from fluid.backbones.tokens import pad_token_id
    from fluid.eval.reference import argmax_agreement, identical_fraction

    m: dict[str, Any] = {"reference/run_dir": str(Path(ref_dir).resolve())}
    for name, out in outs.items():
        m[f"{name}/identical_to_reference"] = identical_fraction(out["tokens"], reference)
    matched, total = argmax_agreement(fm.model, ids, reference, batch_size=min(8, batch_size),
                                      pad_id=pad_token_id(fm.tokenizer))
    m.update({"reference/argmax_agreement": matched / max(1, total), "reference/positions": total})
    log.info("reference %s: argmax agreement %.4f over %d positions; identical %s", ref_dir, matched / max(1, total),
             total, {n: round(m[f"{n}/identical_to_reference"], 4) for n in outs})
    return m


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _loglikelihood(bench, fm, samples, ids, batch_size: int, metrics: dict, progress: bool):
    """Multiple choice by the AR head's log-likelihood of each answer letter (nothing decoded:
    FLUID's AR head is the model's own, so ``fluid/accuracy`` is the same number; there are no
    speed keys)."""
    from fluid.eval.likelihood import loglikelihood

    tok = fm.tokenizer
    requests = [bench.choice_request(s, tok, c) for s in samples for c in bench.continuations()]
    t0 = time.perf_counter()
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ll = loglikelihood(fm.model, requests, batch_size=batch_size, prefix_token_id=prefix, progress=progress)
    wall = time.perf_counter() - t0
    k = len(bench.continuations())
    records, correct = [], []
    for i, s in enumerate(samples):
        scores = [ll[i * k + j][0] for j in range(k)]
        choice = bench.choose(scores)
        correct.append(choice == s.reference)
        records.append({"id": s.id, "prompt": tok.decode(ids[i], skip_special_tokens=False), "reference": s.reference,
                        "ar": {"output": choice, "correct": correct[-1], "loglikelihoods": scores, "tpf": None}})
    acc = sum(correct) / len(correct)
    metrics.update({"ar/accuracy": acc, "ar/wall_time_s": wall, "ar/samples_per_s": len(samples) / wall,
                    "fluid/accuracy": acc})
    return records, ["ar"]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
@one_line_errors
def _hydra_main(cfg: DictConfig) -> None:
    m = evaluate(cfg)
    if m["status"] == "terminated":  # what was measured is written; the exit status says it is not complete
        print(f"terminated: {m['error']} (partial results in {m['run_dir']})", file=sys.stderr)
        sys.exit(m["exit_code"])


def main() -> None:
    run_entry_point("evaluate", _hydra_main)


if __name__ == "__main__":
    main()
