"""Stage 2 maths: K* against a brute-force loop, soft labels, lane gathering, the head."""

import math

import pytest
import torch

from fluid.khead import KHead, k_star, kl_to_soft_labels, lane_slot_losses, soft_labels
from fluid.lanes import FullLanes, expand_lanes
from tests.conftest import LANE_VOCAB as VOCAB
from tests.conftest import MASK_ID as MASK
from tests.conftest import NOISE, PAD_ID, make_batch, tiny_model


def brute_k_star(losses, valid, tau):
    out = []
    for lane_l, lane_v in zip(losses.tolist(), valid.tolist()):
        best = 1
        for k in range(1, len(lane_l) + 1):
            if sum(x if v else 0.0 for x, v in zip(lane_l[:k], lane_v[:k])) / k < tau:
                best = k
        out.append(best)
    return torch.tensor(out)


@pytest.mark.parametrize("tau", [0.5, 1.5, 2.8, 4.0])
def test_k_star_matches_brute_force(tau):
    g = torch.Generator().manual_seed(int(tau * 10))
    losses = torch.rand(300, 8, generator=g) * 6
    cut = torch.randint(1, 9, (300,), generator=g)  # lanes cut by the sequence end
    valid = torch.arange(8)[None, :] < cut[:, None]
    assert torch.equal(k_star(losses, valid, tau), brute_k_star(losses, valid, tau))


def test_k_star_is_not_capped_by_the_response_end():
    """Slots past the end count as loss 0 (DESIGN section 2): a lane with 2 slots left whose
    losses are low gets the full horizon, not 2; a lane whose real slots are too costly does not."""
    losses = torch.tensor([[0.5, 1.0, 7.0, 7.0, 7.0, 7.0], [9.0, 9.0, 0.0, 0.0, 0.0, 0.0], [4.0, 4.0, 0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 6, [True, True] + [False] * 4, [True, True] + [False] * 4])
    # lane 1: means 9, 9, 6, 4.5, 3.6, 3 -> none < 2.8 -> 1; lane 2: 4, 4, 2.67, 2, 1.6, 1.33 -> 6
    assert k_star(losses, valid, 2.8).tolist() == [2, 1, 6]


def test_k_star_at_least_one_and_non_monotone_means():
    losses = torch.tensor([[9.0, 9.0, 9.0], [0.1, 5.0, 0.1], [3.0, 0.1, 0.1]])
    valid = torch.ones(3, 3, dtype=torch.bool)
    # lane 0: every prefix mean >= tau -> 1; lane 1: means 0.1, 2.55, 1.73 -> 3; lane 2: 3, 1.55, 1.07 -> 3
    assert k_star(losses, valid, 2.0).tolist() == [1, 3, 3]
    assert k_star(losses, valid, 0.05).tolist() == [1, 1, 1]


def test_soft_labels_sum_to_one_and_peak_at_k_minus_one():
    kstar = torch.arange(1, 17)
    q = soft_labels(kstar, 16, sigma=1.5)
    torch.testing.assert_close(q.sum(-1), torch.ones(16))
    assert torch.equal(q.argmax(-1), kstar - 1)
    c = 3
    expect = math.exp(-(c - 4) ** 2 / (2 * 1.5**2))  # K*=5 -> centre 4, relative to the peak
    assert q[4, c].item() / q[4, 4].item() == pytest.approx(expect, rel=1e-5)


def test_kl_is_zero_at_the_target_and_positive_elsewhere():
    q = soft_labels(torch.tensor([3, 7]), 8)
    assert kl_to_soft_labels(torch.log(q), q).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_soft_labels(torch.zeros(2, 8), q).item() > 0.1


def test_lane_slot_losses_gathers_each_lane_in_order():
    ids, labels, am = make_batch(lengths=(30, 22, 12), prompt=(4, 3, 5), seed=7)
    lb = expand_lanes(ids, labels, am, FullLanes(anchor_prob=0.6, horizon=5), mask_token_id=MASK,
                      noise_token_ids=NOISE, pad_token_id=PAD_ID, generator=torch.Generator().manual_seed(0))
    ce = torch.rand(lb.input_ids.shape)
    losses, valid, (rows, idx) = lane_slot_losses(ce, lb, 5)
    assert len(rows) == int((lb.slot == 1).sum())
    for a in range(len(rows)):
        r, i = int(rows[a]), int(idx[a])
        assert lb.is_main[r, i]
        anchor_pos = int(lb.position_ids[r, i])
        where = torch.nonzero(lb.lane[r] == anchor_pos).flatten()
        k = len(where)
        torch.testing.assert_close(losses[a, :k], ce[r, where])
        assert valid[a, :k].all() and not valid[a, k:].any()
        assert (losses[a, k:] == 0).all()


def test_head_shape_predict_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    head = KHead(64, 16)
    assert (head.net[0].in_features, head.net[0].out_features, head.net[2].out_features) == (64, 64 // 4, 16)
    h = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)) * 4
    # the class with the largest logit, as a horizon (class c is K = c + 1), clamped to [k_min, k_max]
    argmax_k = head(h).argmax(-1) + 1
    assert torch.equal(head.predict_k(h), argmax_k)
    k = head.predict_k(h, k_min=4, k_max=12)
    assert torch.equal(k, argmax_k.clamp(4, 12))
    assert (argmax_k < 4).any() and (argmax_k > 12).any()  # both ends of the clamp are exercised
    path = head.save(tmp_path)
    again = KHead.load(path)
    torch.testing.assert_close(again(h), head(h))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_prefix_frozen_forward_equals_the_expanded_one(arch):
    """Stage 2's CPU path (causal forward + each lane over its row's cache) gives the anchor
    states, per-slot losses and K* of the forward over the expanded batch, lanes cut by the end
    of the sequence included, whatever the lane chunk."""
    from fluid.khead.frozen import expanded_lane_losses, prefix_lane_losses

    model = tiny_model(arch, vocab_size=VOCAB, seed=3)
    ids, labels, am = make_batch(lengths=(30, 22, 12), prompt=(4, 3, 5), seed=8)
    lb = expand_lanes(ids, labels, am, FullLanes(anchor_prob=0.6, horizon=6), mask_token_id=MASK,
                      noise_token_ids=NOISE, pad_token_id=PAD_ID, generator=torch.Generator().manual_seed(1))
    h_e, l_e, v_e = expanded_lane_losses(model, lb, 6)
    assert bool((~v_e[:, -1]).any())  # some lane is cut by the end
    for chunk in (1, 5, 1000):
        h_p, l_p, v_p = prefix_lane_losses(model, ids, am, lb, 6, MASK, lane_chunk=chunk)
        assert torch.equal(v_p, v_e)
        torch.testing.assert_close(h_p, h_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l_p, l_e, atol=1e-5, rtol=1e-5)
        assert torch.equal(k_star(l_p, v_p, 3.0), k_star(l_e, v_e, 3.0))
