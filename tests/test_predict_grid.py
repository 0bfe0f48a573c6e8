"""predict against an independent numpy reference: the padded global grid, the blend
weights, the boundary content, the output chunking, and flip symmetry at the edges.

The reference below is written from the specification, not from engine code: pad each
spatial axis by the same margin (at least ``tile - stride``, the fewest windows, the
total split equally, one more pixel after when odd) with ``np.pad``, run the model on
every window of the grid that tiles the padded array, and blend with
``sum(w * p) / sum(w)``, ``w`` a Gaussian of sigma ``tile / 8`` normalised to a maximum
of 1 (or ones for the mean).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from engine.ml.predict import predict

_NP_MODE = {"reflect": {"mode": "reflect"}, "nearest": {"mode": "edge"},
            "constant": {"mode": "constant", "constant_values": 0.0}}


def _axis_plan(n: int, t: int, s: int) -> tuple[int, int, int]:
    """(before, after, windows) of the reference grid along one axis."""
    margin = t - s
    count = 1
    while (count - 1) * s + t < n + 2 * margin:
        count += 1
    total = (count - 1) * s + t - n
    return total // 2, total - total // 2, count


def _gauss(t: int) -> np.ndarray:
    i = np.arange(t, dtype=np.float64)
    return np.exp(-0.5 * ((i - (t - 1) / 2) / (t / 8)) ** 2)


def _reference(x: np.ndarray, model: nn.Module, tile: tuple[int, int],
               stride: tuple[int, int], blend: str, boundary) -> np.ndarray:
    """``x``: (M, C, H, W) -> (M, O, H, W) by the reference tiling (float64 blending)."""
    plans = [_axis_plan(n, t, s) for n, t, s in zip(x.shape[2:], tile, stride, strict=True)]
    widths = [(0, 0), (0, 0)] + [(b, a) for b, a, _ in plans]
    kw = (_NP_MODE[boundary] if isinstance(boundary, str)
          else {"mode": "constant", "constant_values": boundary})
    xp = np.pad(x.astype(np.float64), widths, **kw).astype(np.float32)
    if blend == "gaussian":
        w = np.multiply.outer(_gauss(tile[0]), _gauss(tile[1]))
        w = w / w.max()
    else:
        w = np.ones(tile)
    acc = np.zeros((x.shape[0], 0) + xp.shape[2:])
    wsum = np.zeros(xp.shape[2:])
    for i in range(plans[0][2]):
        for j in range(plans[1][2]):
            ys, xs = slice(i * stride[0], i * stride[0] + tile[0]), \
                slice(j * stride[1], j * stride[1] + tile[1])
            with torch.no_grad():
                p = model(torch.from_numpy(np.ascontiguousarray(xp[:, :, ys, xs]))).numpy()
            if acc.shape[1] == 0:
                acc = np.zeros((x.shape[0], p.shape[1]) + xp.shape[2:])
            acc[:, :, ys, xs] += p * w
            wsum[ys, xs] += w
    (b0, _, _), (b1, _, _) = plans
    return (acc / wsum)[:, :, b0:b0 + x.shape[2], b1:b1 + x.shape[3]]


class _RampConv(nn.Module):
    """A fixed random 3x3 conv plus a ramp over the position inside the window: the
    output of a pixel depends on where the window sits, so blend weights matter."""

    def __init__(self, cin: int = 2, cout: int = 2, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(cout, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ramp = (torch.arange(h, dtype=x.dtype)[:, None] / h
                + 0.5 * torch.arange(w, dtype=x.dtype)[None, :] / w)
        return self.conv(x) + ramp


def _cube(shape: tuple[int, ...], chunks, seed: int = 0) -> xr.DataArray:
    """(time, band, y, x) random field; ``chunks`` per dim (ints or tuples)."""
    v = np.random.default_rng(seed).random(shape, dtype=np.float32)
    return xr.DataArray(da.from_array(v, chunks=chunks), dims=("time", "band", "y", "x"))


CASES = [((16, 16), 0.5), ((12, 16), 0.75), ((10, 10), 0.3)]


@pytest.mark.parametrize("tile,overlap", CASES)
@pytest.mark.parametrize("boundary", ["reflect", "nearest", 0.5])
def test_gaussian_blend_matches_the_numpy_reference(tile, overlap, boundary):
    arr = _cube((2, 2, 45, 38), (1, 2, (20, 7, 18), (9, 29)))
    model = _RampConv()
    out = predict(arr, model, tile={"y": tile[0], "x": tile[1]}, overlap=overlap,
                  boundary=boundary, out_channels=2, batch_size=7)
    stride = tuple(max(1, round(t * (1 - overlap))) for t in tile)
    ref = _reference(arr.values, model, tile, stride, "gaussian", boundary)
    assert out.dims == ("time", "channel", "y", "x")
    np.testing.assert_allclose(out.values, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("slab,batch", [(1, 1), (1, 5), (40, 3)])
def test_blocks_cut_in_slabs_of_window_rows_match_the_reference(monkeypatch, slab, batch):
    import engine.ml.predict as mod

    monkeypatch.setattr(mod, "_SLAB_WINDOWS", slab)  # many slabs per block, ragged batches
    arr = _cube((2, 2, 37, 30), (2, 2, (37,), (11, 19)), seed=11)
    model = _RampConv(seed=2)
    out = predict(arr, model, tile={"y": 12, "x": 10}, overlap=0.5, out_channels=2,
                  batch_size=batch).values
    ref = _reference(arr.values, model, (12, 10), (6, 5), "gaussian", "reflect")
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5)


def test_gaussian_and_mean_blends_differ_and_each_matches_its_reference():
    arr = _cube((1, 2, 40, 33), (1, 2, (16, 24), (33,)), seed=3)
    model = _RampConv(seed=5)
    res = {}
    for blend in ("gaussian", "mean"):
        out = predict(arr, model, tile={"y": 16, "x": 16}, overlap=0.5, blend=blend,
                      out_channels=2).values
        ref = _reference(arr.values, model, (16, 16), (8, 8), blend, "reflect")
        np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5)
        res[blend] = out
    # the window-position ramp makes the blends far apart (a mutation to equal weights
    # would make both outputs equal)
    assert np.abs(res["gaussian"] - res["mean"]).max() > 0.05


def test_a_constant_field_stays_constant_up_to_every_edge():
    # the example: a 3x3 mean (zero-padded inside each window) over a constant
    # field; the first row used to be 0.667 and the last 1.0
    mean3 = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        mean3.weight.fill_(1.0 / 9.0)
    arr = xr.DataArray(da.ones((1, 50, 37), np.float32, chunks=(1, 20, 16)),
                       dims=("time", "y", "x"))
    for boundary in ("reflect", "nearest"):
        out = predict(arr, mean3, tile={"y": 16, "x": 16}, overlap=0.5,
                      boundary=boundary).values
        # window-border pixels carry Gaussian weight ~3e-4, so 1.0 within 1e-3 everywhere
        np.testing.assert_allclose(out, 1.0, rtol=0, atol=1e-3)
        # and the edges are blended exactly like the interior: same value at the same
        # grid phase (the grid is periodic with the stride, 8)
        np.testing.assert_allclose(out[:, :8], out[:, 8:16], rtol=0, atol=1e-6)
        np.testing.assert_allclose(out[:, -8:], out[:, -16:-8], rtol=0, atol=1e-6)
        np.testing.assert_allclose(out[:, :, :8], out[:, :, 8:16], rtol=0, atol=1e-6)


@st.composite
def _chunking(draw, n: int) -> tuple[int, ...]:
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=4)) if n > 1 else set()
    b = [0, *sorted(cuts), n]
    return tuple(int(hi - lo) for lo, hi in zip(b[:-1], b[1:], strict=True))


@st.composite
def _case(draw):
    h, w = draw(st.integers(4, 40)), draw(st.integers(4, 40))
    tile = (draw(st.integers(2, 20)), draw(st.integers(2, 20)))
    overlap = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
    chunks = (1, 2, draw(_chunking(h)), draw(_chunking(w)))
    boundary = draw(st.sampled_from(["reflect", "nearest", "constant", -1.5]))
    return h, w, tile, overlap, chunks, boundary


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_output_keeps_the_input_chunking_and_matches_the_reference(case):
    h, w, tile, overlap, chunks, boundary = case
    arr = _cube((2, 2, h, w), chunks, seed=h * 100 + w)
    model = _RampConv(cout=1, seed=1)
    out = predict(arr, model, tile={"y": tile[0], "x": tile[1]}, overlap=overlap,
                  boundary=boundary, blend="mean")
    assert out.dims == ("time", "y", "x")
    assert out.chunks == (arr.chunks[0], arr.chunks[2], arr.chunks[3])
    stride = tuple(max(1, round(t * (1 - overlap))) for t in tile)
    ref = _reference(arr.values, model, tile, stride, "mean", boundary)[:, 0]
    np.testing.assert_allclose(out.values, ref, rtol=0, atol=2e-5)


class _FlipConv(nn.Module):
    """Equivariant under flipping y: kernel symmetric in y, plus a ramp symmetric in y."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = nn.Conv2d(2, 1, 5, padding=2)
        with torch.no_grad():
            k = torch.randn(self.conv.weight.shape, generator=g)
            self.conv.weight.copy_(k + k.flip(-2))
            self.conv.bias.fill_(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        ramp = ((torch.arange(h, dtype=x.dtype) - (h - 1) / 2) / h) ** 2
        return self.conv(x) + ramp[:, None]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(3, 48), st.integers(2, 20), st.sampled_from([0.0, 0.25, 0.5, 0.75]),
       st.sampled_from(["reflect", "nearest", "constant"]), st.data())
def test_a_flip_equivariant_model_commutes_with_flipping_the_input(h, t, overlap, boundary,
                                                                   data):
    s = max(1, round(t * (1 - overlap)))
    b, a, _ = _axis_plan(h, t, s)
    assume(b == a)  # an odd total padding cannot be split symmetrically
    chunks = (1, 2, data.draw(_chunking(h)), (9,))
    arr = _cube((1, 2, h, 9), chunks, seed=h)
    flipped = arr.isel(y=slice(None, None, -1))
    kw = {"tile": {"y": t, "x": 8}, "overlap": overlap, "boundary": boundary}
    model = _FlipConv()
    out = predict(arr, model, **kw).values
    out_f = predict(flipped, model, **kw).values
    np.testing.assert_allclose(out_f[:, ::-1], out, rtol=0, atol=2e-5)
