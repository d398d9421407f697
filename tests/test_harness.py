"""lm-eval integration: likelihoods against unbatched references, ``FluidLM`` against greedy AR,
the local tasks in ``tests/lm_eval_task`` through ``simple_evaluate`` and through the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_model

TASK_DIR = ROOT / "tests" / "lm_eval_task"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two of them wait on
    each other (measured: 2 s instead of 0.03 s for a few decoding steps)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ref_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One unbatched forward over the whole sequence: position t predicts token t + 1."""
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).logits[0].float(), -1)
    pred = logp[len(ctx) - 1: len(ctx) + len(cont) - 1]
    tgt = torch.tensor(cont)
    return float(pred.gather(-1, tgt[:, None]).sum()), bool((pred.argmax(-1) == tgt).all())


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=96, seed=1)


def greedy_tokens(model, ctx: list[int], n: int) -> list[int]:
    out = list(ctx)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ctx):]


def test_loglikelihood_matches_unbatched_reference(model):
    from fluid.eval.likelihood import loglikelihood

    g = torch.Generator().manual_seed(0)
    reqs = [(torch.randint(4, 96, (int(a),), generator=g).tolist(), torch.randint(4, 96, (int(b),), generator=g).tolist())
            for a, b in [(5, 3), (1, 1), (17, 6), (9, 1), (3, 12), (11, 4), (2, 2)]]
    ctx = reqs[0][0]
    reqs.append((ctx, greedy_tokens(model, ctx, 4)))  # the greedy continuation: flagged greedy
    got = loglikelihood(model, reqs, batch_size=3)   # several batches, right padding in each
    for (c, k), (lp, greedy) in zip(reqs, got):
        ref_lp, ref_greedy = ref_loglikelihood(model, c, k)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
    assert got[-1][1] and not got[2][1]


def test_loglikelihood_truncation_and_empty_context(model):
    from fluid.eval.likelihood import loglikelihood

    ctx, cont = list(range(10, 30)), [40, 41, 42]
    # max_length 8 model inputs: the sequence keeps its last 9 tokens (the context loses its head)
    (lp, _), = loglikelihood(model, [(ctx, cont)], max_length=8)
    keep = (ctx + cont)[-9:]
    assert lp == pytest.approx(ref_loglikelihood(model, keep[:-3], cont)[0], abs=1e-4)
    (lp, _), = loglikelihood(model, [([], cont)], prefix_token_id=1)
    assert lp == pytest.approx(ref_loglikelihood(model, [1], cont)[0], abs=1e-4)
    with pytest.raises(ValueError, match="prefix_token_id"):
        loglikelihood(model, [([], cont)])
    assert loglikelihood(model, [(ctx, [])]) == [(0.0, True)]


@pytest.mark.parametrize("n,max_len", [(1, 4), (4, 4), (5, 4), (13, 4), (8, 1), (20, 7)])
def test_rolling_windows_as_lm_eval(n, max_len):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from fluid.eval.likelihood import rolling_windows

    toks = list(range(100, 100 + n))
    ours = rolling_windows(toks, 7, max_len)
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, 7, max_len, 1)]
    assert [tuple(map(list, w)) for w in theirs] == ours
    assert [t for _, c in ours for t in c] == toks  # every token scored once
    assert all(len(c) + len(k) <= max_len + 1 for c, k in ours)


def test_loglikelihood_rolling_matches_reference(model):
    from fluid.eval.likelihood import loglikelihood_rolling

    toks = list(range(20, 43))
    full = ref_loglikelihood(model, [1], toks)[0]  # one window: the whole document after the prefix
    assert loglikelihood_rolling(model, toks, 1, max_length=64) == pytest.approx(full, abs=1e-4)
    # windows of 8: chunks 0-7 | 8-15 | 16-22, each after the (up to) 8 tokens before it
    seq = [1] + toks
    ref = sum(ref_loglikelihood(model, seq[max(0, e - 8): p + 1], seq[p + 1: e + 1])[0]
              for p, e in [(0, 8), (8, 16), (16, 23)])
    assert loglikelihood_rolling(model, toks, 1, max_length=8, batch_size=2) == pytest.approx(ref, abs=1e-4)


# ---------------------------------------------------------------- FluidLM
@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    from fluid.eval.harness import FluidLM

    return FluidLM(checkpoint=str(tiny_checkpoint), device="cpu", horizon="fixed", fixed_k="4", batch_size=3,
                   max_new_tokens=8)


def gen_request(context: str, **gen_kwargs):
    from lm_eval.api.instance import Instance

    return Instance("generate_until", {}, (context, gen_kwargs), 0)


PROMPTS = ["Felix has 26 books.", "Lena has 4 more books than Felix. How many", "Carla buys 5 boxes", "What is 7 * 2?"]


