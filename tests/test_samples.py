"""PixelSamples: the samples are exactly the cells of where=, features aligned with the
target, on any cube's dims; streams of one cube compose in one graph."""

from __future__ import annotations

import dask
import numpy as np
import xarray as xr

from engine.ml.samples import PixelSamples


def _cube(dims=("depth", "COADSY", "COADSX"), shape=(3, 11, 13), chunks=(2, 4, 5)):
    """Each cell's target encodes its flat index; the features are exact functions of it,
    so a sample whose features come from another cell shows."""
    idx = np.arange(np.prod(shape), dtype="f8").reshape(shape)
    land = (np.add.outer(np.arange(shape[1]), np.arange(shape[2])) % 3 != 0).astype("f4")
    ds = xr.Dataset({
        "y": (dims, idx.astype("f4")),
        "a": (dims, (2.0 * idx + 1.0).astype("f4")),
        "land": (dims[1:], land),  # a static feature, broadcast to the target's dims
    }, coords={dims[1]: (dims[1], np.arange(shape[1]), {"units": "degrees_north"}),
               dims[2]: (dims[2], np.arange(shape[2]), {"units": "degrees_east"})})
    ds["y"] = ds["y"].where(idx % 7 != 3)  # gaps
    return ds.chunk(dict(zip(dims, chunks, strict=True)))


def _samples(s):
    xs, ys = zip(*s.iter_arrays(), strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def test_samples_are_the_where_cells_with_aligned_features():
    ds = _cube()
    where = np.isfinite(ds["y"]) & (ds["land"] == 1)
    s = PixelSamples(ds, ["a", "land"], "y", where, batch_size=17, seed=2)
    x, y = _samples(s)
    want = np.sort(ds["y"].values[where.values])
    assert len(want) > 0 and s.n_samples == len(want)
    np.testing.assert_array_equal(np.sort(y), want)
    np.testing.assert_array_equal(x[:, 0], 2.0 * y + 1.0)  # a of the same cell
    np.testing.assert_array_equal(x[:, 1], np.ones(len(y), "f4"))  # land where kept
    assert x.dtype == y.dtype == np.float32


def test_epochs_reorder_but_keep_the_same_samples():
    ds = _cube()
    where = np.isfinite(ds["y"])
    s = PixelSamples(ds, ["a"], "y", where, batch_size=8, seed=5, buffer_chunks=1)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        orders.append(_samples(s)[1])
    assert all(np.array_equal(np.sort(o), np.sort(orders[0])) for o in orders)
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])


def test_train_and_validation_streams_compose_in_one_graph():
    ds = _cube()
    ok = np.isfinite(ds["y"])
    train = PixelSamples(ds, ["a"], "y", ok & (ds["land"] == 1), shuffle=True, seed=1,
                         cache=False)
    val = PixelSamples(ds, ["a"], "y", ok & (ds["land"] == 0), shuffle=False, cache=False)
    ut, uv = train.patches.to_delayed(), val.patches.to_delayed()
    assert not {u.key for u in ut} & {u.key for u in uv}
    together = dask.compute(*ut, *uv, scheduler="sync")
    apart = dask.compute(*ut, scheduler="sync") + dask.compute(*uv, scheduler="sync")
    for (d1, _), (d2, _) in zip(together, apart, strict=True):
        np.testing.assert_array_equal(d1, d2)
    n_train = sum(len(d) for d, _ in together[:len(ut)])
    n_val = sum(len(d) for d, _ in together[len(ut):])
    assert n_train == int((ok & (ds["land"] == 1)).sum())
    assert n_val == int((ok & (ds["land"] == 0)).sum())
