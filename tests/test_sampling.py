"""Label-centred patch sampling (engine.ops.sampling): exactly the windows inside the
region whose centre is labelled (plus a seeded random share), whatever the chunking."""

import numpy as np
import pytest
import xarray as xr

from engine.errors import CubeError, SpecError
from engine.ops.sampling import hash_field, region_statistics, sample_patches


def _cube(ny=40, nx=60, seed=0, chunks=(16, 20)):
    rng = np.random.default_rng(seed)
    label = (rng.random((ny, nx)) < 0.08).astype(np.float32)
    a = rng.normal(size=(ny, nx)).astype(np.float32)
    ds = xr.Dataset({"a": (("lat", "lon"), a), "label": (("lat", "lon"), label)},
                    coords={"lat": np.linspace(80, -80, ny), "lon": np.linspace(-170, 170, nx)})
    return ds.chunk({"lat": chunks[0], "lon": chunks[1]})


def _expected(ds, region_x, size, stride, random_share=0.0, seed=0):
    """Brute force: window starts on the global grid, wholly in the region, centre
    labelled or hashed below the share."""
    label = ds["label"].values
    h = hash_field(ds["label"], seed).values
    ny, nx = label.shape
    out = set()
    for i in range(0, ny - size + 1, stride):
        for j in range(0, nx - size + 1, stride):
            if not region_x[j:j + size].all():
                continue
            c = (i + size // 2, j + size // 2)
            if label[c] == 1 or h[c] < random_share:
                out.add((i, j))
    return out


def _positions(sampled):
    got = [tuple(p) for b in sampled for p in b.positions.tolist()]
    assert len(got) == len(set(got)), "a window came twice"
    return set(got)


@pytest.mark.parametrize("chunks", [(16, 20), (40, 60), (7, 13)])
def test_exactly_the_label_centred_windows_inside_the_region(chunks):
    ds = _cube(chunks=chunks)
    region_x = np.zeros(60, bool)
    region_x[5:33] = True
    region = xr.DataArray(region_x, dims="lon")
    s = sample_patches(ds, ["a", "label"], region, size={"lat": 8, "lon": 8}, stride=4,
                       centre=ds["label"], batch_size=5, shuffle=False)
    got = _positions(s)
    want = _expected(ds, region_x, 8, 4)
    assert got == want and len(want) > 3
    # nothing outside the region: every column of every window is in it
    assert all(region_x[j:j + 8].all() for _, j in got)


def test_channels_are_the_variables_only_and_values_match_the_cube():
    ds = _cube()
    region = xr.DataArray(np.ones(60, bool), dims="lon")
    s = sample_patches(ds, ["a", "label"], region, size={"lat": 8, "lon": 8}, stride=4,
                       centre=ds["label"], batch_size=64, shuffle=True, seed=3)
    a = ds["a"].values
    label = ds["label"].values
    n = 0
    for b in s:
        assert b.data.shape[1:] == (2, 8, 8) and b.data.flags["C_CONTIGUOUS"]
        for patch, (i, j) in zip(b.data, b.positions.tolist(), strict=True):
            np.testing.assert_array_equal(patch[0], a[i:i + 8, j:j + 8])
            assert patch[1][4, 4] == 1  # centred on a labelled pixel
            np.testing.assert_array_equal(patch[1], label[i:i + 8, j:j + 8])
            n += 1
    assert n == len(_expected(ds, np.ones(60, bool), 8, 4))


def test_random_share_is_seeded_and_chunking_invariant():
    ds = _cube()
    region = xr.DataArray(np.ones(60, bool), dims="lon")
    kw = dict(size={"lat": 8, "lon": 8}, stride=2, centre=ds["label"], random_share=0.3,
              shuffle=False)
    base = _positions(sample_patches(ds, ["a"], region, seed=1, **kw))
    assert base == _expected(ds, np.ones(60, bool), 8, 2, 0.3, seed=1)
    rechunked = ds.chunk({"lat": 9, "lon": 31})
    assert _positions(sample_patches(rechunked, ["a"], region, seed=1, **kw)) == base
    other = _positions(sample_patches(ds, ["a"], region, seed=2, **kw))
    assert other != base
    centred = _positions(sample_patches(ds, ["a"], region, seed=1,
                                        **{**kw, "random_share": 0.0}))
    assert centred < base  # the share adds windows to the centred ones
    n_grid = len(range(0, 33, 2)) * len(range(0, 53, 2))
    extra = len(base) - len(centred)
    assert 0.15 * (n_grid - len(centred)) < extra < 0.45 * (n_grid - len(centred))


def test_without_centre_every_window_inside_the_region():
    ds = _cube()
    region = xr.DataArray(np.arange(60) >= 20, dims="lon")
    got = _positions(sample_patches(ds, ["a"], region, size={"lat": 10, "lon": 10},
                                    shuffle=False))
    assert got == {(i, j) for i in range(0, 31, 10) for j in (20, 30, 40, 50)}


def test_shuffled_epochs_differ_in_order_not_in_content():
    ds = _cube()
    region = xr.DataArray(np.ones(60, bool), dims="lon")
    s = sample_patches(ds, ["a"], region, size={"lat": 8, "lon": 8}, stride=4,
                       centre=ds["label"], batch_size=4, shuffle=True, seed=0, cache=True)
    first = [tuple(p) for b in s for p in b.positions.tolist()]
    s.set_epoch(1)
    second = [tuple(p) for b in s for p in b.positions.tolist()]
    assert sorted(first) == sorted(second) and first != second


def test_region_statistics_use_the_region_only():
    ds = _cube()
    region = xr.DataArray(np.arange(60) < 25, dims="lon")
    mean, std, n = region_statistics(ds, ["a"], region)
    vals = ds["a"].values[:, :25]
    assert n == vals.size
    assert mean[0] == pytest.approx(vals.mean(), rel=1e-6)
    assert std[0] == pytest.approx(vals.std(), rel=1e-5)
    all_mean = region_statistics(ds, ["a"], xr.DataArray(np.ones(60, bool), dims="lon"))[0]
    assert all_mean[0] != pytest.approx(mean[0])


def test_bad_arguments_are_one_line():
    ds = _cube()
    region = xr.DataArray(np.ones(60, bool), dims="lon")
    with pytest.raises(CubeError, match="not in the cube"):
        sample_patches(ds, ["nope"], region, size={"lat": 8, "lon": 8})
    with pytest.raises(SpecError, match="random_share"):
        sample_patches(ds, ["a"], region, size={"lat": 8, "lon": 8}, random_share=2)
    with pytest.raises(CubeError, match="dims"):
        sample_patches(ds, ["a"], xr.DataArray(np.ones(3, bool), dims="time"),
                       size={"lat": 8, "lon": 8})
