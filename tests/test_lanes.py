"""docs/method.md sections 1-3: lanes are invisible to main tokens, and each lane equals a separate
forward over its clean prefix plus its own slots; the fast mask equals the dense rule."""

import pytest
import torch

from fluid.lanes import FixedSchedule, FluidSchedule, FullLanes, dense_allowed, dense_float_mask, expand_lanes
from fluid.lanes.attention import lane_mask_mod
from fluid.lanes.expand import MAIN, PAD
from fluid.nn import IGNORE
from tests.conftest import LANE_VOCAB as VOCAB
from tests.conftest import MASK_ID as MASK
from tests.conftest import NOISE, PAD_ID, make_batch, tiny_model


def expand(schedule, seed=0, **kw):
    ids, labels, am = make_batch(**kw)
    lb = expand_lanes(ids, labels, am, schedule, mask_token_id=MASK, noise_token_ids=NOISE, pad_token_id=PAD_ID,
                      generator=torch.Generator().manual_seed(seed))
    return ids, labels, am, lb


def forward(model, lb):
    mask = dense_float_mask(lb, torch.float32)
    with torch.no_grad():
        return model(input_ids=lb.input_ids, attention_mask=mask, position_ids=lb.position_ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_invisibility_and_lane_equivalence(arch):
    model = tiny_model(arch, vocab_size=VOCAB)
    ids, labels, am, lb = expand(FluidSchedule(anchor_prob=0.5, horizon=5, noise_prob=0.3), seed=1)
    logits = forward(model, lb)
    n_lanes = 0
    for r in range(ids.shape[0]):
        n = int(am[r].sum())
        with torch.no_grad():
            plain = model(input_ids=ids[r:r + 1, :n], position_ids=torch.arange(n)[None]).logits[0]
        # invisibility: main-token logits equal the plain causal forward
        torch.testing.assert_close(logits[r, lb.main_index[r, :n]], plain, atol=1e-5, rtol=1e-4)
        # lane equivalence: x[0..i] followed by the lane's slot inputs
        for anchor in lb.lane[r][lb.lane[r] >= 0].unique().tolist():
            where = torch.nonzero(lb.lane[r] == anchor).flatten()
            seq = torch.cat([ids[r, : anchor + 1], lb.input_ids[r, where]])
            with torch.no_grad():
                sep = model(input_ids=seq[None], position_ids=torch.arange(len(seq))[None]).logits[0]
            torch.testing.assert_close(logits[r, where], sep[anchor + 1:], atol=1e-5, rtol=1e-4)
            n_lanes += 1
    assert n_lanes >= 3


def test_layout_positions_and_targets():
    ids, labels, am, lb = expand(FluidSchedule(horizon=4, noise_prob=0.0), seed=2)
    for r in range(ids.shape[0]):
        n = int(am[r].sum())
        main = lb.main_index[r, :n]
        assert torch.equal(lb.input_ids[r, main], ids[r, :n])
        assert torch.equal(lb.position_ids[r, main], torch.arange(n))
        assert torch.equal(lb.targets[r, main], labels[r, :n])
        slots = lb.valid[r] & ~lb.is_main[r]
        anchor, j = lb.lane[r, slots], lb.slot[r, slots]
        assert (j >= 1).all() and (j <= 4).all()
        assert torch.equal(lb.position_ids[r, slots], anchor + j)
        pos = anchor + j
        assert (pos <= n - 1).all()  # no slot (and so no target) past the end
        assert torch.equal(lb.targets[r, slots], labels[r, pos])
        assert (lb.targets[r, slots] != IGNORE).all()  # lanes stop at the last supervised position
        assert (labels[r, anchor] != IGNORE).all()  # anchors are supervised positions
        # MASK/noise never on a prompt or pad position: slot positions are all in the response
        first_sup = int(torch.nonzero(labels[r] != IGNORE)[0])
        assert (pos > first_sup).all()
        assert (lb.input_ids[r, ~lb.valid[r]] == PAD_ID).all() and (lb.lane[r, ~lb.valid[r]] == PAD).all()
        assert (lb.lane[r, main] == MAIN).all()


def test_restoration_and_noise_rates():
    sched = FixedSchedule(anchor_prob=0.6, horizon=6, restore_ratio=0.35, noise_prob=0.2)
    ids, labels, am = make_batch(lengths=(400,) * 8, prompt=(10,) * 8, seed=5)
    lb = expand_lanes(ids, labels, am, sched, mask_token_id=MASK, noise_token_ids=NOISE, pad_token_id=PAD_ID,
                      generator=torch.Generator().manual_seed(0))
    slots = lb.valid & ~lb.is_main
    n_slots = int(slots.sum())
    restored = lb.restored[slots].float().mean().item()
    assert abs(restored - 0.35) < 4 * (0.35 * 0.65 / n_slots) ** 0.5
    noised = lb.noised[slots].sum().item() / lb.restored[slots].sum().item()
    assert abs(noised - 0.2) < 0.03
    # unrestored slots are MASK; restored and un-noised ones hold the true token
    true_tok = torch.gather(ids, 1, lb.position_ids.clamp(max=ids.shape[1] - 1))
    assert (lb.input_ids[slots & ~lb.restored] == MASK).all()
    keep = slots & lb.restored & ~lb.noised
    assert torch.equal(lb.input_ids[keep], true_tok[keep])
    assert (lb.input_ids[slots & lb.noised] >= 4).all()  # noise is never a special token
    anchors = (lb.slot == 1).sum().item()
    sup = (labels != IGNORE).sum().item()
    assert abs(anchors / sup - 0.6) < 0.05


def test_fluid_schedule_uniform_ratio_and_lengths():
    sched = FluidSchedule(anchor_prob=0.5, horizon=16, noise_prob=0.1)
    ids, labels, am = make_batch(lengths=(600,) * 8, prompt=(2,) * 8, seed=6)
    lb = expand_lanes(ids, labels, am, sched, mask_token_id=MASK, noise_token_ids=NOISE, pad_token_id=PAD_ID,
                      generator=torch.Generator().manual_seed(1))
    slots = lb.valid & ~lb.is_main
    assert abs(lb.restored[slots].float().mean().item() - 0.5) < 0.05  # E[r] = 0.5
    lane_len = (lb.slot.max(dim=1).values)  # at least one full-length lane in a long row
    assert (lane_len == 16).all()
    expansion = lb.valid.sum().item() / am.sum().item()
    assert 4.5 < expansion < 6.0  # ~ 1 + 0.5 * 8.5 = 5.25 (docs/method.md section 1)


def test_determinism_and_budget():
    a = expand(FluidSchedule(), seed=3)[3]
    b = expand(FluidSchedule(), seed=3)[3]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    ids, labels, am = make_batch()
    lb = expand_lanes(ids, labels, am, FluidSchedule(anchor_prob=1.0), mask_token_id=MASK, noise_token_ids=NOISE,
                      pad_token_id=PAD_ID, generator=torch.Generator().manual_seed(0), max_expanded_len=30)
    assert lb.valid.sum(-1).max() <= 30
    for r in range(3):  # main tokens all kept
        n = int(am[r].sum())
        assert torch.equal(lb.input_ids[r, lb.main_index[r, :n]], ids[r, :n])
    with pytest.raises(ValueError, match="max_expanded_len"):
        expand_lanes(ids, labels, am, FluidSchedule(), mask_token_id=MASK, noise_token_ids=NOISE, pad_token_id=PAD_ID,
                     generator=torch.Generator().manual_seed(0), max_expanded_len=10)


def test_full_lanes_have_all_k_slots_unless_cut_by_the_end():
    ids, labels, am, lb = expand(FullLanes(anchor_prob=1.0, horizon=4), seed=0)
    assert not lb.restored.any() and not lb.noised.any()
    for r in range(ids.shape[0]):
        last_sup = int(torch.nonzero(labels[r] != IGNORE)[-1])
        for anchor in lb.lane[r][lb.lane[r] >= 0].unique().tolist():
            k = int((lb.lane[r] == anchor).sum())
            assert k == min(4, last_sup - anchor)


def test_dense_rule_equals_flex_mask_mod():
    from torch.nn.attention.flex_attention import create_mask

    _, _, _, lb = expand(FluidSchedule(horizon=5), seed=4)
    b, n = lb.input_ids.shape
    flex = create_mask(lane_mask_mod(lb), b, 1, n, n, device="cpu")[:, 0]
    assert torch.equal(flex, dense_allowed(lb))
    # and the rule itself: main queries never see a slot
    allowed = dense_allowed(lb)
    assert not (allowed & lb.is_main[:, :, None] & ~lb.is_main[:, None, :]).any()


def test_flex_attention_forward_matches_dense_on_cpu():
    """flex_attention has a CPU forward: compare its output with SDPA + the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    from fluid.lanes.attention import block_mask

    _, _, _, lb = expand(FluidSchedule(horizon=5), seed=5)
    b, n = lb.input_ids.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, 2, n, 16, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_allowed(lb)[:, None])
    out = flex_attention(q, k, v, block_mask=block_mask(lb, block_size=16))
    valid = lb.valid[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-4)
