import json
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from fluid.data.arith import ArithTask
from fluid.data.sft import IGNORE, SFTDataset, collate_sft, encode_chat, encode_prompt
from fluid.utils.errors import FluidConfigError
from tests.conftest import compose_cfg


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


# --------------------------------------------------------------------- sources
def write_gsm8k(d: Path, n_train: int = 6, n_test: int = 3) -> Path:
    """A tiny GSM8K-format folder (train.jsonl, test.jsonl) written by the test itself."""
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with (d / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps(_gsm8k_row(i)) + "\n")
    return d


def _gsm8k_row(i: int) -> dict:
    return {"question": f"Tom has {i} apples and buys 2 more. How many apples does Tom have?",
            "answer": f"Tom has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"}


def write_jsonl(path: Path, n: int = 12) -> Path:
    """A tiny prompt/response JSONL file."""
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n")
    return path


def test_gsm8k_reads_the_local_dir_given_by_config(tmp_path, monkeypatch):
    monkeypatch.delenv("FLUID_DATA", raising=False)
    d = write_gsm8k(tmp_path / "mine", n_train=6, n_test=3)
    cfg = compose_cfg(["data=gsm8k", f"data.source.data_dir={d}", "data.source.n_val=2"], tmp_path)
    src = instantiate(cfg.data.source)
    assert [len(src.examples(s)) for s in ("train", "validation", "test")] == [4, 2, 3]
    ex = src.examples("test")[0]
    assert ex["answer"] == "2" and ex["messages"][0]["content"] == _gsm8k_row(0)["question"]
    assert "<<" not in ex["messages"][1]["content"]  # calculator annotations stripped


def test_gsm8k_local_dir_defaults_to_FLUID_DATA(tmp_path, monkeypatch):
    write_gsm8k(tmp_path / "data" / "gsm8k", n_train=5, n_test=2)
    monkeypatch.setenv("FLUID_DATA", str(tmp_path / "data"))
    cfg = compose_cfg(["data=gsm8k", "data.source.n_val=1"], tmp_path)
    src = instantiate(cfg.data.source)
    assert [len(src.examples(s)) for s in ("train", "validation", "test")] == [4, 1, 2]


def test_gsm8k_without_local_copy_or_datasets_is_one_line(tmp_path, monkeypatch, arith_tokenizer):
    monkeypatch.delenv("FLUID_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    cfg = compose_cfg(["data=gsm8k"], tmp_path)
    dm = instantiate(cfg.data, tokenizer=arith_tokenizer, _recursive_=True)  # nothing is read yet
    with pytest.raises(FluidConfigError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.source.data_dir:")
    assert "FLUID_DATA" in msg and "data.source.data_dir=" in msg  # the local way
    assert "datasets" in msg and "openai/gsm8k" in msg  # the hub way


def test_gsm8k_loads_the_hub_copy_through_datasets(tmp_path, monkeypatch):
    monkeypatch.delenv("FLUID_DATA", raising=False)
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"train": [_gsm8k_row(i) for i in range(5)], "test": [_gsm8k_row(9)]}[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = instantiate(compose_cfg(["data=gsm8k", "data.source.n_val=1"], tmp_path).data.source)
    assert [len(src.examples(s)) for s in ("train", "validation", "test")] == [4, 1, 1]
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]


def test_gsm8k_hub_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("FLUID_DATA", raising=False)

    def load_dataset(path, name, split):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub\n(offline?)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = instantiate(compose_cfg(["data=gsm8k"], tmp_path).data.source)
    with pytest.raises(FluidConfigError) as e:
        src.examples("train")
    assert "\n" not in str(e.value) and "Couldn't reach" in str(e.value) and "FLUID_DATA" in str(e.value)


def test_missing_jsonl_fails_at_setup_with_one_line(tmp_path, arith_tokenizer):
    cfg = compose_cfg(["data=jsonl", f"data.source.train_path={tmp_path}/none.jsonl"], tmp_path)
    dm = instantiate(cfg.data, tokenizer=arith_tokenizer, _recursive_=True)
    with pytest.raises(FluidConfigError) as e:
        dm.setup("fit")
    assert str(e.value).startswith("data.source.train_path:") and "\n" not in str(e.value)
