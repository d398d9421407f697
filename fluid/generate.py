"""``python -m fluid.generate``: decode prompts with a FLUID model and print a stats table."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fluid.config import CONF_DIR, register_resolvers
from fluid.decoding.config import register_decode_config
from fluid.utils.errors import FluidConfigError, one_line_errors

register_resolvers()
register_decode_config()


def read_prompts(cfg: DictConfig) -> list:
    prompts = list(cfg.prompts or [])
    if cfg.prompt_file:
        f = Path(cfg.prompt_file)
        if not f.exists():
            raise FluidConfigError("prompt_file", f"{str(f)!r} does not exist")
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FluidConfigError("prompt_file", f"{f}:{n} is not valid JSON ({e.msg})") from None
                prompt = row.get("messages") or row.get("prompt") or row.get("question") if isinstance(row, dict) else None
                if not prompt:
                    raise FluidConfigError("prompt_file", f"{f}:{n} has no 'prompt', 'question' or 'messages'")
                prompts.append(prompt)
        else:
            prompts += [ln for ln in f.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise FluidConfigError("prompts", "no prompts given", "pass prompts='[\"...\"]' or prompt_file=FILE")
    return prompts


def prompt_text(tok, prompt, chat: bool) -> str:
    """The text a prompt (a string or chat messages) becomes: with ``chat``, the tokenizer's chat
    template with the assistant turn opened (a trailing assistant message is dropped)."""
    if isinstance(prompt, str) and not chat:
        return prompt
    if not getattr(tok, "chat_template", None):
        raise FluidConfigError("chat", "the tokenizer has no chat template", "turn the chat template off (chat=false)")
    msgs = prompt if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
    if msgs and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    return tok.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True)


def encode(tok, prompt, chat: bool) -> list[int]:
    return tok(prompt_text(tok, prompt, chat), add_special_tokens=False)["input_ids"]


def run(cfg: DictConfig) -> dict:
    from fluid.decoding.setup import build_decoder, decode_config
    from fluid.validate import validate_generate

    validate_generate(cfg)  # what can be checked before a model is loaded
    dcfg = decode_config(OmegaConf.to_container(cfg.decode, resolve=True))
    prompts = read_prompts(cfg)
    fm, dec = build_decoder(cfg.checkpoint, dcfg, device=cfg.device, dtype=cfg.dtype, mask_token_id=cfg.mask_token_id,
                            stop_strings=list(cfg.stop_strings))
    ids = [encode(fm.tokenizer, p, cfg.chat) for p in prompts]
    dec.calibrate([min(dcfg.batch_size, len(ids))])  # window=cost: the forward-cost curve, not in the timing
    out = dec.generate(ids)
    rows = []
    for p, text, st in zip(prompts, out["texts"], out["rows"]):
        rows.append({"prompt": p, "completion": text, "tokens": len(st.tokens), "nfe": st.nfe,
                     "tpf": len(st.tokens) / max(1, st.nfe), "accepted": st.accepted, "horizons": st.horizons,
                     "finished": st.finished})
    for i, r in enumerate(rows):
        print(f"--- [{i}] {r['prompt'] if isinstance(r['prompt'], str) else r['prompt'][-1]['content']}")
        print(r["completion"])
    print(f"\n{'#':>3} {'tokens':>7} {'NFE':>5} {'TPF':>6} {'mean acc.':>9} {'finished':>15}")
    for i, r in enumerate(rows):
        mean_acc = sum(r["accepted"]) / max(1, len(r["accepted"]))
        print(f"{i:>3} {r['tokens']:>7} {r['nfe']:>5} {r['tpf']:>6.2f} {mean_acc:>9.2f} {r['finished']:>15}")
    print(f"total: {out['generated_tokens']} tokens, TPF {out['tpf']:.2f}, {out['tokens_per_s']:.1f} tokens/s, "
          f"{out['wall_time_s']:.2f} s ({dcfg.algorithm}, "
          + (f"window=cost, ngram={dcfg.ngram}" if dcfg.window == "cost" else f"horizon={dcfg.horizon}")
          + f", verify={dcfg.verify})"
          + (" [compile: the time includes compiling]" if dcfg.compile else ""))
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.output, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return {"rows": rows, "tpf": out["tpf"], "tokens_per_s": out["tokens_per_s"]}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
@one_line_errors
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    from fluid.config import run_entry_point

    run_entry_point("generate", _hydra_main)


if __name__ == "__main__":
    main()
