"""data.responses=self: the backbone's own greedy responses become the supervised responses,
generated once, cached by model and prompt fingerprint, resumed after an interruption."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid.data import datamodule as dm
from fluid.data.selfdistill import self_responses
from fluid.data.sources import ArithSource
from fluid.decoding.ar import greedy_generate
from fluid.nn import IGNORE
from fluid.utils.errors import FluidConfigError


def data_module(ckpt, cache, **kw):
    tok = AutoTokenizer.from_pretrained(ckpt)
    settings = {"model": str(ckpt), "max_new_tokens": 6, "batch_size": 3, "cache_dir": str(cache),
                "keep_truncated": True, **kw}
    return dm.SFTDataModule(ArithSource(n_train=7, n_val=2, n_test=2), tok, batch_size=2, max_length=256,
                            responses="self", self_responses=settings), tok


def test_self_responses_are_the_models_greedy_continuations(tiny_checkpoint, tmp_path):
    d, tok = data_module(tiny_checkpoint, tmp_path / "cache")
    d.prepare_data()
    d.setup("fit")
    assert len(d.train_set) == 7 and len(d.val_set) == 2
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    gold = dm.SFTDataset(d.source.examples("train"), tok, 256)
    for item, g in zip(d.train_set.items, gold.items):
        n_prompt = next(i for i, lab in enumerate(g.labels) if lab != IGNORE) + 1
        prompt = g.input_ids[:n_prompt]
        assert item.input_ids[:n_prompt] == prompt  # the same chat-formatted prompt
        ref = greedy_generate(model, [prompt], max_new_tokens=6, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id).tokens[0]
        assert item.input_ids[n_prompt:n_prompt + len(ref)] == ref  # the response: the model's own
        assert item.labels[n_prompt - 1] == ref[0] and item.input_ids != g.input_ids
    assert len(list((tmp_path / "cache").glob("*.jsonl"))) == 2  # train and validation, no partial left


def test_a_rerun_reuses_the_cache_and_a_changed_model_does_not(tiny_checkpoint, tmp_path, monkeypatch):
    d, _ = data_module(tiny_checkpoint, tmp_path / "cache")
    d.setup("fit")
    first = [it.input_ids for it in d.train_set.items]
    calls = []
    monkeypatch.setattr("fluid.data.selfdistill._generate", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("generated again")))
    again, _ = data_module(tiny_checkpoint, tmp_path / "cache")
    again.setup("fit")
    assert [it.input_ids for it in again.train_set.items] == first and not calls
    st = (tiny_checkpoint / "config.json").stat()  # the model changed (a retrained checkpoint): a new key
    os.utime(tiny_checkpoint / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(AssertionError, match="generated again"):
        data_module(tiny_checkpoint, tmp_path / "cache")[0].setup("fit")


def test_an_interrupted_generation_resumes(tiny_checkpoint, tmp_path, monkeypatch):
    from fluid.data import selfdistill
    from fluid.data.selfdistill import SelfResponses

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    prompts = [tok(f"{a} + 1", add_special_tokens=False)["input_ids"] for a in range(5)]
    s = SelfResponses(model=str(tiny_checkpoint), max_new_tokens=4, batch_size=2, cache_dir=str(tmp_path))
    full = self_responses(s, prompts, tok.eos_token_id, tok.pad_token_id)
    final = next(tmp_path.glob("*.jsonl"))
    rows = final.read_text().splitlines()
    final.unlink()  # as if killed after 3 responses (and half a line)
    partial = final.with_name(final.name.replace(".jsonl", ".partial.jsonl"))
    partial.write_text("\n".join(rows[:3]) + "\n" + rows[3][:10])
    seen = []
    real = selfdistill._generate
    monkeypatch.setattr(selfdistill, "_generate", lambda st, p, todo, *a, **k: seen.append(sorted(todo)) or
                        real(st, p, todo, *a, **k))
    again = self_responses(s, prompts, tok.eos_token_id, tok.pad_token_id)
    assert again == full and seen == [[json.loads(r)["index"] for r in rows[3:]]]
    assert not partial.exists()


def test_bad_self_response_settings_are_one_line_errors(tiny_checkpoint, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    with pytest.raises(FluidConfigError, match="data.responses: unknown 'silver'"):
        dm.SFTDataModule(ArithSource(n_train=2), tok, responses="silver")
    with pytest.raises(FluidConfigError, match="data.self_responses.model: .* is not a model directory"):
        dm.SFTDataModule(ArithSource(n_train=2, n_val=2), tok, responses="self",
                         self_responses={"model": str(tmp_path / "nowhere"), "cache_dir": str(tmp_path)}).setup("fit")
    d, _ = data_module(tiny_checkpoint, tmp_path / "c2", keep_truncated=False, max_new_tokens=2)
    with pytest.raises(FluidConfigError, match="without EOS"):  # a random model never says EOS in 2 tokens
        d.setup("fit")
