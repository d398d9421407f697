import re

import pytest

from fluid.data.arith import FAMILIES, ArithTask, split_of
from fluid.eval.answers import exact_match, extract_answer

EQ = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def _check(problem) -> None:
    lines = problem.solution.split("\n")
    assert lines[-1] == f"#### {problem.answer}"
    assert len(lines) >= 3
    eqs = EQ.findall(problem.solution)
    assert eqs, problem.solution
    for a, op, b, c in eqs:
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, problem.solution
    assert int(eqs[-1][3]) == problem.answer
    assert problem.answer >= 0


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_answers_are_correct_by_recomputation(split):
    for p in ArithTask(seed=3).problems(split, 400):
        _check(p)


def test_every_family_is_generated_and_correct():
    task = ArithTask(seed=1)
    for fam in FAMILIES:
        probs = ArithTask(seed=1, families=[fam]).problems("train", 50)
        assert len({p.question for p in probs}) == 50
        for p in probs:
            _check(p)
    assert task.families == list(FAMILIES)


def test_splits_never_overlap_and_are_deterministic():
    task = ArithTask(seed=0)
    qs = {s: [p.question for p in task.problems(s, 300)] for s in ("train", "validation", "test")}
    assert not set(qs["train"]) & set(qs["test"])
    assert not set(qs["train"]) & set(qs["validation"])
    assert not set(qs["validation"]) & set(qs["test"])
    for s, q in qs.items():
        assert all(split_of(x) == s for x in q)
        assert len(set(q)) == len(q)
    again = [p.question for p in ArithTask(seed=0).problems("test", 300)]
    assert again == qs["test"]
    other = [p.question for p in ArithTask(seed=1).problems("test", 300)]
    assert other != qs["test"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="data.families"):
        ArithTask(families=["nope"])
    with pytest.raises(ValueError, match="max_operand"):
        ArithTask(max_operand=1)


def test_answer_extraction():
    assert extract_answer("so 3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("#### 1,234") == "1234"
    assert extract_answer("the answer is 12.50") == "12.5"
    assert extract_answer("no numbers") is None
    assert exact_match("x = 5\n#### 5", "#### 5")
    assert not exact_match("#### 6", "5")
    assert not exact_match("nothing", "5")


def test_tokenizer_special_tokens_and_roundtrip(arith_tokenizer):
    tok = arith_tokenizer
    for name in ("bos_token", "eos_token", "pad_token", "mask_token"):
        assert getattr(tok, name) is not None
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id}
    assert len(ids) == 4
    p = ArithTask(seed=0).problems("test", 1)[0]
    msgs = p.to_example()["messages"]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text.startswith(tok.bos_token) and p.solution + tok.eos_token in text
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc) == text
    # digits are single tokens, so numbers are spelled digit by digit
    num = tok("12345", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in num] == list("12345")
    assert len(tok) <= 512


def test_tokenizer_cache_is_reused(cache_dir, arith_tokenizer):
    from fluid.data.tokenizer import build_arith_tokenizer

    again = build_arith_tokenizer(cache_dir)
    assert again.get_vocab() == arith_tokenizer.get_vocab()
    assert again.chat_template == arith_tokenizer.chat_template
