"""Whole-domain tile embeddings on the cluster (engine.ml.embed_grid; issue 12 section 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import SpecError
from engine.ml.embed import autoencoder_embedder, embed_tiles, tile_embedder
from engine.ml.embed_grid import embed_grid, tile_statistics, window_grid


def _model(c: int = 2):
    torch.manual_seed(0)
    return tile_embedder(c, dim=6, width=4, stem="small", hidden=8).eval()


def _reference(a: np.ndarray, model, tile: int, stride: int):
    """Embeddings, statistics and validity of every window by a plain loop over tiles."""
    nt, _, ny, nx = a.shape
    tiles = [a[t, :, y:y + tile, x:x + tile] for t in range(nt)
             for y in window_grid(ny, tile, stride) for x in window_grid(nx, tile, stride)]
    tiles = np.stack(tiles)
    ok = np.isfinite(tiles).all(axis=(1, 2, 3))
    emb = np.full((len(tiles), model.dim), np.nan, np.float32)
    emb[ok] = embed_tiles(model, tiles[ok], 64)
    stats = np.full((len(tiles), 3), np.nan, np.float32)
    stats[ok] = tile_statistics(tiles[ok], 0.15)
    return emb, stats, ok


def _cube(nt, ny, nx, c=2, seed=0, holes=2):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(nt, c, ny, nx)).astype(np.float32)
    for _ in range(holes):
        a[rng.integers(nt), rng.integers(c), rng.integers(ny), rng.integers(nx)] = np.nan
    return a


def test_every_window_equals_a_loop_over_tiles_and_incomplete_tiles_keep_their_row():
    a = _cube(3, 40, 50)
    m = _model()
    data = xr.DataArray(a, dims=("time", "channel", "y", "x")).chunk({"y": 17, "x": 23})
    ds = embed_grid(data, m, tile=8, stride=4, batch_size=40).compute(scheduler="sync")
    emb, stats, ok = _reference(a, m, 8, 4)
    assert (~ok).sum() > 0
    np.testing.assert_array_equal(ds["valid"].values, ok)
    np.testing.assert_allclose(ds["embedding"].values, emb, atol=1e-5)
    np.testing.assert_allclose(ds["tile_statistics"].values, stats, rtol=1e-5)
    # rows are time-major, then row, then column of the window grid
    ys, xs = window_grid(40, 8, 4), window_grid(50, 8, 4)
    assert ds.sizes["tile"] == 3 * ys.size * xs.size
    t, y0, x0 = (ds[k].values for k in ("time_index", "y0", "x0"))
    assert t.tolist() == sorted(t.tolist())
    np.testing.assert_array_equal(y0[: ys.size * xs.size], np.repeat(ys, xs.size))
    np.testing.assert_array_equal(x0[: xs.size], xs)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nt=st.integers(1, 3), ny=st.integers(8, 30), nx=st.integers(8, 30),
       tile=st.integers(2, 8), stride=st.integers(1, 6), cy=st.integers(3, 30),
       cx=st.integers(3, 30), band=st.sampled_from([1, 600, 5000, 10**9]),
       seed=st.integers(0, 100))
def test_same_embeddings_for_any_chunking_and_band_size(nt, ny, nx, tile, stride, cy, cx,
                                                        band, seed):
    """Chunking-invariance: the input chunks and the band size only change the tasks."""
    a = _cube(nt, ny, nx, seed=seed, holes=1)
    m = _model()
    data = xr.DataArray(a, dims=("time", "channel", "y", "x")).chunk({"y": cy, "x": cx})
    ds = embed_grid(data, m, tile=tile, stride=stride, band_bytes=band)
    ds = ds.compute(scheduler="sync")
    emb, _, ok = _reference(a, m, tile, stride)
    np.testing.assert_array_equal(ds["valid"].values, ok)
    np.testing.assert_allclose(ds["embedding"].values, emb, atol=1e-5)


def test_bands_bound_each_task_and_the_model_is_one_key():
    a = _cube(2, 64, 32, holes=0)
    m = _model()
    data = xr.DataArray(a, dims=("time", "channel", "y", "x"))
    # one px row of 2 channels x 32 px is 256 bytes: 4 KiB holds 16 rows, 3 rows of tiles
    ds = embed_grid(data, m, tile=8, stride=4, band_bytes=4096)
    names = [k[0] if isinstance(k, tuple) else k
             for k in dict(ds["embedding"].data.__dask_graph__())]
    assert len([k for k in names if k.startswith("embed-grid-")]) == 2 * 5  # 15 rows of
    assert len([k for k in names if k.startswith("model-")]) == 1  # tiles in bands of 3


def test_the_autoencoder_embeds_through_the_same_grid():
    torch.manual_seed(0)
    m = autoencoder_embedder(2, 8, dim=5, width=4, depth=2).eval()
    a = _cube(2, 24, 24)
    data = xr.DataArray(a, dims=("time", "channel", "y", "x"))
    ds = embed_grid(data, m, tile=8, stride=8).compute(scheduler="sync")
    emb, _, ok = _reference(a, m, 8, 8)
    np.testing.assert_allclose(ds["embedding"].values[ok], emb[ok], atol=1e-5)


def test_runs_on_worker_processes(client):
    """Embedding tasks run on the workers, the model shipped once, results equal."""
    a = _cube(4, 32, 32)
    m = _model()
    data = xr.DataArray(a, dims=("time", "channel", "y", "x")).chunk({"time": 1})
    ds = embed_grid(data, m, tile=8, stride=8).persist()
    got = ds.compute()
    emb, _, ok = _reference(a, m, 8, 8)
    np.testing.assert_allclose(got["embedding"].values, emb, atol=1e-5)
    from engine.ml.predict import model_load_count

    loads = client.run(model_load_count)
    assert sum(loads.values()) <= len(loads)  # once per worker at most


@pytest.mark.parametrize("kw, words", [
    ({"tile": 100}, "do not fit"),
    ({"stride": 0}, "must be >= 1"),
])
def test_bad_arguments_are_one_line(kw, words):
    data = xr.DataArray(np.zeros((1, 2, 16, 16), np.float32),
                        dims=("time", "channel", "y", "x"))
    args = {"tile": 8, "stride": 4, **kw}
    with pytest.raises(SpecError, match=words):
        embed_grid(data, _model(), **args)
    with pytest.raises(SpecError, match="must be \\(time, channel, y, x\\)"):
        embed_grid(data.transpose("channel", "time", "y", "x"), _model(), tile=8, stride=4)
