"""Splits are pure functions of (index, seed): deterministic, chunking-invariant, exact."""

import numpy as np
import pytest
import xarray as xr

from engine.errors import CubeError, SpecError
from engine.kernels.splits import block_labels, choose_test_blocks
from engine.ops.splits import block_split, geo_kfold, random_split
from engine.testing.checks import raise_if_dask_computes
from engine.testing.clusters import process_client

BLOCKS = {"time": 3, "lat": 10, "lon": 10}


def cube(chunks):
    data = np.zeros((12, 90, 180), "f4")
    ds = xr.Dataset({"t": (("time", "lat", "lon"), data)},
                    coords={"lat": np.arange(90), "lon": np.arange(180)})
    return ds.chunk(chunks) if chunks else ds


@pytest.mark.parametrize("chunks", [None, {"time": 1, "lat": 7, "lon": 13},
                                    {"time": 12, "lat": 90, "lon": 180}, {"time": 5, "lat": 31, "lon": 64}])
def test_block_split_chunking_invariant(chunks):
    ref = block_split(cube({"time": 3, "lat": 45, "lon": 90}), BLOCKS, 0.2, seed=3,
                      buffer={"lat": 1, "lon": 2}).values
    got = block_split(cube(chunks), BLOCKS, 0.2, seed=3, buffer={"lat": 1, "lon": 2}).values
    np.testing.assert_array_equal(ref, got)


def test_block_split_is_lazy_and_stable_across_computes():
    ds = cube({"time": 3, "lat": 45, "lon": 90})
    with raise_if_dask_computes():
        split = block_split(ds, BLOCKS, 0.2, seed=0)
    a = split.compute().values
    b = split.compute().values
    np.testing.assert_array_equal(a, b)
    # train and test masks from separate computes partition the cube (ml4xcube's do not)
    n_train = int((split == 1).sum().compute())
    n_test = int((split == 0).sum().compute())
    assert n_train + n_test == split.size


def test_block_split_same_on_multiprocess_cluster():
    ds = cube({"time": 3, "lat": 45, "lon": 90})
    local = block_split(ds, BLOCKS, 0.2, seed=7, buffer={"lat": 1}).compute(scheduler="sync").values
    with process_client(2):
        dist = block_split(ds, BLOCKS, 0.2, seed=7, buffer={"lat": 1}).compute().values
    np.testing.assert_array_equal(local, dist)


def test_block_split_exact_test_count_and_whole_blocks():
    split = block_split(cube(None), BLOCKS, 0.2, seed=1).values
    n_blocks = 4 * 9 * 18
    blocks = split.reshape(4, 3, 9, 10, 18, 10)
    per_block = blocks.min(axis=(1, 3, 5)), blocks.max(axis=(1, 3, 5))
    np.testing.assert_array_equal(per_block[0], per_block[1])  # constant inside a block
    assert (per_block[0] == 0).sum() == round(0.2 * n_blocks)


def test_block_split_seed_changes_assignment():
    a = block_split(cube(None), BLOCKS, 0.2, seed=1).values
    b = block_split(cube(None), BLOCKS, 0.2, seed=2).values
    assert (a != b).any()


def test_buffer_separates_train_from_test():
    split = block_split(cube(None), {"lat": 10, "lon": 10}, 0.3, seed=0,
                        buffer={"lat": 2, "lon": 2}).values
    test = split == 0
    train = split == 1
    # grow test by the buffer; no train cell may fall inside
    grown = test.copy()
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            grown |= np.roll(np.roll(test, dy, 0), dx, 1) & _valid_shift(test.shape, dy, dx)
    assert not (grown & train).any()
    assert (split == -1).any()


def _valid_shift(shape, dy, dx):
    m = np.ones(shape, bool)
    if dy > 0:
        m[:dy] = False
    elif dy < 0:
        m[dy:] = False
    if dx > 0:
        m[:, :dx] = False
    elif dx < 0:
        m[:, dx:] = False
    return m


def test_ragged_edge_blocks():
    ds = xr.Dataset({"t": (("lat", "lon"), np.zeros((23, 17)))}).chunk({"lat": 5, "lon": 4})
    split = block_split(ds, {"lat": 10, "lon": 10}, 0.5, seed=0).values
    assert split.shape == (23, 17)
    assert set(np.unique(split)) <= {0, 1}


def test_kernel_matches_full_computation_on_any_box():
    grid = (3, 4)
    test_grid = choose_test_blocks(grid, 5, seed=9)
    full = block_labels([0, 0], [25, 37], [10, 10], test_grid, [2, 1], [25, 37])
    box = block_labels([7, 11], [9, 13], [10, 10], test_grid, [2, 1], [25, 37])
    np.testing.assert_array_equal(full[7:16, 11:24], box)


@pytest.mark.parametrize(
    "kwargs, err, words",
    [
        ({"blocks": {"depth": 3}}, CubeError, "depth"),
        ({"blocks": {"lat": 100}}, SpecError, "larger than the cube"),
        ({"blocks": {"lat": 0}}, SpecError, "positive integer"),
        ({"blocks": BLOCKS, "test_fraction": 1.2}, SpecError, "(0, 1)"),
        ({"blocks": BLOCKS, "test_fraction": 0.0}, SpecError, "(0, 1)"),
        ({"blocks": {"lat": 90}, "test_fraction": 0.2}, SpecError, "test blocks"),
        ({"blocks": BLOCKS, "buffer": {"lat": -1}}, SpecError, "non-negative"),
    ],
)
def test_block_split_bad_input(kwargs, err, words):
    with pytest.raises(err, match=None) as exc:
        block_split(cube(None), **kwargs)
    assert words in str(exc.value)


def test_random_split_invariant_and_share():
    a = random_split(cube({"time": 3, "lat": 45, "lon": 90}), 0.3, seed=2).values
    b = random_split(cube({"time": 12, "lat": 9, "lon": 180}), 0.3, seed=2).values
    np.testing.assert_array_equal(a, b)
    assert abs((a == 0).mean() - 0.3) < 0.01


def test_geo_kfold_contiguous_and_buffered():
    folds = geo_kfold(cube(None), k=5, dim="lon", buffer=3)
    assert folds.dims == ("fold", "lon")
    v = folds.values
    # every longitude is test in exactly one fold
    np.testing.assert_array_equal((v == 0).sum(axis=0), np.ones(180))
    for i in range(5):
        idx = np.flatnonzero(v[i] == 0)
        assert (np.diff(idx) == 1).all()
        lo, hi = idx[0], idx[-1]
        assert ((v[i, max(lo - 3, 0):lo] == -1).all() and (v[i, hi + 1:hi + 4] == -1).all())
    wrap = geo_kfold(cube(None), k=5, dim="lon", buffer=3, periodic=True).values
    assert (wrap[0, -3:] == -1).all()
