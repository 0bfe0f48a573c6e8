"""iter_patches: grid counts, coverage, padding, filtering, shuffling, sharding, memory."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import dask
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import CubeError, EngineWarning, SpecError
from engine.ops.patches import PatchBatch, iter_patches
from engine.testing.cubes import synthetic_cube

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPE = {"time": 3, "lat": 100, "lon": 130}
SIZE = {"lat": 32, "lon": 32}


def _pairs(it) -> dict[tuple, np.ndarray]:
    out: dict[tuple, np.ndarray] = {}
    for b in it:
        for d, p in zip(b.data, b.positions, strict=True):
            key = tuple(int(v) for v in p)
            assert key not in out, f"patch {key} produced twice"
            out[key] = np.array(d)
    return out


def _expected(ds, key, size=(32, 32), pad=None) -> np.ndarray:
    t, i, j = key
    out = []
    for v in ds.data_vars:
        a = ds[v].values[t]
        if pad == "reflect":
            a = np.pad(a, ((0, size[0]), (0, size[1])), mode="reflect")
        elif pad is not None:
            a = np.pad(a, ((0, size[0]), (0, size[1])), constant_values=pad)
        out.append(a[i:i + size[0], j:j + size[1]])
    return np.stack(out)


class _NoCompute:
    """A scheduler that fails: proves that building an iterator computes nothing."""

    def __call__(self, dsk, keys, **kwargs):
        raise AssertionError("dask computed while building the iterator")


@pytest.fixture(scope="module")
def client():
    from engine.testing.clusters import process_client

    with process_client(2) as c:
        yield c


@pytest.fixture(scope="module")
def cube():
    return synthetic_cube(SHAPE, chunks={"lat": 37, "lon": 50})


def test_n_windows_and_units_without_compute(cube):
    with dask.config.set(scheduler=_NoCompute()):
        it = iter_patches(cube, size=SIZE, stride=16, batch_size=10)
        assert it.n_windows == 3 * 5 * 7
        assert it.coverage["n_windows"] == it.n_windows
        assert it.dims == ("time", "lat", "lon") and it.variables == ("t2m", "lst", "ndvi")
    # one task per chunk holding window starts: lat chunks [0,37) [37,74) [74,100) hold
    # starts {0,16,32} {48,64} {} and lon chunks [0,50) [50,100) [100,130) hold 4, 3, 0
    assert it.n_units == 1 * 2 * 2


@pytest.mark.parametrize("stride", [None, 16, 40])
def test_every_window_once_with_the_right_content(cube, stride):
    it = iter_patches(cube, size=SIZE, stride=stride, batch_size=7)
    got = _pairs(it)
    assert len(got) == it.n_windows
    st = stride or 32
    assert {k[1] for k in got} == set(range(0, 100 - 32 + 1, st))
    for key in list(got)[::5]:
        np.testing.assert_array_equal(got[key], _expected(cube, key))


def test_batches_are_exact_and_typed(cube):
    batches = list(iter_patches(cube, size=SIZE, stride=16, batch_size=8))
    assert all(isinstance(b, PatchBatch) for b in batches)
    assert [len(b) for b in batches[:-1]] == [8] * (len(batches) - 1)
    assert 0 < len(batches[-1]) <= 8
    b = batches[0]
    assert b.data.dtype == np.float32 and b.data.shape[1:] == (3, 32, 32)
    assert b.positions.dtype == np.int64 and b.positions.shape == (8, 3)


def test_as_torch_yields_tensors(cube):
    import torch

    b = next(iter(iter_patches(cube, size=SIZE, batch_size=4, as_torch=True)))
    assert isinstance(b.data, torch.Tensor) and b.data.dtype == torch.float32
    assert isinstance(b.positions, torch.Tensor) and b.positions.dtype == torch.int64


def test_partial_windows_reported_not_warned(cube):
    it = iter_patches(cube, size=SIZE)
    cov = it.report()  # no EngineWarning by default (the suite turns them into errors)
    # lat: 100 -> 3 full + 1 partial; lon: 130 -> 4 full + 1 partial
    assert cov["n_windows"] == 3 * 3 * 4
    assert cov["n_partial_dropped"] == 3 * (4 * 5 - 3 * 4)
    assert cov["uncovered_pixel_share"] == pytest.approx(1 - (96 / 100) * (128 / 130))
    with pytest.warns(EngineWarning, match="partial edge windows"):
        it.report(warn=True)


@pytest.mark.parametrize("pad", ["reflect", 5.0])
def test_pad_produces_edge_windows(cube, pad):
    it = iter_patches(cube, size=SIZE, pad=pad, batch_size=16)
    assert it.coverage["n_partial_dropped"] == 0 and it.coverage["uncovered_pixel_share"] == 0
    got = _pairs(it)
    assert len(got) == it.n_windows == 3 * 4 * 5
    for key in [(0, 96, 128), (2, 96, 0), (1, 64, 128), (0, 0, 0)]:
        np.testing.assert_array_equal(got[key], _expected(cube, key, pad=pad))


def test_reflect_pad_reads_pixels_from_the_previous_chunk():
    # the last lat chunk holds one row only: reflection needs rows of the chunk before
    ds = synthetic_cube({"time": 1, "lat": 65, "lon": 32}, chunks={"lat": 64})
    got = _pairs(iter_patches(ds, size={"lat": 32, "lon": 32}, pad="reflect"))
    np.testing.assert_array_equal(got[(0, 64, 0)], _expected(ds, (0, 64, 0), pad="reflect"))


def test_where_filters_inside_the_chunk_tasks():
    ds = synthetic_cube(SHAPE, chunks={"lat": 50}, nan_fraction=0.0005)
    every = _pairs(iter_patches(ds, size=SIZE, stride=16))
    clean = {k for k, v in every.items() if not np.isnan(v).any()}
    assert 0 < len(clean) < len(every)
    assert set(_pairs(iter_patches(ds, size=SIZE, stride=16, where="no-nan"))) == clean
    lst_ok = {k for k, v in every.items() if not np.isnan(v[1]).any()}
    assert set(_pairs(iter_patches(ds, size=SIZE, stride=16, where={"lst": "no-nan"}))) == lst_ok
    high = {k for k, v in every.items() if v[0].mean() > 0}
    assert set(_pairs(iter_patches(ds, size=SIZE, stride=16,
                                   where=lambda d: d[:, 0].mean(axis=(1, 2)) > 0))) == high


def test_where_centre_label():
    ds = synthetic_cube({"time": 2, "lat": 64, "lon": 64}, chunks={"lat": 32})
    ds["label"] = (ds["t2m"] > 0.5).astype("float32")
    every = _pairs(iter_patches(ds, size={"lat": 8, "lon": 8}, variables=["t2m", "label"]))
    want = {k for k, v in every.items() if v[1, 4, 4] != 0}
    got = _pairs(iter_patches(ds, size={"lat": 8, "lon": 8}, variables=["t2m", "label"],
                              where={"label": "centre"}))
    assert set(got) == want and 0 < len(want) < len(every)


def test_shuffle_is_seeded_and_epoch_aware(cube):
    def order(**kw):
        it = iter_patches(cube, size=SIZE, stride=16, batch_size=9, shuffle=True, **kw)
        return [tuple(p) for b in it for p in b.positions.tolist()]

    a, b = order(seed=1, epoch=0), order(seed=1, epoch=0)
    assert a == b
    assert order(seed=1, epoch=1) != a
    assert order(seed=2, epoch=0) != a
    plain = [tuple(p) for b in iter_patches(cube, size=SIZE, stride=16)
             for p in b.positions.tolist()]
    assert sorted(a) == sorted(plain) and a != plain
    it = iter_patches(cube, size=SIZE, stride=16, shuffle=True, seed=1)
    it.set_epoch(1)
    assert [tuple(p) for x in it for p in x.positions.tolist()] == order(seed=1, epoch=1)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_partition_an_epoch(cube, world):
    full = set(_pairs(iter_patches(cube, size=SIZE, stride=16)))
    seen: list[tuple] = []
    for rank in range(world):
        it = iter_patches(cube, size=SIZE, stride=16, shuffle=True, seed=3, shard=(rank, world))
        seen += [tuple(p) for b in it for p in b.positions.tolist()]
    assert len(seen) == len(set(seen)) and set(seen) == full


def test_dataloader_workers_yield_each_patch_once():
    from torch.utils.data import DataLoader

    from engine.ml.patch_dataset import PatchDataset

    ds = synthetic_cube({"time": 4, "lat": 64, "lon": 96}, chunks={"lat": 32, "lon": 32})
    it = iter_patches(ds, size={"lat": 16, "lon": 16}, batch_size=10, shuffle=True)
    loader = DataLoader(PatchDataset(it), batch_size=None, num_workers=2)
    seen = [tuple(p) for x, pos in loader for p in pos.tolist()]
    assert len(seen) == it.n_windows == len(set(seen))


def test_same_patches_for_any_chunking():
    def pairs(chunks):
        ds = synthetic_cube(SHAPE, chunks=chunks)
        return {k: v.tobytes() for k, v in
                _pairs(iter_patches(ds, size=SIZE, stride=24, pad="reflect")).items()}

    a = pairs({"time": 1})
    assert a == pairs({"lat": 37, "lon": 23}) == pairs({"time": 3, "lat": 11, "lon": 130})


def test_peak_memory_bounded_by_chunks_not_cube():
    def peak(n_time):
        ds = synthetic_cube({"time": n_time, "lat": 256, "lon": 256},
                            chunks={"time": 1, "lat": 128, "lon": 128})
        it = iter_patches(ds, size={"lat": 32, "lon": 32}, batch_size=64, prefetch=2)
        tracemalloc.start()
        n = sum(len(b) for b in it)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert n == it.n_windows
        return top

    small, large = peak(4), peak(16)
    step = 256 * 256 * 3 * 4  # bytes of one time step
    # the invariant: the data held does not grow with the cube. 12 more steps (9.4 MB)
    # may only add per-chunk metadata (the plan and the graph: ~0.5-1.4 MB measured),
    # and the peak stays far below the cube
    assert large - small < 12 * step / 4
    assert large < 16 * step / 2


def test_distributed_client_gives_the_same_patches(client):
    ds = synthetic_cube({"time": 2, "lat": 64, "lon": 80}, chunks={"lat": 40, "lon": 30})
    it = iter_patches(ds, size=SIZE, stride=16, pad="reflect", client=client, prefetch=3)
    remote = _pairs(it)
    assert len(remote) == it.n_windows
    for key in remote:
        np.testing.assert_array_equal(remote[key], _expected(ds, key, pad="reflect"))


def test_bad_arguments_fail_with_one_line(cube):
    with pytest.raises(CubeError, match="size dimension 'depth'.*dims: time, lat, lon"):
        iter_patches(cube, size={"depth": 4})
    with pytest.raises(CubeError, match="stride dimension 'band'"):
        iter_patches(cube, size=SIZE, stride={"band": 2})
    with pytest.raises(SpecError, match="stride names"):
        iter_patches(cube, size=SIZE, stride={"time": 2})
    with pytest.raises(SpecError, match="size.lat"):
        iter_patches(cube, size={"lat": 0, "lon": 4})
    with pytest.raises(CubeError, match="not in the cube"):
        iter_patches(cube, size=SIZE, variables=["nope"])
    with pytest.raises(SpecError, match="pad="):
        iter_patches(cube, size=SIZE, pad="wrap")
    with pytest.raises(SpecError, match="shard="):
        iter_patches(cube, size=SIZE, shard=(2, 2))
    with pytest.raises(CubeError, match="where="):
        iter_patches(cube, size=SIZE, where={"label": "centre"})


def test_ops_do_not_import_torch():
    code = ("import sys, engine.ops.patches, engine.testing.cubes;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_benchmark_figures_on_the_tiny_size():
    from benchmarks import bench_patches as mod

    res = mod.run("tiny")
    assert [r["name"] for r in res["rows"]][0] == "iter_patches"
    assert res["cube"]["n_patches"] == 2 * 8 * 8
    assert all(r["mb_per_s"] > 0 for r in res["rows"])
    assert res["ratios"]["vs_xbatcher"] > 5  # typically > 100; loose for loaded CI machines


def test_dataarray_channel_dim_becomes_patch_channels(cube):
    arr = cube.to_dataarray("band")
    it = iter_patches(arr, size=SIZE, batch_size=5)
    assert it.variables == ("t2m", "lst", "ndvi") and it.dims == ("time", "lat", "lon")
    got = _pairs(it)
    key = next(iter(got))
    np.testing.assert_array_equal(got[key], _expected(cube, key))


def test_positions_can_be_left_out(cube):
    """positions=False yields the same patches with zero-width positions."""
    kw = dict(size={"lat": 16, "lon": 16}, batch_size=7, shuffle=True, seed=2)
    full = list(iter_patches(cube, **kw))
    bare = list(iter_patches(cube, positions=False, **kw))
    np.testing.assert_array_equal(np.concatenate([b.data for b in full]),
                                  np.concatenate([b.data for b in bare]))
    assert all(b.positions.shape == (len(b), 0) for b in bare)


# -- keys: a token of all inputs --------------------------------------------------------

def _units(it):
    return [(np.asarray(d), np.asarray(p)) for d, p in dask.compute(*it.to_delayed(),
                                                                     scheduler="sync")]


@pytest.mark.parametrize("change", ["seed", "epoch", "pad", "stride", "chunking", "cube",
                                    "where", "variables"])
def test_unit_keys_compose_in_one_graph(change):
    ds = synthetic_cube({"time": 2, "lat": 40, "lon": 36}, chunks={"lat": 20, "lon": 18})
    base = dict(ds=ds, size={"lat": 8, "lon": 8}, stride=8, shuffle=True, seed=1,
                pad="reflect", where=None, variables=None)
    other = dict(base)
    if change == "seed":
        other["seed"] = 2
    elif change == "epoch":
        other["epoch"] = 1
    elif change == "pad":
        other["pad"] = "nearest"
    elif change == "stride":
        other["stride"] = 6
    elif change == "chunking":
        other["ds"] = ds.chunk({"lat": 15, "lon": 12})
    elif change == "cube":
        other["ds"] = synthetic_cube({"time": 2, "lat": 40, "lon": 36}, seed=5,
                                     chunks={"lat": 20, "lon": 18})
    elif change == "where":
        other["where"] = lambda d: d[:, 0, 0, 0] > 0.5
    else:
        other["variables"] = ["lst", "t2m"]
    a, b = iter_patches(**base), iter_patches(**other)
    ua, ub = a.to_delayed(), b.to_delayed()
    keys_a = {u.key for u in ua}
    assert keys_a == {u.key for u in iter_patches(**base).to_delayed()}  # stable
    assert not keys_a & {u.key for u in ub}
    together = dask.compute(*ua, *ub, scheduler="sync")
    apart = _units(a) + _units(b)
    assert len(together) == len(apart)
    for (d1, p1), (d2, p2) in zip(together, apart, strict=True):
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(p1, p2)


# -- any cube's dims --------------------------------------------------------------------

def _named(shape, chunks, naming, depth=None, seed=0):
    """A ``synthetic_cube`` with renamed horizontal dims (and CF units attrs)."""
    full = dict(shape)
    ds = synthetic_cube(full, chunks=chunks, variables=2, seed=seed)
    y, x = naming
    ds = ds.rename({"lat": y, "lon": x})
    ds[y].attrs["units"] = "degrees_north"
    ds[x].attrs["units"] = "degrees_east"
    return ds


NAMINGS = [("lat", "lon"), ("y", "x"), ("latitude", "longitude"), ("COADSY", "COADSX"),
           ("rows", "cols")]


def test_default_size_uses_the_cubes_horizontal_dims():
    for y, x in NAMINGS:
        ds = _named({"depth": 2, "lat": 70, "lon": 66}, {"lat": 40}, (y, x))
        it = iter_patches(ds, batch_size=4)
        assert it.patch_dims == (y, x) and it.size == (64, 64)
        assert it.n_windows == 2  # one window per depth level
        b = next(iter(it))
        np.testing.assert_array_equal(b.positions, [[0, 0, 0], [1, 0, 0]])
        np.testing.assert_array_equal(b.data[1, 0], ds[list(ds.data_vars)[0]].values[1, :64, :64])
        aliased = iter_patches(ds, size={"latitude": 8, "x": 6}, stride={"lat": 4})
        assert aliased.patch_dims == (y, x)
        assert aliased.size == (8, 6) and aliased.stride == (4, 6)


_MODES = {"reflect": {"mode": "reflect"}, "nearest": {"mode": "edge"},
          "constant": {"mode": "constant"}, -3.5: {"mode": "constant", "constant_values": -3.5}}


def _expected_np(ds, key, size, pad):
    """Patch ``key`` of every variable, cut from ``np.pad`` of the whole cube (far end)."""
    lead, starts = key[:-len(size)], key[-len(size):]
    out = []
    for v in ds.data_vars:
        a = ds[v].values[lead]
        if pad is not None:
            a = np.pad(a, [(0, s) for s in size], **_MODES[pad])
        out.append(a[tuple(slice(s, s + n) for s, n in zip(starts, size, strict=True))])
    return np.stack(out)


@pytest.mark.parametrize("pad", list(_MODES))
def test_edge_patches_equal_np_pad_of_the_cube(pad):
    # a last lat chunk of 1 cell: the padding reads pixels from the chunk before;
    # lon has 3 cells (in chunks of 2 and 1) and the window 8: a pad of 5 cells, wider than
    # the axis, which a reflection covers by reflecting again (numpy's rule)
    ds = synthetic_cube({"time": 2, "lat": 25, "lon": 3}, chunks={"lat": 12, "lon": 2})
    size = (8, 8)
    it = iter_patches(ds, size={"lat": 8, "lon": 8}, stride={"lat": 3}, pad=pad)
    got = _pairs(it)
    assert len(got) == it.n_windows == 2 * 7 * 1  # lat starts 0, 3, ..., 18
    for key, patch in got.items():
        np.testing.assert_array_equal(patch, _expected_np(ds, key, size, pad), err_msg=str(key))


def test_reflect_pad_of_a_one_pixel_axis_is_the_edge():
    ds = synthetic_cube({"lat": 1, "lon": 9}, chunks={"lon": 4}, variables=1)
    got = _pairs(iter_patches(ds, size={"lat": 4, "lon": 4}, pad="reflect"))
    for key, patch in got.items():
        np.testing.assert_array_equal(patch, _expected_np(ds, key, (4, 4), "reflect"))
        np.testing.assert_array_equal(patch[0, 1:], patch[0, :1].repeat(3, axis=0))


@st.composite
def _patch_cases(draw):
    ny, nx = draw(st.integers(3, 20)), draw(st.integers(3, 20))
    depth = draw(st.sampled_from([None, 2]))
    pad = draw(st.sampled_from([None, "reflect", "nearest", -3.5]))
    # without padding a patch must fit the cube (a larger one is an error, tested apart)
    sy = draw(st.integers(1, 8 if pad is not None else min(8, ny)))
    sx = draw(st.integers(1, 8 if pad is not None else min(8, nx)))
    return dict(
        shape=({"depth": depth} if depth else {}) | {"lat": ny, "lon": nx},
        chunks={"lat": draw(st.integers(1, ny)), "lon": draw(st.integers(1, nx))},
        size=(sy, sx), stride=(draw(st.integers(1, sy + 1)), draw(st.integers(1, sx + 1))),
        pad=pad, naming=draw(st.sampled_from(NAMINGS)), alias=draw(st.booleans()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_patch_cases())
def test_patches_same_under_any_chunking_and_renamed_dims(case):
    ref_ds = synthetic_cube(case["shape"], chunks={}, variables=2)
    size = dict(zip(("lat", "lon"), case["size"], strict=True))
    stride = dict(zip(("lat", "lon"), case["stride"], strict=True))
    ref = _pairs(iter_patches(ref_ds, size=size, stride=stride, pad=case["pad"]))
    y, x = case["naming"]
    ds = _named(case["shape"], case["chunks"], (y, x))
    keys = {"lat": y, "lon": x} if not case["alias"] else {"lat": "lat", "lon": "lon"}
    it = iter_patches(ds, size={keys[k]: v for k, v in size.items()},
                      stride={keys[k]: v for k, v in stride.items()}, pad=case["pad"])
    assert it.patch_dims == (y, x)
    got = _pairs(it)
    assert got.keys() == ref.keys() and len(got) == it.n_windows
    for key, patch in got.items():
        np.testing.assert_array_equal(patch, ref[key])
        np.testing.assert_array_equal(patch, _expected_np(ref_ds, key, case["size"],
                                                          case["pad"]))


# -- shuffling across epochs ------------------------------------------------------------

def test_shard_chunks_change_between_epochs_and_cover_each_epoch_once():
    ds = synthetic_cube({"time": 2, "lat": 48, "lon": 64}, chunks={"time": 1, "lat": 16,
                                                                   "lon": 16})
    size = {"lat": 16, "lon": 16}
    n_chunks = 2 * 3 * 4

    def chunks_of(rank, epoch):
        it = iter_patches(ds, size=size, shuffle=True, seed=11, epoch=epoch,
                          shard=(rank, 2), shuffle_buffer=1)
        pos = [tuple(p) for b in it for p in b.positions.tolist()]
        assert len(pos) == len(set(pos))
        return {(t, i // 16, j // 16) for t, i, j in pos}, len(pos)

    per_epoch = []
    for epoch in range(4):
        (a, na), (b, nb) = chunks_of(0, epoch), chunks_of(1, epoch)
        assert not a & b and len(a | b) == n_chunks  # each chunk in one shard
        assert na + nb == n_chunks  # each patch once per epoch
        per_epoch.append(frozenset(a))
    assert len(set(per_epoch)) > 1, "rank 0 read the same chunks in every epoch"


def test_a_patch_larger_than_the_cube_is_an_error_not_an_empty_stream():
    """The default 64 x 64 on a 61 x 120 grid (the ERA5 sample) yielded nothing, silently."""
    import engine

    ds = engine.open_cube(os.path.join(ROOT, "catalogs", "era5.yaml"), "era5_levels_members")
    with pytest.raises(SpecError, match=r"size.lat=64 is larger than the cube \(lat has 61"):
        engine.iter_patches(ds, variables=["t", "z"], batch_size=8)
    it = engine.iter_patches(ds, variables=["t"], batch_size=8, pad="reflect")
    assert next(iter(it)).data.shape == (8, 1, 64, 64)
