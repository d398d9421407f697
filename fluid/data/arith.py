"""The embedded task: deterministic GSM8K-format arithmetic word problems.

Each problem is a question, a worked solution in a few short lines and a final line
``#### <number>``, exactly like GSM8K. The template text is easy to predict (a parallel
decoder should draft it in large blocks) while the numbers are not (they need the
arithmetic), which makes the task a small but honest test bed for FLUID.

Splits are assigned by a hash of the question text, so train, validation and test can
never share a question, and any split can be made as large as needed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar"]
OBJECTS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "shells", "stamps", "cookies"]
PLACES = ["shop", "bakery", "market", "library", "school", "farm"]

SPLIT_BUCKETS = 1000  # a question's bucket is sha1(question) mod this
SPLIT_RANGES = {"test": (0, 50), "validation": (50, 100), "train": (100, SPLIT_BUCKETS)}


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str
    answer: int

    def to_example(self) -> dict:
        return {
            "messages": [
                {"role": "user", "content": self.question},
                {"role": "assistant", "content": self.solution},
            ],
            "answer": str(self.answer),
        }


def _buy_and_give(rng: random.Random, hi: int) -> Problem:
    name, friend = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    c = rng.randint(1, a + b - 1)
    s, r = a + b, a + b - c
    q = (f"{name} has {a} {obj}. {name} buys {b} more {obj} and then gives {c} {obj} to {friend}. "
         f"How many {obj} does {name} have now?")
    sol = (f"{name} starts with {a} {obj}.\n"
           f"After buying {b} more, {name} has {a} + {b} = {s} {obj}.\n"
           f"After giving {c} to {friend}, {name} has {s} - {c} = {r} {obj}.\n"
           f"#### {r}")
    return Problem(q, sol, r)


def _sold_in_two_parts(rng: random.Random, hi: int) -> Problem:
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    b, c = rng.randint(1, hi), rng.randint(1, hi)
    s = b + c
    a = rng.randint(s, s + hi)
    r = a - s
    q = (f"A {place} had {a} {obj}. It sold {b} {obj} in the morning and {c} {obj} in the afternoon. "
         f"How many {obj} does the {place} have left?")
    sol = (f"The {place} sold {b} + {c} = {s} {obj} in total.\n"
           f"So the {place} has {a} - {s} = {r} {obj} left.\n"
           f"#### {r}")
    return Problem(q, sol, r)


def _boxes(rng: random.Random, hi: int) -> Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    extra = rng.randint(1, hi)
    p, r = a * b, a * b + extra
    q = (f"{name} buys {a} boxes of {obj}. Each box holds {b} {obj}. "
         f"{name} also finds {extra} {obj}. How many {obj} does {name} have?")
    sol = (f"The boxes hold {a} * {b} = {p} {obj}.\n"
           f"With the {extra} {obj} found, {name} has {p} + {extra} = {r} {obj}.\n"
           f"#### {r}")
    return Problem(q, sol, r)


def _two_friends(rng: random.Random, hi: int) -> Problem:
    n1, n2 = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    a = rng.randint(1, hi)
    d = rng.randint(1, hi)
    b = a + d
    r = a + b
    q = (f"{n1} has {a} {obj}. {n2} has {d} more {obj} than {n1}. "
         f"How many {obj} do {n1} and {n2} have together?")
    sol = (f"{n2} has {a} + {d} = {b} {obj}.\n"
           f"Together they have {a} + {b} = {r} {obj}.\n"
           f"#### {r}")
    return Problem(q, sol, r)


FAMILIES: dict[str, Callable[[random.Random, int], Problem]] = {
    "buy_and_give": _buy_and_give,
    "sold_in_two_parts": _sold_in_two_parts,
    "boxes": _boxes,
    "two_friends": _two_friends,
}


def split_of(question: str) -> str:
    bucket = int(hashlib.sha1(question.encode()).hexdigest()[:8], 16) % SPLIT_BUCKETS
    for split, (lo, hi) in SPLIT_RANGES.items():
        if lo <= bucket < hi:
            return split
    raise AssertionError(bucket)


class ArithTask:
    """Deterministic generator of word problems; ``problems(split, n)`` is reproducible."""

    def __init__(self, seed: int = 0, max_operand: int = 20, families: list[str] | None = None):
        families = list(families or FAMILIES)
        unknown = sorted(set(families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"data.families: unknown {unknown}; choose from {sorted(FAMILIES)}")
        if max_operand < 2:
            raise ValueError("data.max_operand must be >= 2")
        self.seed, self.max_operand, self.families = seed, max_operand, families

    def _stream(self, split: str) -> Iterator[Problem]:
        if split not in SPLIT_RANGES:
            raise ValueError(f"unknown split {split!r}; choose from {list(SPLIT_RANGES)}")
        rng = random.Random(f"{self.seed}:{split}")
        seen: set[str] = set()
        misses = 0
        while True:
            p = FAMILIES[rng.choice(self.families)](rng, self.max_operand)
            if p.question in seen or split_of(p.question) != split:
                misses += 1
                if misses > 100_000 + 100 * len(seen):
                    raise RuntimeError(f"arith: the {split} split ran out of distinct problems "
                                       f"after {len(seen)}; raise data.max_operand")
                continue
            seen.add(p.question)
            yield p

    def problems(self, split: str, n: int) -> list[Problem]:
        stream = self._stream(split)
        return [next(stream) for _ in range(n)]

    def examples(self, split: str, n: int) -> list[dict]:
        return [p.to_example() for p in self.problems(split, n)]

    def corpus(self, n: int = 2000) -> Iterator[str]:
        """Text for training the tokenizer (train split only)."""
        for p in self.problems("train", n):
            yield p.question
            yield p.solution
