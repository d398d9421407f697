"""GSM8K-style answer extraction and exact match (docs/method.md section 6)."""

from __future__ import annotations

import re

# a number: thousands groups ("2,400"), decimals ("18.5", ".5"); "1,2,3" is three numbers
_NUM = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The number after the last ``####``, else the last number in the text."""
    if "####" in text:
        m = _NUM.search(text.rsplit("####", 1)[1])
        if m:
            return _normalise(m.group())
    nums = _NUM.findall(text)
    return _normalise(nums[-1]) if nums else None


def _normalise(num: str) -> str:
    num = num.replace(",", "").rstrip(".")
    if num.lstrip("-").startswith("."):
        num = num.replace(".", "0.", 1)
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num


def exact_match(prediction: str, reference: str) -> bool:
    pred = extract_answer(prediction)
    ref = extract_answer(reference)
    return pred is not None and pred == ref
