"""The FLUID window rules (fluid.decoding.window), one pure function at a time."""

import numpy as np

from fluid.decoding import window as W

M = 99  # MASK


def test_seed_blocks_takes_confident_lane_drafts_inside_the_horizon():
    exact, k = np.array([7, 8]), np.array([3, 4])
    lane_p = np.array([[0.9, 0.9, 0.2, 0.9, 0.9], [-1.0, 0.8, 0.8, 0.8, 0.8]])
    lane_tok = np.array([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    win, filled = W.seed_blocks(exact, k, 5, M, lane_p, lane_tok, threshold=0.5)
    # slot 0 is always exact; slot 2 of row 0 is not confident; slots >= k stay MASK
    assert win.tolist() == [[7, 2, M, M, M], [8, 2, 3, 4, M]]
    assert filled.tolist() == [[True, True, False, False, False], [True, True, True, True, False]]
    win, filled = W.seed_blocks(exact, k, 5, M)
    assert win.tolist() == [[7, M, M, M, M], [8, M, M, M, M]] and filled.sum() == 2


def test_window_inputs_pad_each_row_to_block_plus_lane():
    win = np.array([[1, 2, 3, M], [4, 5, M, M]])
    ids, qlen = W.window_inputs(win, blen=np.array([3, 1]), lane=np.array([2, 0]), mask_id=M)
    assert qlen.tolist() == [5, 1]
    assert ids.tolist() == [[1, 2, 3, M, M], [4, M, M, M, M]]  # row 1: slot 1 is past its block


def test_verified_run_stops_at_a_wrong_draft_or_an_empty_slot():
    win = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, M, 4], [1, 2, 3, 4]])
    filled = win != M
    ar = np.array([[2, 3, 4, 0], [2, 9, 4, 0], [2, 3, 4, 0], [2, 3, 4, 0]])  # ar[:, s] predicts slot s + 1
    blen = np.array([4, 4, 4, 2])
    assert W.verified_run(win, filled, blen, ar).tolist() == [4, 2, 2, 2]
    # without verification a filled run is committed as it is
    assert W.verified_run(win, filled, blen, ar, verify=False).tolist() == [4, 4, 2, 2]
    # slot 0 is always committed
    assert W.verified_run(win, filled, blen, np.zeros_like(ar)).tolist() == [1, 1, 1, 1]


def test_block_outcome():
    filled = np.array([[True, True, True], [True, True, True], [True, False, False]])
    complete, mismatch, cont = W.block_outcome(filled, c=np.array([3, 1, 1]), blen=np.array([3, 3, 3]))
    assert complete.tolist() == [True, False, False]
    assert mismatch.tolist() == [False, True, False]   # stopped at a filled (wrong) slot
    assert cont.tolist() == [False, False, True]       # stopped at the first empty slot


def test_fill_later_drafts_only_confident_empty_slots_after_the_run():
    win = np.array([[1, M, M, M, 5], [1, M, M, M, M]])
    filled = win != M
    top_p = np.array([[0.1, 0.1, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9, 0.9]])
    ar = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    out, f = W.fill_later(win, filled, c=np.array([1, 1]), blen=np.array([5, 3]), top_p=top_p, ar=ar,
                          threshold=0.5, rows=np.array([True, False]))
    # row 0: slot 1 is the first empty slot (it gets the exact token on the shift), slot 2 is not
    # confident, slot 3 is, slot 4 was filled; row 1 does not continue
    assert out.tolist() == [[1, M, M, 12, 5], [1, M, M, M, M]]
    assert f[0].tolist() == [True, False, False, True, True] and f[1].sum() == 1
    assert win[0, 3] == M  # pure: the inputs are unchanged


def test_shift_window_moves_the_exact_token_to_slot_0():
    win = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    filled = np.array([[True, True, False, True], [True, True, True, True]])
    out, f = W.shift_window(win, filled, c=np.array([2, 4]), nxt=np.array([30, 50]), mask_id=M)
    assert out.tolist() == [[30, 4, M, M], [50, M, M, M]]
    assert f.tolist() == [[True, True, False, False], [True, False, False, False]]


def test_lane_drafts_read_the_lane_after_a_whole_block():
    top_p = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    ar = np.array([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    p, t = W.lane_drafts(top_p, ar, c=np.array([3, 2]), rows=np.array([True, False]), lane_len=2, width=4)
    # row 0 accepted 3 slots: slot s of the next block is predicted at column 2 + s, the lane has 2 slots
    assert p[0].tolist() == [0.3, 0.4, 0.5, -1.0] and t[0, :3].tolist() == [12, 13, 14]
    assert (p[1] == -1.0).all()


def test_prefill_drafts():
    p, t = W.prefill_drafts(np.array([[0.5, 0.6, 0.7]]), np.array([[4, 5, 6]]), width=5, mask_id=M)
    assert p.tolist() == [[0.5, 0.6, 0.7, -1.0, -1.0]] and t.tolist() == [[4, 5, 6, M, M]]
