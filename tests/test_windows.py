"""Window-grid math, strided views, blending weights and patch-then-stitch identity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kernels.windows import (
    WindowGrid,
    accumulate_windows,
    blend_depth,
    gaussian_weights,
    grid_padding,
    grid_starts,
    n_covering_windows,
    n_full_windows,
    overlap_add,
    pad_array,
    pad_kwargs,
    stitch_windows,
    weight_sum,
    window_starts,
    window_view,
)


@pytest.mark.parametrize("length,size,stride", [
    (100, 32, 32), (100, 32, 16), (64, 64, 64), (63, 64, 64), (130, 32, 40), (7, 3, 1),
])
def test_counts_match_brute_force(length, size, stride):
    starts = range(0, length, stride)
    full = [s for s in starts if s + size <= length]
    assert n_full_windows(length, size, stride) == len(full)
    np.testing.assert_array_equal(window_starts(length, size, stride), full)
    # covering: every pixel reachable by the grid is in some window, and no window is extra
    cover = window_starts(length, size, stride, partial=True)
    assert len(cover) == n_covering_windows(length, size, stride)
    hit = np.zeros(length, bool)
    for s in cover:
        hit[s:s + size] = True
    reachable = np.zeros(length, bool)
    for s in starts:
        reachable[s:s + size] = True
    np.testing.assert_array_equal(hit, reachable)
    if len(cover) > 1:  # dropping the last covering window would uncover a pixel
        hit2 = np.zeros(length, bool)
        for s in cover[:-1]:
            hit2[s:s + size] = True
        assert not hit2.all() or stride > size


@pytest.mark.parametrize("chunks", [(37, 37, 26), (100,), (10,) * 10, (1, 50, 49)])
@pytest.mark.parametrize("stride", [16, 32, 40])
def test_block_ranges_assign_every_window_exactly_once(chunks, stride):
    grid = WindowGrid((100,), (32,), (stride,))
    bounds = np.cumsum((0,) + chunks)
    got = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        k0, k1 = grid.block_range(0, int(lo), int(hi))
        got += list(range(k0, k1))
        for k in range(k0, k1):  # the block owns the window start
            assert lo <= k * stride < hi
    assert got == list(range(grid.counts[0]))


def test_halo_rule_for_aligned_blocks():
    # with chunk boundaries on multiples of the stride, the windows starting in a block
    # read at most size - stride pixels past it
    size, stride = 64, 16
    grid = WindowGrid((1024,), (size,), (stride,))
    for lo in range(0, 1024, 128):
        k0, k1 = grid.block_range(0, lo, lo + 128)
        a, b = grid.span(0, k0, k1)
        assert a == lo and b - (lo + 128) <= size - stride


@pytest.mark.parametrize("size,stride", [(64, 32), (64, 16), (64, 64), (48, 32), (5, 2)])
def test_blend_depth_covers_every_window_touching_the_core(size, stride):
    d = blend_depth(size, stride)
    a, b = 5 * stride, 9 * stride  # a block core on grid boundaries
    for s in range(-10 * stride, 20 * stride, stride):
        touches = s < b and s + size > a
        if touches:
            assert s >= a - d and s + size <= b + d


def test_coverage_and_partial_counts():
    g = WindowGrid((100, 130), (64, 64), (64, 64))
    assert g.counts == (1, 2) and g.n_windows == 2
    assert g.n_partial == 2 * 3 - 2
    assert g.covered_share == pytest.approx((64 / 100) * (128 / 130))
    p = WindowGrid((100, 130), (64, 64), (64, 64), partial=True)
    assert p.counts == (2, 3) and p.covered_share == 1.0


def test_window_view_is_a_view_with_the_right_windows():
    x = np.arange(2 * 10 * 12, dtype=np.float32).reshape(2, 10, 12)
    w = window_view(x, (1, 2), (4, 5), (3, 2), offset=(1, 0))
    assert np.shares_memory(w, x) and not w.flags.writeable
    assert w.shape == (2, 2, 4, 4, 5)
    for v, i, j in itertools.product(range(2), range(2), range(4)):
        np.testing.assert_array_equal(w[v, i, j], x[v, 1 + 3 * i:1 + 3 * i + 4, 2 * j:2 * j + 5])
    with pytest.raises(ValueError, match="exceed"):
        window_view(x, (1,), (4,), (3,), count=(4,))


def test_gaussian_weights_positive_peaked_and_cached():
    w = gaussian_weights((64, 64))
    assert w.dtype == np.float32 and w.shape == (64, 64)
    assert (w > 0).all() and w.max() == pytest.approx(1.0)
    assert w[32, 32] > w[0, 0] and w[0, 0] == w[-1, -1]
    assert gaussian_weights((64, 64)) is w and not w.flags.writeable
    tiny = gaussian_weights((200,), sigma_scale=0.01)  # exp() underflows far from the centre
    assert (tiny > 0).all()


@pytest.mark.parametrize("weights", [None, "gaussian"])
def test_patch_then_stitch_is_identity(weights):
    rng = np.random.default_rng(0)
    img = rng.random((2, 96, 80)).astype(np.float32)
    size, stride = (32, 32), (16, 16)
    starts = grid_starts(img.shape[1:], size, stride)
    win = window_view(img, (1, 2), size, stride)  # (C, nH, nW, 32, 32)
    preds = np.stack([win[:, i // 16, j // 16] for i, j in starts])
    w = gaussian_weights(size) if weights else None
    out = stitch_windows(preds, starts, img.shape[1:], w)
    np.testing.assert_allclose(out, img, rtol=1e-6, atol=1e-6)
    ws = weight_sum(img.shape[1:], starts, size, w)
    assert (ws > 0).all()


def test_stitch_marks_uncovered_pixels_nan():
    preds = np.ones((1, 4, 4), np.float32)
    out = stitch_windows(preds, [(0, 0)], (6, 6))
    assert np.isnan(out[4:, :]).all() and (out[:4, :4] == 1).all()


# -- the padded grid of predict ---------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 70), st.data())
def test_grid_padding_gives_every_pixel_the_windows_of_an_endless_grid(n, size, data):
    stride = data.draw(st.integers(1, size))
    before, after, count = grid_padding(n, size, stride)
    assert before + n + after == (count - 1) * stride + size  # the grid tiles the padding
    assert 0 <= after - before <= 1  # split equally, the odd pixel after
    starts = -before + stride * np.arange(count)
    # an endless grid with the same phase: every window touching the array is in ours
    endless = -before + stride * np.arange(-(n + size), n + size)
    touching = endless[(endless < n) & (endless + size > 0)]
    assert set(touching) <= set(starts)
    # and the fewest such windows: dropping either end window loses the margin
    margin = size - stride
    assert before >= margin and after >= margin
    if count > 1:
        assert (count - 2) * stride + size < n + 2 * margin


def test_grid_padding_refuses_gaps_and_empty_axes():
    with pytest.raises(ValueError, match="stride"):
        grid_padding(10, 4, 5)
    with pytest.raises(ValueError, match="length"):
        grid_padding(0, 4, 2)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 12), st.integers(0, 40), st.integers(0, 40),
       st.sampled_from(["reflect", "nearest", "constant", 2.5]))
def test_pad_array_is_numpy_pad_even_past_the_axis_length(n, before, after, boundary):
    x = np.arange(2 * n, dtype=np.float32).reshape(2, n) * 1.5 - 3
    mode = {"reflect": {"mode": "reflect"}, "nearest": {"mode": "edge"},
            "constant": {"mode": "constant"}}.get(boundary, {"mode": "constant",
                                                           "constant_values": 2.5})
    want = np.pad(x, ((0, 0), (before, after)), **mode)
    np.testing.assert_array_equal(pad_array(x, ((0, 0), (before, after)), boundary), want)
    if boundary == "reflect" and n > 1:  # mirrored about the edge pixel, not repeating it
        assert pad_array(x, ((0, 0), (1, 0)), boundary)[0, 0] == x[0, 1]
    # predict's blocks read the padded axis through an index map (engine.ops.tiled)
    from engine.ops.tiled import padded_source_index

    idx = padded_source_index(0, before + n + after, before, n, mode["mode"])
    const = mode.get("constant_values", 0.0)
    got = np.where(idx >= 0, x[:, np.maximum(idx, 0)], np.float32(const))
    np.testing.assert_array_equal(got, want)


def test_pad_kwargs_refuses_unknown_boundaries():
    for bad in ("wrap", "symmetric", True, None):
        with pytest.raises(ValueError, match="boundary"):
            pad_kwargs(bad)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 3), st.integers(0, 3),
       st.integers(0, 5), st.booleans())
def test_overlap_add_equals_a_loop_over_windows(t0, t1, e0, e1, gap, weighted):
    rng = np.random.default_rng(t0 * 10 + t1)
    size = (t0, t1)
    stride = (max(1, t0 - e0), max(1, t1 - e1))
    counts = (1 + gap, 2 + gap // 2)
    shape = tuple((c - 1) * s + t + 1 for c, s, t in zip(counts, stride, size, strict=True))
    preds = rng.random((2, *counts, *size)).astype(np.float32)
    w = rng.random(size).astype(np.float32) + 0.1 if weighted else None
    acc = np.zeros((2, *shape), np.float32)
    overlap_add(acc, preds, stride, w)
    want = np.zeros_like(acc)
    starts = [(i * stride[0], j * stride[1]) for i in range(counts[0]) for j in range(counts[1])]
    flat = np.moveaxis(preds.reshape(2, -1, *size), 1, 0)
    accumulate_windows(want, None, flat, starts, w)
    np.testing.assert_allclose(acc, want, rtol=1e-6, atol=1e-6)


def test_overlap_add_checks_shapes():
    with pytest.raises(ValueError, match="exceed"):
        overlap_add(np.zeros((5,), np.float32), np.ones((3, 4), np.float32), (1,))
    with pytest.raises(ValueError, match="do not match"):
        overlap_add(np.zeros((2, 8), np.float32), np.ones((3, 2, 4), np.float32), (2,))
