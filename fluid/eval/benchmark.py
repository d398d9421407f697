"""What every benchmark of ``python -m fluid.evaluate`` is: a :class:`Sample` per row of a split,
its prompt (chat template or plain, fixed few-shot exemplars) and a scorer. The benchmarks
themselves are in :mod:`fluid.eval.benchmarks`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from fluid.data.sources import read_split
from fluid.utils.errors import FluidConfigError

KEY = "benchmark.data_path"
MODES = ("generate", "loglikelihood")


@dataclass
class Sample:
    id: str
    question: str                 # the user turn (without few-shot exemplars)
    reference: str                # what the scorer compares against (shown in samples.jsonl)
    extra: dict[str, Any] = field(default_factory=dict)


class Benchmark:
    """Base: rows of a split -> :class:`Sample` s -> prompt token ids -> correct or not."""

    name = "benchmark"
    modes: tuple[str, ...] = ("generate",)
    # the plain (chat=false) prompt: exemplars and the question as "<q_prefix>Q\n<a_prefix> A\n\n"
    q_prefix, a_prefix = "Question: ", "Answer:"

    def __init__(self, name: str | None = None, data_path: str | None = None, hub_id: str | None = None,
                 hub_config: str | None = None, split: str = "test", fewshot_split: str = "train",
                 num_fewshot: int = 0, chat: bool = True, stop_strings: Sequence[str] = (), mode: str = "generate"):
        self.name = name or self.name
        self.data_path, self.hub_id, self.hub_config = data_path or None, hub_id, hub_config
        self.split, self.fewshot_split = split, fewshot_split
        if not isinstance(num_fewshot, int) or num_fewshot < 0:
            raise FluidConfigError("benchmark.num_fewshot", f"must be an integer >= 0, got {num_fewshot!r}")
        if mode not in self.modes:
            raise FluidConfigError("benchmark.mode", f"{self.name} supports {' | '.join(self.modes)}, got {mode!r}")
        self.num_fewshot, self.chat, self.mode = num_fewshot, chat, mode
        self.stop_strings = list(stop_strings)
        if not chat and self.q_prefix.strip() and self.q_prefix.strip() not in self.stop_strings:
            self.stop_strings.append(self.q_prefix.strip())  # a plain prompt: the model would go on to a new question

    # ---------------------------------------------------------------- data
    def rows(self, split: str) -> list[dict]:
        return read_split(split, self.data_path, self.hub_id, self.hub_config, KEY)

    def to_sample(self, row: dict, index: int) -> Sample:
        raise NotImplementedError

    def exemplar(self, row: dict) -> tuple[str, str]:
        """(question, worked answer) of a training row, for few-shot prompts."""
        raise NotImplementedError

    def samples(self, limit: int | None = None) -> list[Sample]:
        rows = self.rows(self.split)
        if limit is not None:
            rows = rows[:limit]
        if not rows:
            raise FluidConfigError(KEY, f"the {self.name} {self.split!r} split is empty")
        return [self._sample(r, i) for i, r in enumerate(rows)]

    def _sample(self, row: dict, index: int) -> Sample:
        try:
            return self.to_sample(row, index)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise FluidConfigError(KEY, f"{self.name} {self.split!r} row {index} is not a {self.name} row "
                                   f"({type(e).__name__}: {e})") from None

    def exemplars(self, sample: Sample | None = None) -> list[tuple[str, str]]:
        """The first ``num_fewshot`` rows of the few-shot split, the same for every sample; a row
        with the sample's own question is skipped (a few-shot split that is the evaluated one)."""
        if not self.num_fewshot:
            return []
        if not hasattr(self, "_shots"):
            self._shots = [self._exemplar(r, i) for i, r in enumerate(self.rows(self.fewshot_split)[: self.num_fewshot + 1])]
        own = None if sample is None else self.prompt_key(sample)
        return [x for x in self._shots if x[0] != own][: self.num_fewshot]

    def _exemplar(self, row: dict, index: int) -> tuple[str, str]:
        try:
            return self.exemplar(row)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise FluidConfigError(KEY, f"{self.name} {self.fewshot_split!r} row {index} is not a {self.name} row "
                                   f"({type(e).__name__}: {e})") from None

    def prompt_key(self, sample: Sample) -> str:
        """What an exemplar of ``sample`` itself would have as its question."""
        return sample.question

    # ------------------------------------------------------------- prompts
    def prompt_text(self, sample: Sample) -> str:
        """The user turn of ``sample`` (chat) or its question line (plain)."""
        return sample.question

    def messages(self, sample: Sample) -> list[dict]:
        msgs = []
        for q, a in self.exemplars(sample):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": self.prompt_text(sample)}]

    def plain(self, sample: Sample) -> str:
        shots = "".join(f"{self.q_prefix}{q}\n{self.a_prefix} {a}\n\n" for q, a in self.exemplars(sample))
        return f"{shots}{self.q_prefix}{self.prompt_text(sample)}\n{self.a_prefix}"

    def render(self, sample: Sample, tokenizer) -> str:
        """The prompt as text: the tokenizer's chat template over :meth:`messages` (with the
        assistant turn opened), or :meth:`plain`."""
        from fluid.generate import prompt_text

        try:
            return prompt_text(tokenizer, self.messages(sample) if self.chat else self.plain(sample), self.chat)
        except FluidConfigError as e:
            raise FluidConfigError(f"benchmark.{e.key}", e.problem, "use benchmark.chat=false") from None

    def encode(self, sample: Sample, tokenizer) -> list[int]:
        return tokenizer(self.render(sample, tokenizer), add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------- scoring
    def correct(self, sample: Sample, output: str) -> bool:
        raise NotImplementedError

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> list[bool]:
        return [bool(self.correct(s, o)) for s, o in zip(samples, outputs)]
