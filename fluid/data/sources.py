"""Where examples come from. Each source returns chat examples per split:
``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "answer": "..."}``."""

from __future__ import annotations

import json
import random
import re
from functools import cached_property
from pathlib import Path

from fluid.data.arith import ArithTask
from fluid.utils.errors import FluidConfigError


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


def _ways(key: str, split: str, hub_id: str | None, hub_config: str | None) -> str:
    hub = f"`pip install datasets` to load {hub_id!r}" + (f" (config {hub_config!r})" if hub_config else "") + \
        " from the Hugging Face hub" if hub_id else "no public copy is configured"
    return f"set {key}=DIR (DIR/{split}.jsonl) or FLUID_DATA=ROOT (ROOT/<name>/{split}.jsonl) for a local copy, or {hub}"


def read_split(split: str, data_dir: str | None, hub_id: str | None, hub_config: str | None, key: str) -> list[dict]:
    """The rows of one split: ``data_dir/<split>.jsonl`` (or ``data_dir`` itself when it is a
    ``.jsonl`` file) when a local copy is set, else the public copy ``hub_id`` through the
    ``datasets`` library; either failure is one :class:`FluidConfigError` naming both ways."""
    if data_dir:
        d = Path(data_dir).expanduser()
        path = d if d.suffix == ".jsonl" else d / f"{split}.jsonl"
        if not path.exists():
            raise FluidConfigError(key, f"file {str(path)!r} does not exist", _ways(key, split, hub_id, hub_config))
        return _read_jsonl(path, key)
    if not hub_id:
        raise FluidConfigError(key, "no local copy is set", _ways(key, split, hub_id, hub_config))
    try:
        import datasets
    except ImportError:
        raise FluidConfigError(key, "no local copy is set and the `datasets` library is not installed",
                               _ways(key, split, hub_id, hub_config)) from None
    try:
        return [dict(r) for r in datasets.load_dataset(hub_id, hub_config, split=split)]
    except Exception as e:  # noqa: BLE001 - offline, unknown id, ...: one line either way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FluidConfigError(key, f"no local copy is set and loading {hub_id!r} from the hub failed: {first}",
                               _ways(key, split, hub_id, hub_config)) from None


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


class _ReadOnUse:
    """A source whose splits are read on first use (``datamodule.setup``), not when Hydra builds it:
    a missing file or data set then reaches ``fluid.train`` as one FluidConfigError line instead of
    inside Hydra's InstantiationException."""

    def _read(self) -> dict[str, list[dict]]:
        raise NotImplementedError

    @cached_property
    def splits(self) -> dict[str, list[dict]]:
        return self._read()

    def examples(self, split: str) -> list[dict]:
        return self.splits[split]


class GSM8KSource(_ReadOnUse):
    """GSM8K: ``train.jsonl``/``test.jsonl`` from the local folder ``data_dir`` when it is set,
    else the public copy (``hub_id``, config ``hub_config``) through the ``datasets`` library.
    Validation is held out of train."""

    KEY = "data.source.data_dir"

    def __init__(self, data_dir: str | None = None, hub_id: str = "openai/gsm8k", hub_config: str = "main",
                 n_val: int = 200, seed: int = 0, strip_calculator: bool = True, n_train: int | None = None,
                 n_test: int | None = None):
        self.data_dir, self.hub_id, self.hub_config = data_dir or None, hub_id, hub_config
        self.n_val, self.seed, self.strip_calculator = n_val, seed, strip_calculator
        self.n_train, self.n_test = n_train, n_test

    def _rows(self) -> dict[str, list[dict]]:
        return {s: read_split(s, self.data_dir, self.hub_id, self.hub_config, self.KEY) for s in ("train", "test")}

    def _read(self) -> dict[str, list[dict]]:
        rows = self._rows()
        train = [gsm8k_example(r, self.strip_calculator) for r in rows["train"]]
        test = [gsm8k_example(r, self.strip_calculator) for r in rows["test"]]
        random.Random(self.seed).shuffle(train)
        return {"validation": train[: self.n_val], "train": _limit(train[self.n_val:], self.n_train),
                "test": _limit(test, self.n_test)}


ROLES = ("system", "user", "assistant")


def jsonl_example(row: dict, n: int, path: str) -> dict:
    def bad(problem: str) -> FluidConfigError:
        return FluidConfigError("data.source", f"{path}:{n} {problem}")

    if not isinstance(row, dict):
        raise bad(f"is a {type(row).__name__}, not an object with 'prompt'/'response' or 'messages'")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise bad("has 'messages' that is not a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise bad(f"message {i} needs a role ({' | '.join(ROLES)}) and a string content, got {m!r:.80}")
        if msgs[-1]["role"] != "assistant" and "answer" not in row:  # a test row may give its answer apart
            raise bad("ends with a {!r} turn: the last message is the response to learn (role assistant)".format(
                msgs[-1]["role"]))
    elif "prompt" in row and "response" in row:
        if not isinstance(row["prompt"], str) or not isinstance(row["response"], str):
            raise bad("has a 'prompt' or 'response' that is not a string")
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    else:
        raise bad("needs 'prompt'/'response' or 'messages'")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise bad(f"has an 'answer' that is not a string or number, got {answer!r:.80}")
    if answer is None:
        answer = msgs[-1]["content"].rsplit("####", 1)[-1].strip() if msgs[-1]["role"] == "assistant" else ""
    return {"messages": msgs, "answer": str(answer)}


class JsonlSource(_ReadOnUse):
    """A user's own JSONL: ``prompt``/``response`` or chat ``messages`` per line."""

    def __init__(self, train_path: str, val_path: str | None = None, test_path: str | None = None,
                 val_fraction: float = 0.05, seed: int = 0):
        self.train_path, self.val_path, self.test_path = train_path, val_path, test_path
        self.val_fraction, self.seed = val_fraction, seed

    def _read(self) -> dict[str, list[dict]]:
        def load(p: str, key: str) -> list[dict]:
            return [jsonl_example(r, i + 1, p) for i, r in enumerate(_read_jsonl(Path(p), key))]

        train = load(self.train_path, "data.source.train_path")
        if self.val_path:
            val = load(self.val_path, "data.source.val_path")
        else:
            random.Random(self.seed).shuffle(train)
            k = max(1, int(len(train) * self.val_fraction))
            val, train = train[:k], train[k:]
        test = load(self.test_path, "data.source.test_path") if self.test_path else val
        return {"train": train, "validation": val, "test": test}
