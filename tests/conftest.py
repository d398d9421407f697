"""Shared fixtures: tiny models and tokenizers built locally, configs composed with Hydra's
compose API into tmp_path, everything on CPU in float32."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fluid.config import register_resolvers  # noqa: E402

register_resolvers()
ROOT = Path(__file__).resolve().parent.parent


def compose_cfg(overrides: list[str], out_dir: Path, cache_dir: Path | None = None):
    """Compose the real ``train`` config (fluid.utils.compose), with run outputs in ``out_dir``."""
    from omegaconf import open_dict

    from fluid.utils.compose import compose

    cfg = compose("train", overrides, hydra_runtime=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.output_root = str(out_dir / "outputs")
        if cache_dir is not None:
            cfg.paths.cache_dir = str(cache_dir)
    return cfg


def run_cli(module: str, argv: list[str], capsys=None, threads: int | None = None) -> tuple[int, str]:
    """``python -m fluid.<module> ARGV`` in this process: (exit status, stderr; "" without
    ``capsys``, where pytest keeps the output of a failing test). A test process has
    imported torch, transformers and Lightning once; a subprocess spends seconds on them again, so
    a subprocess is for what needs one (a signal, a kill, several ranks, the demo's own children).
    As a command in the repository root would: the working directory is the root; what the run
    changes in this process (argv, Hydra's global state, the root logger's handlers and level,
    torch's thread count: ``threads`` for this run) is put back afterwards."""
    import importlib
    import logging
    import sys

    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    mod = importlib.import_module(f"fluid.{module}")
    root = logging.getLogger()
    handlers, level, threads, cwd = root.handlers[:], root.level, torch.get_num_threads(), os.getcwd()
    old, sys.argv = sys.argv, [f"fluid.{module}", *argv]
    code = 0
    try:
        os.chdir(ROOT)
        if threads:
            torch.set_num_threads(threads)
        mod.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = old
        os.chdir(cwd)
        GlobalHydra.instance().clear()
        for h in root.handlers[:]:  # Hydra's console and train.log handlers, bound to this test's streams
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err if capsys is not None else ""


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fluid-cache")


@pytest.fixture(scope="session")
def arith_tokenizer(cache_dir):
    from fluid.data.tokenizer import build_arith_tokenizer

    return build_arith_tokenizer(cache_dir)


TINY_ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
}


def tiny_model(arch: str = "llama", vocab_size: int = 128, seed: int = 0, **kw):
    """A tiny random causal LM of the given architecture (fp32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, vocab_size=vocab_size)
    params.update({k: v for k, v in TINY_ARCHS[arch].items() if k != "model_type"})
    params.update(kw)
    config = AutoConfig.for_model(TINY_ARCHS[arch]["model_type"], **params)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, arith_tokenizer) -> Path:
    """A tiny random Llama + the arith tokenizer saved as a plain HF directory."""
    out = tmp_path_factory.mktemp("tiny-ckpt")
    model = tiny_model("llama", vocab_size=len(arith_tokenizer), tie_word_embeddings=True)
    model.save_pretrained(out)
    arith_tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- token-id helpers (no tokenizer)
# The tiny random models take raw ids: 0 is padding, 3 the MASK token, ids >= 4 ordinary tokens.
PAD_ID, MASK_ID = 0, 3
LANE_VOCAB = 128                      # lane-expansion and stage-2 tests
NOISE = torch.arange(4, LANE_VOCAB)   # noise tokens are never special
DECODE_VOCAB = 96                     # decoding tests


def random_prompts(n: int, vocab: int, seed: int = 0, lo: int = 2, hi: int = 15) -> list[list[int]]:
    """``n`` prompts of ordinary token ids (>= 4), of random lengths in ``[lo, hi)``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def make_batch(lengths=(20, 14, 9), prompt=(5, 3, 4), seed=0):
    """A right-padded SFT batch ``(input_ids, labels, attention_mask)``: row ``r`` has ``lengths[r]``
    tokens, the first ``prompt[r]`` of them the prompt (unsupervised)."""
    from fluid.nn import IGNORE

    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), PAD_ID)
    labels = torch.full((len(lengths), n), IGNORE)
    am = torch.zeros((len(lengths), n), dtype=torch.long)
    for r, (m, p) in enumerate(zip(lengths, prompt)):
        ids[r, :m] = torch.randint(4, LANE_VOCAB, (m,), generator=g)
        labels[r, p - 1: m - 1] = ids[r, p:m]
        am[r, :m] = 1
    return ids, labels, am


