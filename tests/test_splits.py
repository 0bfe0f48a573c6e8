"""Splits are pure functions of (index, seed): deterministic, chunking-invariant, exact."""

import dask
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import CubeError, SpecError
from engine.kernels.splits import block_extents, block_labels, choose_test_blocks, label_counts
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
                                    {"time": 12, "lat": 90, "lon": 180},
                                    {"time": 5, "lat": 31, "lon": 64}])
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
        ({"blocks": {"lat": 90}, "test_fraction": 0.2}, SpecError, "1 block"),
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


# -- keys: a token of all inputs --------------------------------------------------------


def _together_equals_apart(a, b):
    """Compute two splits (and reductions of them) in ONE graph; compare with apart."""
    parts = (a.data, b.data, a.data.astype("i8").sum(), (b.data.astype("i8") * 3).sum())
    together = dask.compute(*parts, scheduler="sync")
    apart = [p.compute(scheduler="sync") for p in parts]
    for t, s in zip(together, apart, strict=True):
        np.testing.assert_array_equal(t, s)


SMALL = {"lat": 5, "lon": 6}


def small(chunks, shape=(20, 24), name="t"):
    ds = xr.Dataset({name: (("lat", "lon"), np.zeros(shape, "f4"))},
                    coords={"lat": np.arange(shape[0]), "lon": np.arange(shape[1])})
    return ds.chunk(chunks)


@pytest.mark.parametrize("change", ["seed", "fraction", "blocks", "buffer", "chunking", "cube"])
def test_block_split_keys_compose_in_one_graph(change):
    base = dict(ds=small(10), blocks=SMALL, test_fraction=0.25, seed=1, buffer={"lat": 1})
    other = dict(base)
    if change == "seed":
        other["seed"] = 2
    elif change == "fraction":
        other["test_fraction"] = 0.4
    elif change == "blocks":
        other["blocks"] = {"lat": 4, "lon": 6}
    elif change == "buffer":
        other["buffer"] = {"lat": 2}
    elif change == "chunking":
        other["ds"] = small(5)
    else:
        other["ds"] = small(10, shape=(20, 30))
    a, b = block_split(**base), block_split(**other)
    assert a.data.name != b.data.name
    _together_equals_apart(a, b)
    assert block_split(**base).data.name == a.data.name  # same inputs, same keys


@pytest.mark.parametrize("change", ["seed", "fraction", "chunking", "cube"])
def test_random_split_keys_compose_in_one_graph(change):
    base = dict(ds=small(10), test_fraction=0.3, seed=1)
    other = dict(base)
    if change == "seed":
        other["seed"] = 2
    elif change == "fraction":
        other["test_fraction"] = 0.6
    elif change == "chunking":
        other["ds"] = small(7)
    else:
        other["ds"] = small(10, shape=(20, 30))
    a, b = random_split(**base), random_split(**other)
    assert a.data.name != b.data.name
    _together_equals_apart(a, b)
    assert random_split(**base).data.name == a.data.name


@pytest.mark.parametrize("change", ["k", "buffer", "periodic", "chunking", "cube"])
def test_geo_kfold_keys_compose_in_one_graph(change):
    base = dict(ds=small(10), k=3, buffer=2, periodic=False)
    other = dict(base)
    if change == "k":
        other["k"] = 4
    elif change == "buffer":
        other["buffer"] = 3
    elif change == "periodic":
        other["periodic"] = True
    elif change == "chunking":
        other["ds"] = small(7)
    else:
        other["ds"] = small(10, shape=(20, 30))
    with raise_if_dask_computes():
        a, b = geo_kfold(**base), geo_kfold(**other)
    assert a.data.name != b.data.name
    _together_equals_apart(a, b)
    assert geo_kfold(**base).data.name == a.data.name


def test_two_block_splits_of_one_cube_chunked_twice_in_one_sum():
    """The gap-fill pattern: a mask built from splits of two chunkings, one compute."""
    ds = small(10)
    a = block_split(ds, SMALL, 0.25, seed=1, buffer={"lat": 1})
    b = block_split(ds.chunk(5), SMALL, 0.25, seed=1, buffer={"lat": 1})
    (got,) = dask.compute((a == 0).sum() + (b == 0).sum() * 1000, scheduler="sync")
    n = int((a == 0).sum().compute())
    assert int(got) == n * 1001


# -- any cube's dims --------------------------------------------------------------------

NAMINGS = {
    "lat/lon": ("lat", "lon", {}, {}),
    "y/x": ("y", "x", {}, {}),
    "latitude/longitude": ("latitude", "longitude", {}, {}),
    "COADS": ("COADSY", "COADSX", {"units": "degrees_north"}, {"units": "degrees_east"}),
    "CF only": ("rows", "cols", {"standard_name": "latitude"},
                {"standard_name": "longitude"}),
}