def test_generate_until_is_greedy_ar_and_honours_stops(lm):
    from fluid.decoding import DecodeConfig, FluidDecoder

    ar = FluidDecoder(lm.model, lm.tokenizer, config=DecodeConfig(algorithm="ar"))
    ids = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ar_texts = ar.generate(ids, max_new_tokens=6)["texts"]
    got = lm.generate_until([gen_request(p, until=[], max_gen_toks=6) for p in PROMPTS], disable_tqdm=True)
    assert got == ar_texts
    # a stop string inside a greedy text: cut there (two groups of gen_kwargs, input order kept)
    chosen = max(range(len(ar_texts)), key=lambda i: len(ar_texts[i]))
    text = ar_texts[chosen]
    assert len(text) >= 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    with_stop = {0, 2, chosen}
    reqs = [gen_request(p, until=[stop] if i in with_stop else [], max_gen_toks=6) for i, p in enumerate(PROMPTS)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    assert got == [t.split(stop)[0] if i in with_stop else t for i, t in enumerate(ar_texts)]
    assert stop not in got[chosen] and len(got[chosen]) < len(text)
    # sampling is not FLUID's: ignored (greedy), max_gen_toks defaults to max_new_tokens
    sampled = lm.generate_until([gen_request(PROMPTS[0], until=[], do_sample=True, temperature=0.7)], disable_tqdm=True)
    assert sampled == ar.generate(ids[:1], max_new_tokens=8)["texts"]


def test_fluid_loglikelihood_tokenized_like_lm_eval(lm):
    from lm_eval.api.instance import Instance

    tok = lm.tokenizer
    pairs = [("Question: What is 2 + 3?\nAnswer:", " 5"), ("Felix has 26 ", "books."), ("", "Felix has 26 books.")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs], disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        if ctx:
            ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont  # trailing spaces go to the continuation
            whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
            n = len(tok(ctx, add_special_tokens=False)["input_ids"])
            c_ids, k_ids = whole[:n], whole[n:]
        else:
            c_ids, k_ids = [tok.bos_token_id], tok(cont, add_special_tokens=False)["input_ids"]
        ref = ref_loglikelihood(lm.model, c_ids, k_ids)
        assert lp == pytest.approx(ref[0], abs=1e-4) and greedy == ref[1]
    rolled, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Felix has 26 books.",), 0)])
    assert rolled == pytest.approx(got[2][0], abs=1e-4)  # the same tokens after BOS


def test_config_errors(tiny_checkpoint):
    from fluid.eval.harness import FluidLM
    from fluid.utils.errors import FluidConfigError

    with pytest.raises(FluidConfigError, match=r"unknown key\(s\) k_maxx .*valid: .*k_max"):
        FluidLM(checkpoint=str(tiny_checkpoint), k_maxx=4)
    with pytest.raises(FluidConfigError, match="no K-head.*horizon=fixed"):
        FluidLM(checkpoint=str(tiny_checkpoint), device="cpu")
    with pytest.raises(FluidConfigError, match="fixed_k"):
        FluidLM(checkpoint=str(tiny_checkpoint), horizon="fixed", fixed_k="eight")
    assert FluidLM(checkpoint=str(tiny_checkpoint), device="cpu", algorithm="ar", batch_size="auto").batch_size == 16


def test_simple_evaluate_local_tasks(lm, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data files relative to the repository root
    out = lm_eval.simple_evaluate(model=lm, tasks=["fluid_arith_gen", "fluid_arith_mc"], limit=3,
                                  task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False))
    res, samples = out["results"], out["samples"]
    mc = samples["fluid_arith_mc"]
    assert len(mc) == 3
    for s in mc:  # acc is the argmax of the AR head's log-likelihoods over the choices
        lls = [r[0] for r in s["filtered_resps"]]
        assert s["acc"] == float(lls.index(max(lls)) == s["target"])
    assert res["fluid_arith_mc"]["acc,none"] == pytest.approx(sum(s["acc"] for s in mc) / 3)
    gen = samples["fluid_arith_gen"]
    assert len(gen) == 3
    for s in gen:  # the task's filter: the number after ####, else lm-eval's "[invalid]"
        m = re.search(r"#### (\-?[0-9]+)", s["resps"][0][0])
        assert s["filtered_resps"][0] == (m.group(1) if m else "[invalid]")
    assert res["fluid_arith_gen"]["exact_match,answer"] == pytest.approx(sum(s["exact_match"] for s in gen) / 3)
    assert out["config"]["fluid_decode"]["horizon"] == "fixed"


def test_cli_runs_local_task(tiny_checkpoint, tmp_path):
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fluid.eval.harness", "--model", "fluid",
           "--model_args", f"checkpoint={tiny_checkpoint},horizon=fixed", "--device", "cpu", "--batch_size", "4",
           "--tasks", "fluid_arith_gen", "--include_path", str(TASK_DIR), "--no_default_tasks", "--limit", "2"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    print(f"CLI: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fluid_arith_gen" in proc.stdout and "exact_match" in proc.stdout