class Tok:
    """The few tokenizer attributes the decoder uses (ids only; texts are not needed)."""

    mask_token_id, pad_token_id = MASK_ID, PAD_ID

    def __init__(self, eos=None):
        self.eos_token_id = eos

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def constant_model(seed: int = 3, vocab_size: int = DECODE_VOCAB):
    """Every token (MASK included) embeds to the same vector: perfect drafts, whole blocks accepted."""
    model = tiny_model("llama", vocab_size=vocab_size, seed=seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb[5].expand_as(emb))
    return model


def ar_reference(model, prompts, max_new: int, eos: int | None = None) -> list[list[int]]:
    """Greedy AR continuations: what every lossless decoding must reproduce."""
    from fluid.decoding.ar import greedy_generate

    return greedy_generate(model, prompts, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=PAD_ID).tokens


def fluid_decoder(model, eos: int | None = None, seed: int = 0, **cfg):
    """A ``FluidDecoder`` over ``model`` with a random 16-class K-head (seeded) and ``DecodeConfig(**cfg)``."""
    from fluid.decoding import DecodeConfig, FluidDecoder
    from fluid.khead import KHead

    torch.manual_seed(seed)
    head = KHead(model.config.hidden_size, 16).to(next(model.parameters()).device)
    return FluidDecoder(model, Tok(eos), head=head, config=DecodeConfig(**cfg))


def hist_mean(counts) -> float:
    """The mean horizon of a histogram ``counts[k - 1]`` of horizons ``k = 1..K``."""
    return sum(k * c for k, c in enumerate(counts, start=1)) / sum(counts)


def assert_model_generate_is_fluid_and_greedy(ckpt, max_new_tokens: int = 12) -> None:
    """``from_pretrained(ckpt, trust_remote_code=True).generate`` (the exported ``custom_generate``)
    decodes with FLUID and returns transformers' greedy output on 3 left-padded prompts; a streamer
    gets the prompt, then exactly the new tokens in order; sampling falls back with a warning."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin
    from transformers.generation.streamers import BaseStreamer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, dtype=torch.float32).eval()
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in ("1 + 2 =", "12 + 30 + 7 = 4", "5 =")]
    width = max(len(e) for e in enc)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    # the reference: transformers' own greedy generate on a separately loaded plain copy
    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ref = GenerationMixin.generate(plain, ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens)
    assert model.__dict__.get("_fluid_decoders"), "model.generate did not decode with FLUID"
    assert torch.equal(out, ref), (out, ref)
    # after FLUID attached what it needs to the model, its plain forward is still the original
    assert torch.equal(GenerationMixin.generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                                do_sample=False), ref)

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    one = model.generate(torch.tensor([enc[1]]), max_new_tokens=max_new_tokens, streamer=rec)
    assert rec.puts[0] == enc[1] and rec.ended
    assert sum(rec.puts[1:], []) == one[0, len(enc[1]):].tolist()
    for changes in ({"do_sample": True}, {"repetition_penalty": 1.3}):  # what FLUID's greedy decoder would not honour
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.generate(ids, attention_mask=mask, max_new_tokens=3, **changes)
        assert any("standard generate" in str(w.message) for w in caught), changes


# Files whose tests run longest (training subprocesses, the demo), collected first: with
# `pytest -n N --dist loadfile` (make test) a long file that starts last would run alone at the end.
LONG_FILES = ("test_robustness.py", "test_demo.py", "test_sharded.py", "test_scripts.py", "test_pipeline.py",
              "test_serve.py", "test_evaluate.py", "test_cli.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: a file keeps its order
