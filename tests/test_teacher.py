"""Lane targets from the teacher (``stage.module.loss.lane_target=teacher``): a slot at position
``p`` is trained toward the original model's next-token distribution after the real prefix
``x[0..p]``; the loss is zero when the slot's logits are the teacher's; the two-pass step has
the expanded forward's losses and gradients; depth weights and top-k are what they say."""

import pytest
import torch
from transformers import AutoTokenizer

import tests.test_exact as exact_tests
from fluid.backbones.spec import BackboneSpec
from fluid.modules.hybrid import HybridDiffusionModule, LaneLoss, combine, lane_losses, slot_weights, teacher_kl
from tests.test_exact import LANES, MASKING, batch, original_logits, train_step

original = exact_tests.original  # the fixture: a tiny Llama, Qwen2 and Qwen3 original model

TEACHER = {"lane_target": "teacher"}


def module(ckpt, loss=None, lora=LANES):
    spec = BackboneSpec(name="tiny-test", path=str(ckpt), mask_token="<|newmask|>", dtype="float32")
    m = HybridDiffusionModule(spec, AutoTokenizer.from_pretrained(ckpt), masking=MASKING, lora=lora,
                              optim={"lr": 3e-2, "warmup_ratio": 0.0}, attention="dense", seed=0,
                              loss=loss or dict(TEACHER))
    m.configure_model()
    return m


def expected_teacher_kl(m, lb, slot_logits_all, ref):
    """KL(original model's distribution at the slot's position || slot), summed over slots with a target,
    written out slot by slot."""
    v = ref.shape[-1]
    total = torch.zeros(())
    n = 0
    for r in range(lb.input_ids.shape[0]):
        for i in range(lb.input_ids.shape[1]):
            if lb.is_main[r, i] or not lb.valid[r, i] or lb.targets[r, i] < 0:
                continue
            p = int(lb.position_ids[r, i])
            q = torch.log_softmax(ref[r, p], -1)
            s = torch.log_softmax(slot_logits_all[r, i].float(), -1)[:v]
            total = total + (q.exp() * (q - s)).sum()
            n += 1
    return total, n


def test_teacher_targets_are_the_original_models_logits_at_the_slots_position(original):
    m = module(original)
    b = batch(m.tokenizer, n=3)
    train_step(m, b, seed=7)  # lanes differ from the main tokens
    ref = original_logits(original, b["input_ids"], b["attention_mask"])
    lb = m.expand(b, torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = m.forward_lanes(lb)
        want, n = expected_teacher_kl(m, lb, logits, ref)
        got_expanded = lane_losses(logits, lb, m.loss_cfg)
        assert m.two_pass()
        got_two_pass = m.lane_parts(lb)
    assert n > 0 and int(got_two_pass["diff_n"]) == n
    torch.testing.assert_close(got_expanded["diff_sum"], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_two_pass["diff_sum"], want, rtol=1e-4, atol=1e-4)


def test_two_pass_teacher_step_has_the_expanded_forwards_gradients(original):
    m = module(original, loss={**TEACHER, "depth_decay": 2.0})
    b = batch(m.tokenizer, n=3)
    train_step(m, b, seed=7)
    params = [p for p in m.model.parameters() if p.requires_grad]
    lb = m.expand(b, torch.Generator().manual_seed(5))

    def grads(parts):
        m.model.zero_grad()
        combine(parts).backward()
        return [p.grad.clone() for p in params]

    ref = lane_losses(m.forward_lanes(lb), lb, m.loss_cfg)
    g_ref = grads(ref)
    got = m.lane_parts(lb)
    g_got = grads(got)
    torch.testing.assert_close(got["diff_sum"], ref["diff_sum"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["diff_n"], ref["diff_n"])
    assert int(got["slot1_n"]) == int(ref["slot1_n"]) > 0 and int(got["slot1_hit"]) == int(ref["slot1_hit"])
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_lane_loss_is_zero_when_the_slots_logits_are_the_teachers(original):
    m = module(original)
    b = batch(m.tokenizer, n=2)
    lb = m.expand(b, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = m.forward_lanes(lb).clone()
    raw = logits.clone()
    # every slot gets the logits of the main token at its position: the teacher's distribution
    for r in range(lb.input_ids.shape[0]):
        for i in range(lb.input_ids.shape[1]):
            if lb.valid[r, i] and not lb.is_main[r, i]:
                logits[r, i] = logits[r, lb.main_index[r, lb.position_ids[r, i]]]
                logits[r, i, m.loss_cfg.teacher_vocab:] = torch.finfo(logits.dtype).min  # rows the original lacks
    parts = lane_losses(logits, lb, m.loss_cfg)
    assert float(parts["diff_n"]) > 0
    assert abs(float(parts["diff_sum"])) < 1e-4
    assert int(parts["slot1_hit"]) == int(parts["slot1_n"]) > 0
    # a mixing weight: teacher_weight * KL + (1 - teacher_weight) * cross-entropy on the token
    cfgs = {w: LaneLoss(lane_target="teacher", teacher_weight=w, teacher_vocab=m.loss_cfg.teacher_vocab)
            for w in (1.0, 0.25)}
    kl, mixed = (lane_losses(raw, lb, cfgs[w])["diff_sum"] for w in (1.0, 0.25))
    token = lane_losses(raw, lb, LaneLoss())["diff_sum"]
    assert float(kl) > 0 and float(token) > float(kl)
    torch.testing.assert_close(mixed, 0.25 * kl + 0.75 * token, rtol=1e-4, atol=1e-4)


def test_depth_weights_and_topk():
    w = slot_weights(torch.tensor([1, 2, 3]), 2.0)
    torch.testing.assert_close(w, torch.exp(-torch.tensor([0.0, 0.5, 1.0])))
    assert slot_weights(torch.tensor([1, 5]), None).tolist() == [1.0, 1.0]
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    full = teacher_kl(s, t)
    assert (full > 0).all() and teacher_kl(t, t).abs().max() < 1e-5
    top = teacher_kl(s, t, topk=5)
    idx = t.topk(5, -1).indices
    q = torch.softmax(torch.gather(t, 1, idx), -1)
    want = (q * (q.log() - torch.gather(torch.log_softmax(s, -1), 1, idx))).sum(-1)
    torch.testing.assert_close(top, want)


def test_teacher_targets_need_exact_mode(original):
    with pytest.raises(ValueError, match="lora.scope=lanes"):
        module(original, lora={**LANES, "scope": "all"})
