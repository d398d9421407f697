"""Stage 1 module: MASK row training, losses, pinned curve, export."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid.backbones.spec import BackboneSpec
from fluid.data.arith import ArithTask
from fluid.data.sft import SFTDataset, collate_sft
from fluid.modules.hybrid import HybridDiffusionModule, combine, lane_losses

MASKING = {"_target_": "fluid.lanes.FluidSchedule", "anchor_prob": 0.5, "horizon": 4, "noise_prob": 0.1}


def make_module(ckpt, mask_token="<|mask|>", lora=None, lr=1e-2, masking=MASKING):
    spec = BackboneSpec(name="tiny-test", path=str(ckpt), mask_token=mask_token, dtype="float32")
    tok = AutoTokenizer.from_pretrained(ckpt)
    m = HybridDiffusionModule(spec, tok, masking=masking, optim={"lr": lr, "warmup_ratio": 0.0},
                              lora=lora or {}, attention="dense", seed=0)
    m.configure_model()
    return m, tok


def batch_for(tok, n=4):
    ds = SFTDataset(ArithTask(seed=0).examples("train", n), tok, 256)
    return collate_sft([ds[i] for i in range(n)], tok.pad_token_id)


def losses(m, batch, seed):
    lb = m.expand(batch, torch.Generator().manual_seed(seed))
    return lane_losses(m.forward_lanes(lb), lb)


def embedding_of(m, token_id):
    with torch.no_grad():
        return m.model(input_ids=torch.tensor([[token_id]]), output_hidden_states=True).hidden_states[0][0, 0].clone()


def test_added_mask_row_gets_gradient_and_changes(tiny_checkpoint):
    m, tok = make_module(tiny_checkpoint, mask_token="<|newmask|>")
    assert tok.convert_tokens_to_ids("<|newmask|>") == m.mask_token_id == len(tok) - 1
    mask0, other0 = embedding_of(m, m.mask_token_id), embedding_of(m, 5)
    opt = torch.optim.AdamW([p for p in m.model.parameters() if p.requires_grad], lr=1e-2)
    combine(losses(m, batch_for(tok), 0)).backward()
    grads = [p.grad for n, p in m.model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    opt.step()
    assert not torch.allclose(embedding_of(m, m.mask_token_id), mask0)
    torch.testing.assert_close(embedding_of(m, 5), other0)  # every other row stays frozen


def test_lora_freezes_base_weights(tiny_checkpoint):
    m, _ = make_module(tiny_checkpoint)
    trainable = [n for n, p in m.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    full, _ = make_module(tiny_checkpoint, lora={"enabled": False})
    assert all(p.requires_grad for p in full.model.parameters())


def _train(m, batch, steps, lr=1e-2):
    opt = torch.optim.AdamW([p for p in m.model.parameters() if p.requires_grad], lr=lr)
    curve = []
    for s in range(steps):
        parts = losses(m, batch, s)
        loss = combine(parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append((float(parts["ar_sum"].detach() / parts["ar_n"]), float(parts["diff_sum"].detach() / parts["diff_n"])))
    return curve


def test_overfitting_a_tiny_batch_drives_both_losses_down(tiny_checkpoint):
    torch.manual_seed(0)
    m, tok = make_module(tiny_checkpoint, lora={"enabled": False})
    curve = _train(m, batch_for(tok), 60, lr=3e-3)
    (ar0, diff0), (ar1, diff1) = curve[0], curve[-1]
    assert ar1 < 0.15 * ar0 and diff1 < 0.25 * diff0, curve[::10]


# A short loss curve on a fixed seed: an unintended change to the maths (expansion, mask,
# loss, data) fails here. Re-pin deliberately with `pytest tests/test_hybrid.py -k pinned -s`
# (last re-pinned when the arith default went from operands <= 30 to <= 20).
PINNED = [(6.1822, 6.2345), (5.8705, 5.8342), (5.3622, 5.3218), (4.5743, 4.5643), (4.1466, 4.0963)]


def test_pinned_short_loss_curve(tiny_checkpoint):
    torch.manual_seed(0)
    m, tok = make_module(tiny_checkpoint, lora={"enabled": False})
    curve = _train(m, batch_for(tok), 5)
    print("curve", [(round(a, 4), round(d, 4)) for a, d in curve])
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(PINNED), atol=2e-3, rtol=0)


def test_joint_and_separate_reductions():
    parts = {"ar_sum": torch.tensor(6.0), "ar_n": torch.tensor(3), "diff_sum": torch.tensor(2.0),
             "diff_n": torch.tensor(1)}
    assert float(combine(parts)) == pytest.approx(2.0)
    assert float(combine(parts, joint=False)) == pytest.approx(4.0)
    assert float(combine(parts, w_ar=0.0)) == pytest.approx(0.5)


def test_export_adapter_and_merged_checkpoint(tiny_checkpoint, tmp_path):
    m, tok = make_module(tiny_checkpoint, mask_token="<|newmask|>")
    _train(m, batch_for(tok), 3)
    m.model.eval()
    ids = torch.tensor([[1, 5, 9, m.mask_token_id, 7]])
    with torch.no_grad():
        ref = m.model(input_ids=ids, position_ids=torch.arange(5)[None]).logits
    out = m.export_hf(tmp_path / "checkpoint")
    # the adapter beside the merged model: a rank-16 LoRA (module defaults) with its A/B weights
    adapter = tmp_path / "adapter"
    lora_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert lora_cfg["peft_type"] == "LORA" and lora_cfg["r"] == 16 and lora_cfg["lora_alpha"] == 32
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any("q_proj.lora_A" in n for n in names) and any("down_proj.lora_B" in n for n in names), names[:8]
    meta = json.loads((out / "fluid.json").read_text())
    assert meta["stage"] == 1 and meta["mask_token_id"] == m.mask_token_id and meta["horizon"] == 4
    assert meta["adapter_dir"] == str(adapter.resolve())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.convert_tokens_to_ids("<|newmask|>") == m.mask_token_id
    with torch.no_grad():
        got = reloaded(input_ids=ids, position_ids=torch.arange(5)[None]).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_checkpoint):
    grads = []
    for on in (False, True):
        spec = BackboneSpec(name="tiny-test", path=str(tiny_checkpoint), mask_token="<|mask|>", dtype="float32")
        tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
        m = HybridDiffusionModule(spec, tok, masking=MASKING, optim={"lr": 1e-2}, attention="dense", seed=0,
                                  gradient_checkpointing=on)
        torch.manual_seed(0)  # the same LoRA initialisation both times
        m.configure_model()
        m.train()
        assert m.model.is_gradient_checkpointing == on
        lb = m.expand(batch_for(tok), torch.Generator().manual_seed(3))
        loss = combine(lane_losses(m.forward_lanes(lb), lb))
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, rel=1e-6) and g0 and g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n
