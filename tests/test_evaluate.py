"""``python -m fluid.evaluate``: each benchmark's loader and scorer on a small fixture, and whole
evaluations of tiny random models through Hydra's compose API into tmp_path (CPU, seconds)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_model

from fluid.eval.benchmarks import GSM8K, MATH500, MMLU, Arith, HumanEval
from fluid.utils.errors import FluidConfigError

# ------------------------------------------------------------------ fixtures (written by the tests)
GSM8K_ROWS = {
    "train": [{"question": "Tom has 3 apples and buys 4 more. How many apples?",
               "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
              {"question": "A box holds 2 pens. How many pens are in 5 boxes?", "answer": "5 * 2 = 10\n#### 10"}],
    "test": [{"question": "Sam earns 1200 dollars a week for 2 weeks. How much?",
              "answer": "1200 * 2 = <<1200*2=2400>>2400\n#### 2,400"},
             {"question": "Half of 37 is?", "answer": "37 / 2 = 18.5\n#### 18.5"},
             {"question": "What is 9 + 9?", "answer": "9 + 9 = 18\n#### 18"}],
}
MATH_ROWS = [{"problem": "What is $1 \\div 2$?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}",
              "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
             {"problem": "Convert $(0,3)$ to polar coordinates.", "solution": "...",
              "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
              "unique_id": "test/precalculus/807.json"}]
MMLU_ROWS = {
    "test": [{"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
              "answer": 1},
             {"question": "The capital of France is", "subject": "geography", "choices": ["Rome", "Berlin", "Paris",
                                                                                          "Oslo"], "answer": 2}],
    "dev": [{"question": "What is 1 + 1?", "subject": "elementary_mathematics", "choices": ["2", "3", "4", "5"],
             "answer": 0}],
}


def write_split(d: Path, rows_by_split: dict[str, list[dict]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture
def gsm8k_dir(tmp_path) -> Path:
    return write_split(tmp_path / "gsm8k", GSM8K_ROWS)


# --------------------------------------------------------------------------- GSM8K
def test_gsm8k_loader_reference_and_scorer(gsm8k_dir):
    b = GSM8K(data_path=str(gsm8k_dir))
    s = b.samples()
    assert [x.reference for x in s] == ["2400", "18.5", "18"]  # commas dropped from "#### 2,400"
    assert b.correct(s[0], "He earns $2,400 in total.")          # comma in the output
    assert b.correct(s[0], "so 2400.00 dollars")                  # trailing decimal zeros
    assert not b.correct(s[0], "He earns 240 dollars")
    assert b.correct(s[1], "37 / 2 = 18.5\n#### 18.5")
    assert not b.correct(s[1], "#### 18")                         # 18 is not 18.5
    assert b.correct(s[2], "9 + 9 = 18, then #### 18\nand 5 more")  # the number after ####, not the last one
    assert not b.correct(s[2], "no number here")
    assert len(GSM8K(data_path=str(gsm8k_dir), split="test").samples(limit=2)) == 2


def test_gsm8k_fewshot_and_chat_off(gsm8k_dir):
    b = GSM8K(data_path=str(gsm8k_dir), num_fewshot=2, chat=False)
    text = b.plain(b.samples()[0])
    # the first two training problems, calculator annotations stripped, then the question
    assert text.startswith("Question: Tom has 3 apples") and "<<" not in text
    assert text.index("A box holds") < text.index("Sam earns") and text.endswith("Answer:")
    msgs = GSM8K(data_path=str(gsm8k_dir), num_fewshot=1).messages(b.samples()[2])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"] and msgs[1]["content"].endswith("#### 7")
    with pytest.raises(FluidConfigError, match="benchmark.num_fewshot"):
        GSM8K(data_path=str(gsm8k_dir), num_fewshot=-1)
    same = GSM8K(data_path=str(gsm8k_dir), num_fewshot=1, fewshot_split="test")  # exemplars from the evaluated split
    first, second, _ = same.samples()
    assert [q for q, _ in same.exemplars(first)] == [second.question]  # never the sample's own solution
    assert [q for q, _ in same.exemplars(second)] == [first.question]
    assert "Question:" in GSM8K(data_path=str(gsm8k_dir), chat=False, stop_strings=[]).stop_strings


def test_local_copy_only_when_it_exists(tmp_path, monkeypatch):
    from fluid.utils.compose import compose

    monkeypatch.setenv("FLUID_DATA", str(tmp_path))
    assert compose("evaluate", ["benchmark=mmlu"]).benchmark.data_path is None  # no $FLUID_DATA/mmlu: the hub copy
    write_split(tmp_path / "mmlu", MMLU_ROWS)
    assert compose("evaluate", ["benchmark=mmlu"]).benchmark.data_path == f"{tmp_path}/mmlu"


def test_missing_data_names_both_ways(tmp_path, monkeypatch):
    with pytest.raises(FluidConfigError, match=r"benchmark.data_path: .*does not exist .*pip install datasets"):
        GSM8K(data_path=str(tmp_path / "nowhere"), hub_id="openai/gsm8k").samples()
    write_split(tmp_path / "bad", {"test": [{"text": "no question"}]})
    with pytest.raises(FluidConfigError, match=r"row 0 is not a gsm8k row \(KeyError"):
        GSM8K(data_path=str(tmp_path / "bad")).samples()
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(FluidConfigError) as e:
        GSM8K(hub_id="openai/gsm8k", hub_config="main").samples()
    msg = str(e.value)
    assert "\n" not in msg and "benchmark.data_path=DIR" in msg and "pip install datasets" in msg and "openai/gsm8k" in msg


# --------------------------------------------------------------------------- MATH500
def test_math500_equivalent_latex_forms(tmp_path):
    b = MATH500(data_path=str(write_split(tmp_path / "math", {"test": MATH_ROWS})))
    half, polar = b.samples()
    assert half.id == "test/prealgebra/1.json" and "\\boxed{}" in b.prompt_text(half)
    for same in ("so the answer is $\\boxed{0.5}$", "$\\boxed{\\dfrac12}$", "\\boxed{1/2}", "\\boxed{\\frac{2}{4}}"):
        assert b.correct(half, same), same
    for wrong in ("\\boxed{2}", "\\boxed{\\frac{1}{3}}", "I do not know"):
        assert not b.correct(half, wrong), wrong
    assert b.correct(polar, "The point is $\\boxed{(3, \\pi/2)}$.")
    assert not b.correct(polar, "$\\boxed{(3, \\pi)}$")
    assert b.correct(half, "first \\boxed{3}, corrected: \\boxed{\\frac{1}{2}}")  # the last boxed answer counts


# --------------------------------------------------------------------------- HumanEval
def test_humaneval_through_the_benchmark(tmp_path):
    b = HumanEval(chat=False, timeout_s=3.0)
    s = b.samples(limit=3)
    assert [x.id for x in s] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    canonical = [x.reference for x in s]
    assert b.score(s, canonical) == [True, True, True]
    wrong = ["    return None\n", canonical[1], "    while True:\n        pass\n"]
    assert b.score(s, wrong) == [False, True, False]  # wrong, right, timed out
    fenced = "Here it is:\n```python\n" + s[2].question + canonical[2] + "```\nDone."
    assert b.score(s[2:], [fenced]) == [True]         # a chat answer with the whole function
    chat = HumanEval(chat=True, chat_stop_strings=["\n```\n"], stop_strings=["\ndef"])
    assert chat.stop_strings == ["\n```\n"]            # "\ndef" would cut a fenced answer at its first line
    assert chat.score(s[2:], ["```python\n" + s[2].question + canonical[2]]) == [True]  # cut at the closing fence
    with pytest.raises(FluidConfigError, match="few-shot"):
        HumanEval(num_fewshot=2)


# --------------------------------------------------------------------------- MMLU
def test_mmlu_rows_letters_and_fewshot(tmp_path):
    d = write_split(tmp_path / "mmlu", MMLU_ROWS)
    b = MMLU(data_path=str(d), num_fewshot=1)
    math, geo = b.samples()
    assert (math.reference, geo.reference) == ("B", "C") and math.extra["choices"][1] == "4"
    assert "A. 3\nB. 4\nC. 5\nD. 6" in b.prompt_text(math) and "elementary mathematics" in b.prompt_text(math)
    assert [q for q, _ in b.exemplars(math)] == ["What is 1 + 1?\nA. 2\nB. 3\nC. 4\nD. 5"]
    assert b.exemplars(geo) == []                     # exemplars come from the same subject only
    assert b.choose([-3.0, -1.0, -2.0, -5.0]) == "B"
    assert b.correct(math, "The answer is (B).") and b.correct(math, "B") and not b.correct(math, "A. 3")
    assert not b.correct(math, "I think so")
    assert b.correct(math, "A good choice here is B") and b.correct(math, "B) 4") and not b.correct(math, "answer: b")
    assert MMLU(data_path=str(d), subjects=["geography"]).samples()[0].reference == "C"
    plain = MMLU(data_path=str(d), num_fewshot=1, chat=False).plain(math)
    assert plain.count("The following are") == 1 and plain.index("What is 1 + 1?") < plain.index("What is 2 + 2?")
    assert plain.endswith("D. 6\nAnswer:") and "\nAnswer: A\n\n" in plain
    assert MMLU(data_path=str(d), chat=False).continuations() == [" A", " B", " C", " D"] and b.continuations()[0] == "A"
    bad = write_split(tmp_path / "bad", {"test": [{"question": "q", "choices": ["a", "b"], "answer": 0}]})
    with pytest.raises(FluidConfigError, match="4 choices"):
        MMLU(data_path=str(bad)).samples()
    with pytest.raises(FluidConfigError, match="benchmark.mode"):
        GSM8K(mode="loglikelihood")


def test_arith_is_the_training_task():
    from fluid.utils.compose import compose

    cfg = compose("evaluate", ["benchmark=arith"])
    b = Arith(**{k: v for k, v in cfg.benchmark.items() if k not in ("_target_",)})
    s = b.samples(limit=4)
    src = b.source
    assert [x.reference for x in s] == [str(p.answer) for p in src.task.problems("test", 4)]
    assert b.correct(s[0], f"... #### {s[0].reference}") and not b.correct(s[0], "#### -1")


# --------------------------------------------------------------------------- end to end
def write_stage2(root: Path, model, tokenizer) -> Path:
    """``model`` as a stage-1 directory and a random K-head on it as a stage-2 directory."""
    from fluid.checkpoint import HEAD_FILE, CheckpointMeta
    from fluid.khead.head import KHead

    model.save_pretrained(root / "stage1")
    tokenizer.save_pretrained(root / "stage1")
    CheckpointMeta(stage=1, mask_token=tokenizer.mask_token, mask_token_id=tokenizer.mask_token_id,
                   horizon=8).write(root / "stage1")
    KHead(model.config.hidden_size, horizon=8).save(root / "stage2")
    CheckpointMeta(stage=2, mask_token_id=tokenizer.mask_token_id, horizon=8,
                   stage1_checkpoint=str(root / "stage1"), head_file=HEAD_FILE).write(root / "stage2")
    return root / "stage2"


@pytest.fixture(scope="module")
def tiny_stage2(tmp_path_factory, arith_tokenizer) -> Path:
    """A tiny random Llama and a random K-head: drafts are mostly wrong."""
    model = tiny_model("llama", vocab_size=len(arith_tokenizer), tie_word_embeddings=True)
    return write_stage2(tmp_path_factory.mktemp("eval-ckpt"), model, arith_tokenizer)


@pytest.fixture(scope="module")
def drafting_stage2(tmp_path_factory, arith_tokenizer) -> Path:
    """Every token embeds alike (an untied LM head): the same next token everywhere, so drafts
    are right and whole blocks are accepted (TPF well above 1)."""
    model = tiny_model("llama", vocab_size=len(arith_tokenizer), tie_word_embeddings=False, seed=1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb[5].expand_as(emb))
        # the hidden state is then the same at every position: aim the LM head's row of a visible,
        # non-special token at it
        h = model(torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states[-1][0, -1]
        model.lm_head.weight[arith_tokenizer.convert_tokens_to_ids("7")] = 100 * h / h.square().sum()
    return write_stage2(tmp_path_factory.mktemp("eval-drafting"), model, arith_tokenizer)


def run_eval(tmp_path: Path, overrides: list[str]):
    from omegaconf import open_dict

    from fluid.evaluate import evaluate
    from fluid.utils.compose import compose

    cfg = compose("evaluate", overrides + ["progress=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return evaluate(cfg)


def read_samples(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]


def test_evaluate_arith_end_to_end(tmp_path, drafting_stage2):
    m = run_eval(tmp_path, ["benchmark=arith", f"checkpoint={drafting_stage2}", "limit=6", "decode.max_new_tokens=24",
                            "decode.batch_size=4", "decode.k_max=8", "+settings.fixed={horizon:fixed,fixed_k:4}",
                            "+settings.noverify={verify:false}", "confidences=[0.5]", "warmup=2", "repeats=2"])
    assert m["status"] == "completed" and m["n_samples"] == 6
    for f in ("metrics.json", "samples.jsonl", "results.md", "speed_accuracy.png", "config.yaml"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert json.loads((tmp_path / "metrics.json").read_text())["fluid_c0.5/tpf"] == m["fluid_c0.5/tpf"]
    assert (tmp_path / "speed_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = ["ar", "fluid", "fluid_c0.5", "fixed", "fixed_c0.5", "noverify", "noverify_c0.5"]
    for name in names:
        for key in ("accuracy", "tpf", "tokens_per_s", "wall_time_s", "mean_accepted"):
            assert f"{name}/{key}" in m, f"{name}/{key}"
        assert f"| {name} |" in (tmp_path / "results.md").read_text()
    # lossless settings: the tokens of greedy AR, so the same accuracy
    for name in ("fluid", "fluid_c0.5", "fixed", "fixed_c0.5"):
        assert m[f"{name}/identical_to_ar"] == 1.0 and m[f"{name}/accuracy"] == m["ar/accuracy"]
        assert m[f"{name}/speedup_vs_ar"] == pytest.approx(m[f"{name}/tokens_per_s"] / m["ar/tokens_per_s"])
    rows = read_samples(tmp_path)
    assert len(rows) == 6 and {"id", "prompt", "reference", *names} <= set(rows[0])
    from fluid.eval.answers import exact_match

    for name in names:  # the metrics are those of the samples, each scored on its own output
        assert [r[name]["correct"] for r in rows] == [exact_match(r[name]["output"], r["reference"]) for r in rows]
        assert m[f"{name}/accuracy"] == sum(r[name]["correct"] for r in rows) / 6
        assert m[f"{name}/generated_tokens"] == sum(r[name]["tokens"] for r in rows)
    assert all(r["fluid_c0.5"]["output"] == r["ar"]["output"] for r in rows)
    assert m["fluid_c0.5/tpf"] == pytest.approx(m["fluid_c0.5/generated_tokens"] / m["fluid_c0.5/nfe"])
    assert m["fixed_c0.5/mean_horizon"] <= 4
    assert m["fluid/tpf"] > 2 and m["fixed_c0.5/tpf"] > 2  # blocks were drafted and accepted
    assert rows[0]["ar"]["output"].startswith("777")


def test_stop_string_inside_a_block_ends_fluid_where_it_ends_ar(drafting_stage2):
    """A block that runs past a stop string commits only up to the token that completes it, as
    AR does: the same tokens, so TPF and tokens/s count no token AR would not have produced."""
    from fluid.checkpoint import load_fluid
    from fluid.decoding import DecodeConfig, FluidDecoder

    fm = load_fluid(drafting_stage2)
    prompt = [fm.tokenizer("5 + 2", add_special_tokens=False)["input_ids"]] * 2
    dec = FluidDecoder(fm.model, fm.tokenizer, head=fm.head, mask_token_id=fm.mask_token_id,
                       config=DecodeConfig(max_new_tokens=30, k_min=8, k_max=8), stop_strings=["7777"])
    ar, fl = dec.generate(prompt, algorithm="ar"), dec.generate(prompt)
    assert ar["tokens"] == fl["tokens"] and all(r.finished == "stop" for r in fl["rows"])
    assert all(text == "" for text in fl["texts"])  # the text ends before the stop string
    assert fl["generated_tokens"] == ar["generated_tokens"] < 30 and fl["nfe"] < ar["nfe"]


def test_interleaved_rounds_decode_what_one_pass_decodes(drafting_stage2):
    """Rounds of prompts (every setting in turn, the order rotating) give each setting the tokens,
    forwards and per-row statistics of one pass over all prompts at the same batching."""
    from dataclasses import replace

    from fluid.checkpoint import load_fluid
    from fluid.decoding import DecodeConfig, FluidDecoder
    from fluid.eval.rounds import decode_all

    fm = load_fluid(drafting_stage2)
    ids = [fm.tokenizer(f"{a} + {b}", add_special_tokens=False)["input_ids"] for a in range(3) for b in range(3)]
    base = DecodeConfig(max_new_tokens=12, k_min=4, k_max=8, batch_size=2)
    dec = FluidDecoder(fm.model, fm.tokenizer, head=fm.head, mask_token_id=fm.mask_token_id, config=base)
    settings = {"ar": replace(base, algorithm="ar"), "fluid": base, "k4": replace(base, horizon="fixed", fixed_k=4)}
    one = decode_all(dec, ids, settings, repeats=1, progress=False, interleave=0)
    rounds = decode_all(dec, ids, settings, repeats=2, progress=False, interleave=3)  # rounds of 4 prompts
    for name in settings:
        a, b = one[name], rounds[name]
        assert a["tokens"] == b["tokens"] and a["nfe"] == b["nfe"] and len(b["rows"]) == len(ids)
        assert [r.accepted for r in a["rows"]] == [r.accepted for r in b["rows"]]
        assert b["tokens_per_s"] == pytest.approx(b["generated_tokens"] / b["wall_time_s"])
    assert rounds["fluid"]["tpf"] > 1.5 and rounds["fluid"]["tokens"] == rounds["ar"]["tokens"]
    with pytest.raises(FluidConfigError, match="interleave: must be a number of prompts >= 0"):
        decode_all(dec, ids, settings, repeats=1, progress=False, interleave=-2)


def test_evaluate_accuracy_is_scored_on_the_output(tmp_path, tiny_stage2, monkeypatch):
    """Each sample is scored on its own output: a scorer that accepts exactly one sample's output
    gives 1/3, and that sample alone is marked correct in samples.jsonl, for every setting."""
    from fluid.eval import benchmarks

    seen = {}

    def correct(self, sample, output):
        seen.setdefault(sample.id, output)
        return sample.id == "test/1" and output == seen["test/1"]

    monkeypatch.setattr(benchmarks.Arith, "correct", correct)
    m = run_eval(tmp_path, ["benchmark=arith", f"checkpoint={tiny_stage2}", "limit=3", "decode.max_new_tokens=8"])
    assert m["ar/accuracy"] == m["fluid/accuracy"] == pytest.approx(1 / 3)
    rows = read_samples(tmp_path)
    assert [r["id"] for r in rows if r["ar"]["correct"]] == ["test/1"] == [r["id"] for r in rows if r["fluid"]["correct"]]
    assert rows[1]["ar"]["output"] == seen["test/1"]


def test_evaluate_gsm8k_and_mmlu_fixtures(tmp_path, tiny_stage2, gsm8k_dir):
    m = run_eval(tmp_path / "gsm8k", ["benchmark=gsm8k", f"benchmark.data_path={gsm8k_dir}", "benchmark.num_fewshot=1",
                                      f"checkpoint={tiny_stage2}", "decode.max_new_tokens=12"])
    assert m["n_samples"] == 3 and m["fluid/identical_to_ar"] == 1.0 and m["fluid/accuracy"] == m["ar/accuracy"]
    assert "Tom has 3 apples" in read_samples(tmp_path / "gsm8k")[0]["prompt"]  # the few-shot exemplar

    mmlu = write_split(tmp_path / "mmlu-data", MMLU_ROWS)
    m = run_eval(tmp_path / "mmlu", ["benchmark=mmlu", f"benchmark.data_path={mmlu}", f"checkpoint={tiny_stage2}"])
    rows = read_samples(tmp_path / "mmlu")
    assert m["mode"] == "loglikelihood" and len(rows) == 2
    for r in rows:  # the chosen letter is the one with the highest log-likelihood
        ll = r["ar"]["loglikelihoods"]
        assert r["ar"]["output"] == "ABCD"[ll.index(max(ll))] and all(v < 0 for v in ll)
    assert m["ar/accuracy"] == sum(r["ar"]["correct"] for r in rows) / 2
    assert (tmp_path / "mmlu" / "speed_accuracy.png").exists()


def test_evaluate_refuses_bad_settings(tmp_path, tiny_stage2):
    with pytest.raises(FluidConfigError, match=r"settings.fast: unknown decode field\(s\) \['k_maxx'\]"):
        run_eval(tmp_path, ["benchmark=arith", f"checkpoint={tiny_stage2}", "+settings.fast={k_maxx:4}"])
    with pytest.raises(FluidConfigError, match="settings.fluid.horizon: is .head. but the checkpoint has no K-head"):
        run_eval(tmp_path, ["benchmark=arith", f"checkpoint={tiny_stage2.parent / 'stage1'}"])
    with pytest.raises(FluidConfigError, match=r"settings.b1: sets \['batch_size'\], which AR and every setting share"):
        run_eval(tmp_path, ["benchmark=arith", f"checkpoint={tiny_stage2}", "+settings.b1={batch_size:1}"])
    with pytest.raises(FluidConfigError, match="confidences"):
        run_eval(tmp_path, ["benchmark=arith", f"checkpoint={tiny_stage2}", "confidences=[high]"])
    with pytest.raises(FluidConfigError, match="limit"):
        run_eval(tmp_path, ["benchmark=arith", f"checkpoint={tiny_stage2}", "limit=0"])
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_evaluate_logs_to_wandb_offline(tmp_path, tiny_stage2, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    m = run_eval(tmp_path, ["benchmark=arith", f"checkpoint={tiny_stage2}", "limit=2", "decode.max_new_tokens=8",
                            "logger=wandb"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = (runs[0] / f"run-{runs[0].name.rsplit('-', 1)[1]}.wandb").read_bytes()  # config, summary, history
    for key in (b"fluid/tpf", b"fluid/identical_to_ar", b"ar/accuracy", b"decode"):
        assert key in record, key
    tables = list(runs[0].glob("files/media/table/samples_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 2 and table["columns"][:3] == ["id", "prompt", "reference"]
    assert "fluid/output" in table["columns"]
    assert [r[table["columns"].index("fluid/tpf")] for r in table["data"]] == \
        [r["fluid"]["tpf"] for r in read_samples(tmp_path)]
    assert list(runs[0].glob("files/media/images/speed_accuracy_*.png"))
    assert m["status"] == "completed"


def test_cli_one_line_errors(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "fluid.evaluate", "benchmark=nope"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: benchmark=nope: unknown option for 'benchmark'; choose from: arith, gsm8k, humaneval, math500, mmlu"]
    r = subprocess.run([sys.executable, "-m", "fluid.evaluate", f"checkpoint={tmp_path / 'none'}",
                        f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True)
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("[")]  # Hydra's log lines
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: checkpoint: "), r.stderr


def test_evaluate_math500_humaneval_and_mmlu_generate(tmp_path, tiny_stage2):
    """Every benchmark through the whole evaluation (random model: the scorers run on its output)."""
    math = write_split(tmp_path / "math-data", {"test": MATH_ROWS})
    mmlu = write_split(tmp_path / "mmlu-data", MMLU_ROWS)
    for name, extra in (("math500", [f"benchmark.data_path={math}"]), ("humaneval", ["limit=2", "benchmark.timeout_s=3"]),
                        ("mmlu", [f"benchmark.data_path={mmlu}", "benchmark.mode=generate"])):
        m = run_eval(tmp_path / name, [f"benchmark={name}", f"checkpoint={tiny_stage2}", "decode.max_new_tokens=8",
                                       "decode.horizon=fixed", *extra])
        rows = read_samples(tmp_path / name)
        assert m["status"] == "completed" and m["mode"] == "generate" and len(rows) == m["n_samples"] == 2, name
        assert m["fluid/identical_to_ar"] == 1.0 and m["fluid/accuracy"] == m["ar/accuracy"], name
        assert all(isinstance(r["ar"]["correct"], bool) for r in rows), name


def test_reference_identical_and_argmax_agreement(tmp_path, drafting_stage2, tiny_stage2):
    """reference=RUN: a model compared with its own greedy outputs agrees everywhere; another model
    agrees exactly as often as its one-row teacher-forced argmax says."""
    from fluid.checkpoint import load_fluid

    common = ["benchmark=arith", "limit=5", "decode.max_new_tokens=10", "decode.batch_size=2", "warmup=0"]
    run_eval(tmp_path / "ref", common + [f"checkpoint={drafting_stage2}", "settings=null"])
    ref = [r["ar"]["ids"] for r in read_samples(tmp_path / "ref")]
    assert all(len(x) > 0 for x in ref)
    same = run_eval(tmp_path / "same", common + [f"checkpoint={drafting_stage2}", f"reference={tmp_path / 'ref'}"])
    assert same["reference/argmax_agreement"] == 1.0 and same["reference/positions"] == sum(map(len, ref))
    assert same["ar/identical_to_reference"] == same["fluid/identical_to_reference"] == 1.0

    other = run_eval(tmp_path / "other", common + [f"checkpoint={tiny_stage2}", f"reference={tmp_path / 'ref'}"])
    fm = load_fluid(tiny_stage2)
    rows = read_samples(tmp_path / "other")
    matched = 0
    with torch.no_grad():
        for r, toks in zip(rows, ref):
            p = fm.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            logits = fm.model(torch.tensor([p + toks])).logits[0]
            matched += int((logits[len(p) - 1: -1].argmax(-1) == torch.tensor(toks)).sum())
    assert other["reference/argmax_agreement"] == pytest.approx(matched / sum(map(len, ref)))
    assert other["reference/argmax_agreement"] < 1.0
    assert other["ar/identical_to_reference"] == sum(r["ar"]["ids"] == t for r, t in zip(rows, ref)) / 5

    with pytest.raises(FluidConfigError, match="reference: sample .* is not in"):
        run_eval(tmp_path / "more", ["benchmark=arith", "limit=7", f"checkpoint={tiny_stage2}",
                                     f"reference={tmp_path / 'ref'}"])
    with pytest.raises(FluidConfigError, match="reference: .* not found"):
        run_eval(tmp_path / "none", common + [f"checkpoint={tiny_stage2}", f"reference={tmp_path / 'nope'}"])


def test_evaluate_peers_and_cost_windows_in_the_same_rounds(tmp_path, tiny_stage2):
    """baselines: transformers' greedy and prompt lookup as rows with the settings' keys; cost-sized
    windows with n-gram drafts, with and without lanes, lossless like every setting."""
    m = run_eval(tmp_path, ["benchmark=arith", f"checkpoint={tiny_stage2}", "limit=3", "decode.max_new_tokens=16",
                            "decode.batch_size=1", "settings=null", "+settings.ngram={window:cost,ngram:true,lane_len:0}",
                            "+settings.lanes_ngram={window:cost,ngram:true,cost_curve:[1.0,1.1,1.2]}",
                            "baselines=[hf_greedy,hf_prompt_lookup]", "warmup=1", "interleave=2",
                            f"baseline_checkpoint={tiny_stage2.parent / 'stage1'}"])
    assert m["status"] == "completed"
    for name in ("ngram", "lanes_ngram", "hf_greedy", "hf_prompt_lookup"):
        for key in ("tokens_per_s", "tpf", "identical_to_ar", "speedup_vs_ar", "accuracy"):
            assert f"{name}/{key}" in m, f"{name}/{key}"
        assert m[f"{name}/identical_to_ar"] == 1.0, name
    assert m["hf_greedy/tpf"] == 1.0  # one counted forward per token, as the AR loop counts them
    with pytest.raises(Exception, match="batch_size=1"):
        run_eval(tmp_path / "b4", ["benchmark=arith", f"checkpoint={tiny_stage2}", "limit=2", "decode.batch_size=4",
                                   "baselines=[hf_prompt_lookup]"])
    with pytest.raises(Exception, match="unknown baseline"):
        run_eval(tmp_path / "bad", ["benchmark=arith", f"checkpoint={tiny_stage2}", "limit=2", "decode.batch_size=1",
                                    "baselines=[vllm]"])


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_evaluation_at_a_round_and_writes_what_was_measured(tmp_path, tiny_stage2, sig, code):
    """SIGTERM / SIGINT while the rounds run: the round in flight ends, the samples decoded so far
    are scored and written, marked ``terminated`` (never as a complete result), exit 128 + signal."""
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fluid.evaluate", "benchmark=arith", f"checkpoint={tiny_stage2}",
                             "limit=64", "interleave=2", "decode.batch_size=2", "decode.max_new_tokens=24", "warmup=0",
                             "progress=true", f"hydra.run.dir={run}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0, seen = time.time(), ""
    while time.time() - t0 < 300:  # the progress bar shows rounds under way
        seen += proc.stderr.read(1)
        if re.search(r"decoding \(\d+ settings\):\s+\d+%\|[^|]*\|\s+([4-9]|\d\d+)/", seen):
            break
    assert json.loads((run / "metrics.json").read_text())["status"] == "running"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, (seen + err)[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"terminated: {sig} received"), err[-2000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "terminated" and m["exit_code"] == code
    assert 2 <= m["n_decoded"] < m["n_samples"] == 64 and m["n_decoded"] % 2 == 0  # whole rounds
    rows = read_samples(run)
    assert len(rows) == m["n_decoded"] and all(r["fluid"]["identical_to_ar"] for r in rows)
    assert 0.0 <= m["fluid/accuracy"] <= 1.0 and m["fluid/tpf"] > 0
