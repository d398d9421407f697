import pytest
import torch

from fluid.data.arith import ArithTask
from fluid.data.sft import IGNORE, SFTDataset, collate_sft, encode_chat, encode_prompt


def test_response_only_targets_are_next_tokens(arith_tokenizer):
    tok = arith_tokenizer
    ex = ArithTask(seed=0).examples("train", 1)[0]
    enc = encode_chat(tok, ex["messages"])
    prompt = encode_prompt(tok, ex["messages"])
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.input_ids[-1] == tok.eos_token_id
    for i, lab in enumerate(enc.labels):
        if i < len(prompt) - 1 or i == len(enc.input_ids) - 1:
            assert lab == IGNORE
        else:
            assert lab == enc.input_ids[i + 1]
    supervised = tok.decode([lab for lab in enc.labels if lab != IGNORE])
    assert supervised == ex["messages"][1]["content"] + tok.eos_token


def test_collate_pads_without_leaking(arith_tokenizer):
    tok = arith_tokenizer
    ds = SFTDataset(ArithTask(seed=0).examples("train", 5), tok, max_length=256)
    batch = collate_sft([ds[i] for i in range(5)], tok.pad_token_id)
    lengths = batch["attention_mask"].sum(-1)
    for r in range(5):
        n = int(lengths[r])
        assert (batch["input_ids"][r, n:] == tok.pad_token_id).all()
        assert (batch["labels"][r, n - 1:] == IGNORE).all()
        assert torch.equal(batch["input_ids"][r, :n], torch.tensor(ds[r].input_ids))


def test_overlong_examples_are_dropped_and_counted(arith_tokenizer):
    exs = ArithTask(seed=0).examples("train", 20)
    ds = SFTDataset(exs, arith_tokenizer, max_length=70)
    assert ds.dropped > 0 and len(ds) + ds.dropped == 20
    assert all(len(e.input_ids) <= 70 for e in ds.items)
    with pytest.raises(ValueError, match="max_length"):
        SFTDataset(exs, arith_tokenizer, max_length=5)


def test_example_must_end_with_assistant(arith_tokenizer):
    with pytest.raises(ValueError, match="assistant"):
        encode_chat(arith_tokenizer, [{"role": "user", "content": "hi"}])
