"""Where examples come from. Each source returns chat examples per split:
``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "answer": "..."}``."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from fluid.data.arith import ArithTask
from fluid.utils.errors import FluidConfigError

SPLITS = ("train", "validation", "test")


class ArithSource:
    """The embedded task (``data=arith``)."""

    def __init__(self, seed: int = 0, max_operand: int = 20, families: list[str] | None = None,
                 n_train: int = 20000, n_val: int = 256, n_test: int = 500):
        self.task = ArithTask(seed=seed, max_operand=max_operand, families=families)
        self.sizes = {"train": n_train, "validation": n_val, "test": n_test}

    def examples(self, split: str) -> list[dict]:
        return self.task.examples(split, self.sizes[split])


def _read_jsonl(path: Path, key: str) -> list[dict]:
    if not path.exists():
        raise FluidConfigError(key, f"file {str(path)!r} does not exist")
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FluidConfigError(key, f"{path}:{n} is not valid JSON ({e.msg})") from None
    return rows


_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_example(row: dict, strip_calculator: bool = True) -> dict:
    solution = row["answer"]
    if strip_calculator:
        solution = _CALC.sub("", solution)
    final = solution.rsplit("####", 1)[-1].strip().replace(",", "")
    return {"messages": [{"role": "user", "content": row["question"]},
                         {"role": "assistant", "content": solution}], "answer": final}


def _limit(rows: list, n: int | None) -> list:
    return rows if n is None else rows[:n]


class GSM8KSource:
    """GSM8K from local ``train.jsonl``/``test.jsonl``; validation is held out of train."""

    def __init__(self, data_dir: str, n_val: int = 200, seed: int = 0, strip_calculator: bool = True,
                 n_train: int | None = None, n_test: int | None = None):
        d = Path(data_dir)
        train = [gsm8k_example(r, strip_calculator) for r in _read_jsonl(d / "train.jsonl", "data.source.data_dir")]
        test = [gsm8k_example(r, strip_calculator) for r in _read_jsonl(d / "test.jsonl", "data.source.data_dir")]
        random.Random(seed).shuffle(train)
        self.splits = {"validation": train[:n_val], "train": _limit(train[n_val:], n_train),
                       "test": _limit(test, n_test)}

    def examples(self, split: str) -> list[dict]:
        return self.splits[split]


def jsonl_example(row: dict, n: int, path: str) -> dict:
    if "messages" in row:
        msgs = row["messages"]
    elif "prompt" in row and "response" in row:
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    else:
        raise FluidConfigError("data.source", f"{path}:{n} needs 'prompt'/'response' or 'messages'")
    answer = row.get("answer")
    if answer is None:
        answer = msgs[-1]["content"].rsplit("####", 1)[-1].strip() if msgs[-1]["role"] == "assistant" else ""
    return {"messages": msgs, "answer": str(answer)}


class JsonlSource:
    """A user's own JSONL: ``prompt``/``response`` or chat ``messages`` per line."""

    def __init__(self, train_path: str, val_path: str | None = None, test_path: str | None = None,
                 val_fraction: float = 0.05, seed: int = 0):
        def load(p: str, key: str) -> list[dict]:
            return [jsonl_example(r, i + 1, p) for i, r in enumerate(_read_jsonl(Path(p), key))]

        train = load(train_path, "data.source.train_path")
        if val_path:
            val = load(val_path, "data.source.val_path")
        else:
            random.Random(seed).shuffle(train)
            k = max(1, int(len(train) * val_fraction))
            val, train = train[:k], train[k:]
        test = load(test_path, "data.source.test_path") if test_path else val
        self.splits = {"train": train, "validation": val, "test": test}

    def examples(self, split: str) -> list[dict]:
        return self.splits[split]