def named_cube(naming, shape, chunks, depth=None):
    """A cube with the horizontal dims named as ``naming`` and an optional depth dim."""
    yname, xname, yattrs, xattrs = NAMINGS[naming]
    ny, nx = shape
    dims, sizes = [yname, xname], [ny, nx]
    coords = {yname: (yname, np.linspace(-60, 60, ny), yattrs),
              xname: (xname, np.linspace(0, 359, nx), xattrs)}
    if depth:
        dims.insert(0, "depth")
        sizes.insert(0, depth)
        coords["depth"] = ("depth", np.arange(depth) * 10.0, {"positive": "down"})
    ds = xr.Dataset({"v": (tuple(dims), np.zeros(sizes, "f4"))}, coords=coords)
    return ds.chunk(dict(zip(dims, chunks, strict=True)))


@st.composite
def split_cases(draw):
    ny, nx = draw(st.integers(4, 23)), draw(st.integers(4, 23))
    depth = draw(st.sampled_from([None, 3, 5]))
    by, bx = draw(st.integers(1, ny)), draw(st.integers(1, nx))
    if (ny + by - 1) // by * ((nx + bx - 1) // bx) < 3:
        by, bx = 1, 1
    shape_chunks = [draw(st.integers(1, ny)), draw(st.integers(1, nx))]
    if depth:
        shape_chunks.insert(0, draw(st.integers(1, depth)))
    return dict(ny=ny, nx=nx, depth=depth, blocks=(by, bx), chunks=tuple(shape_chunks),
                naming=draw(st.sampled_from(sorted(NAMINGS))),
                fraction=draw(st.sampled_from([0.2, 0.34, 0.5])),
                buffer=draw(st.integers(0, 2)), seed=draw(st.integers(0, 2**31)),
                alias=draw(st.booleans()))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split_cases())
def test_block_split_same_under_renamed_dims_and_any_chunking(case):
    by, bx = case["blocks"]
    depth = case["depth"]
    ref_ds = named_cube("lat/lon", (case["ny"], case["nx"]),
                        ((depth,) if depth else ()) + (case["ny"], case["nx"]), depth)
    ref = block_split(ref_ds, {"lat": by, "lon": bx}, case["fraction"], case["seed"],
                      buffer={"lat": case["buffer"], "lon": case["buffer"]})
    ds = named_cube(case["naming"], (case["ny"], case["nx"]), case["chunks"], depth)
    yname, xname = NAMINGS[case["naming"]][:2]
    keys = ("lat", "lon") if case["alias"] else (yname, xname)
    got = block_split(ds, {keys[0]: by, keys[1]: bx}, case["fraction"], case["seed"],
                      buffer={keys[0]: case["buffer"], keys[1]: case["buffer"]})
    assert got.dims == (yname, xname)
    assert got.chunks == tuple(ds.chunksizes[d] for d in (yname, xname))
    np.testing.assert_array_equal(got.values, ref.values)
    for key in ("split_test_cells", "split_train_cells", "split_buffer_cells"):
        assert got.attrs[key] == ref.attrs[key]


@settings(max_examples=15, deadline=None)
@given(split_cases())
def test_split_with_a_depth_block_is_chunking_invariant(case):
    depth = case["depth"] or 4
    shape = (case["ny"], case["nx"])
    whole = named_cube(case["naming"], shape, (depth, *shape), depth)
    chunks = case["chunks"] if case["depth"] else (1, *case["chunks"])
    ds = named_cube(case["naming"], shape, chunks, depth)
    blocks = {"depth": 2, "y": case["blocks"][0], "x": case["blocks"][1]}
    a = block_split(whole, blocks, 0.3, case["seed"], buffer={"depth": 1})
    b = block_split(ds, blocks, 0.3, case["seed"], buffer={"depth": 1})
    assert b.dims[0] == "depth"
    np.testing.assert_array_equal(a.values, b.values)
    r1 = random_split(whole, 0.3, case["seed"]).values
    r2 = random_split(ds, 0.3, case["seed"]).values
    np.testing.assert_array_equal(r1, r2)


def test_bad_block_key_names_the_key_and_the_cube_dims():
    ds = named_cube("COADS", (10, 12), (10, 12))
    with pytest.raises(CubeError) as exc:
        block_split(ds, {"level": 2, "lat": 5}, 0.3)
    msg = str(exc.value)
    assert "'level'" in msg and "COADSY" in msg and "COADSX" in msg and "\n" not in msg
    with pytest.raises(CubeError, match="split.buffer"):
        block_split(ds, {"lat": 5}, 0.3, buffer={"time": 1})
    with pytest.raises(CubeError, match="twice"):
        block_split(ds, {"lat": 5, "COADSY": 5}, 0.3)


