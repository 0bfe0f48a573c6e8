"""Every public op, built twice with different inputs, composes in one graph: keys are a
token of all inputs, so two calls never share values (and the same call twice is the
same graph, which resume identity relies on)."""

import dask
import numpy as np
import pytest
import torch
import xarray as xr

import engine
from engine.testing.cubes import synthetic_cube


def _cube(seed, chunks):
    return synthetic_cube({"time": 4, "lat": 32, "lon": 48}, chunks=chunks, seed=seed)


def _conv(scale):
    net = torch.nn.Conv2d(3, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        net.weight.fill_(scale / 27.0)
    return net


def _pair(op):
    """Two lazy results of ``op`` with different inputs, and each computed alone."""
    a, b = op(0), op(1)
    alone = (np.asarray(dask.compute(a)[0]), np.asarray(dask.compute(b)[0]))
    both = [np.asarray(x) for x in dask.compute(a, b)]
    return alone, both, (a, b)


OPS = {
    "block_split/seed": lambda i: engine.block_split(
        _cube(0, {"lat": 16}), {"time": 2, "lat": 8, "lon": 8}, 0.25, seed=i).data,
    "block_split/chunks": lambda i: engine.block_split(
        _cube(0, {"lat": 16 if i else 8}), {"time": 2, "lat": 8, "lon": 8}, 0.25 + 0.25 * i,
        seed=3).data,
    "random_split": lambda i: engine.random_split(_cube(0, {"lat": 16}), 0.3, seed=i).data,
    "geo_kfold": lambda i: engine.geo_kfold(_cube(0, {"lat": 16}), k=3 + i, dim="lon").data,
    "predict/model": lambda i: engine.predict(_cube(0, {"lat": 16}), _conv(1.0 + i),
                                              tile={"lat": 16, "lon": 16}).data,
    "predict/chunks": lambda i: engine.predict(_cube(0, {"lat": 16 if i else 8, "lon": 24}),
                                               _conv(2.0), tile={"lat": 16, "lon": 16},
                                               overlap=0.25 * (i + 1)).data,
    "predict/data": lambda i: engine.predict(_cube(i, {"lat": 16}), _conv(1.0),
                                             tile={"lat": 16, "lon": 16}).data,
}


@pytest.mark.parametrize("name", list(OPS))
def test_two_calls_compose_in_one_graph(name):
    alone, both, (a, b) = _pair(OPS[name])
    np.testing.assert_array_equal(both[0], alone[0])
    np.testing.assert_array_equal(both[1], alone[1])
    assert not np.array_equal(alone[0], alone[1]), "the two inputs must give different values"
    assert a.name != b.name
    assert not set(dict(a.__dask_graph__())) & set(dict(b.__dask_graph__())) - \
        set(dict(_shared_inputs(a, b)))


def _shared_inputs(a, b):
    """Keys both graphs may legitimately share: identical input layers (the same cube)."""
    ga, gb = a.__dask_graph__(), b.__dask_graph__()
    shared = set(ga.layers) & set(gb.layers)
    out = {}
    for layer in shared:
        if dict(ga.layers[layer]) == dict(gb.layers[layer]):
            out.update(dict(ga.layers[layer]))
    return out


@pytest.mark.parametrize("name", list(OPS))
def test_same_call_twice_is_the_same_graph(name):
    a, b = OPS[name](0), OPS[name](0)
    assert a.name == b.name


def test_patch_streams_with_different_inputs_compose():
    ds0, ds1 = _cube(0, {"lat": 16}), _cube(1, {"lat": 16})
    it0 = engine.iter_patches(ds0, size={"lat": 8, "lon": 8}, batch_size=64, shuffle=False)
    it1 = engine.iter_patches(ds1, size={"lat": 8, "lon": 8}, batch_size=64, shuffle=False)
    x0 = np.concatenate([b.data for b in it0])
    x1 = np.concatenate([b.data for b in it1])
    assert not np.array_equal(x0, x1)
    y0 = np.concatenate([b.data for b in engine.iter_patches(
        ds0, size={"lat": 8, "lon": 8}, batch_size=64, shuffle=False)])
    np.testing.assert_array_equal(x0, y0)


def test_two_predictions_written_in_one_session(tmp_path):
    """Model A vs model B, written side by side and compared: the difference is real."""
    ds = _cube(0, {"lat": 16})
    pa = engine.predict(ds, _conv(1.0), tile={"lat": 16, "lon": 16})
    pb = engine.predict(ds, _conv(3.0), tile={"lat": 16, "lon": 16})
    out = xr.Dataset({"a": pa, "b": pb})
    engine.write(out, str(tmp_path / "ab.zarr"))
    back = xr.open_zarr(tmp_path / "ab.zarr")
    diff = float(abs(back.b - back.a).max())
    assert diff > 0.1
    np.testing.assert_allclose(back.b.values, 3 * back.a.values, rtol=1e-4, atol=1e-5)