def test_geo_kfold_defaults_to_the_cubes_x_dim():
    for naming in NAMINGS:
        ds = named_cube(naming, (6, 20), (6, 7))
        xname = NAMINGS[naming][1]
        folds = geo_kfold(ds, k=4, buffer=1)
        assert folds.dims == ("fold", xname)
        assert folds.chunks == ((4,), (7, 7, 6))
        ref = geo_kfold(small(10, shape=(6, 20)), k=4, dim="lon", buffer=1)
        np.testing.assert_array_equal(folds.values, ref.values)
        np.testing.assert_array_equal(geo_kfold(ds, k=4, dim="longitude", buffer=1).values,
                                      ref.values)
    with pytest.raises(CubeError, match="geo_kfold.dim"):
        geo_kfold(named_cube("y/x", (6, 20), (6, 7)), dim="band")
    nox = xr.Dataset({"v": (("a", "b"), np.zeros((3, 4)))})
    with pytest.raises(SpecError, match="pass dim="):
        geo_kfold(nox)


# -- test share in cells ----------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.integers(3, 40), st.integers(1, 30), st.integers(2, 12), st.integers(1, 12),
       st.floats(0.1, 0.6), st.integers(0, 1000), st.integers(0, 3))
def test_block_split_test_share_in_cells_within_half_a_block(ny, nx, by, bx, f, seed, w):
    by, bx = min(by, ny), min(bx, nx)
    ds = xr.Dataset({"v": (("y", "x"), np.zeros((ny, nx)))}).chunk({"y": 7, "x": 5})
    n_blocks = -(-ny // by) * -(-nx // bx)
    if n_blocks < 2:
        with pytest.raises(SpecError, match="1 block"):
            block_split(ds, {"y": by, "x": bx}, f, seed)
        return
    split = block_split(ds, {"y": by, "x": bx}, f, seed, buffer={"x": w})
    v = split.values
    total = ny * nx
    assert split.attrs["split_total_cells"] == total
    assert split.attrs["split_test_cells"] == int((v == 0).sum())
    assert split.attrs["split_train_cells"] == int((v == 1).sum())
    assert split.attrs["split_buffer_cells"] == int((v == -1).sum())
    assert split.attrs["split_test_share_cells"] == pytest.approx((v == 0).mean())
    largest = by * bx
    off = abs((v == 0).sum() - f * total)
    n_test = split.attrs["split_n_test_blocks"]
    assert 1 <= n_test < n_blocks
    # within half a block of the target, unless one test (or train) block is already off
    assert off <= largest / 2 + 1e-9 or (n_test in (1, n_blocks - 1) and off <= largest)


def test_a_small_fraction_gives_one_test_block_for_every_seed():
    ds = xr.Dataset({"v": (("x",), np.zeros(100))})
    for seed in range(10):
        split = block_split(ds, {"x": 10}, 0.01, seed)
        assert split.attrs["split_n_test_blocks"] == 1
        assert split.attrs["split_test_cells"] == 10 == int((split.values == 0).sum())


def test_ragged_blocks_share_in_cells_not_in_blocks():
    # blocks of 10, 10 and 1 cells: a third of the blocks is one cell or twenty
    ds = xr.Dataset({"v": (("x",), np.zeros(21))}).chunk(4)
    for seed in range(20):
        split = block_split(ds, {"x": 10}, 1 / 3, seed)
        n_test = int((split.values == 0).sum())
        assert abs(n_test - 7) <= 5, (seed, n_test)
        assert split.attrs["split_test_cells"] == n_test


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 13), min_size=1, max_size=3), st.data())
def test_label_counts_equal_the_full_labels(sizes, data):
    blocks = [data.draw(st.integers(1, n)) for n in sizes]
    buffer = [data.draw(st.integers(0, 4)) for _ in sizes]
    grid = tuple(len(e) for e in block_extents(sizes, blocks))
    test_grid = np.asarray(data.draw(st.lists(st.booleans(), min_size=int(np.prod(grid)),
                                              max_size=int(np.prod(grid))))).reshape(grid)
    full = block_labels([0] * len(sizes), sizes, blocks, test_grid, buffer, sizes)
    want = {"train": int((full == 1).sum()), "test": int((full == 0).sum()),
            "buffer": int((full == -1).sum())}
    assert label_counts(blocks, test_grid, buffer, sizes) == want
    assert label_counts(blocks, test_grid, buffer, sizes, max_elements=3) == want  # slabs


def test_split_attrs_are_json_values():
    import json

    ds = xr.Dataset({"t": (("lat", "lon"), np.zeros((20, 20)))}).chunk(10)
    split = block_split(ds, {"lat": 5, "lon": 5}, 0.25, seed=1, buffer={"lat": 1})
    assert json.loads(split.attrs["split_blocks"]) == {"lat": 5, "lon": 5}
    assert json.loads(split.attrs["split_buffer"]) == {"lat": 1, "lon": 0}
