"""Land fraction / ocean mask from global-land-mask, streamed without importing the package."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import xarray as xr

from engine.errors import MissingExtraError, SpecError
from engine.io import landmask
from engine.io.landmask import land_fraction, landmask_source, ocean_mask

if importlib.util.find_spec("global_land_mask") is None:  # pragma: no cover
    pytest.skip("global-land-mask is not installed (landmask extra)", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE = os.path.join(ROOT, "catalogs", "data", "coads_climatology.zarr")
LAT2 = np.arange(-89.0, 90.0, 2.0)
LON2 = np.arange(-179.0, 180.0, 2.0)


@pytest.fixture(scope="module")
def frac2() -> xr.DataArray:
    """Land fraction on the 2-degree COADS grid (one streamed pass over the mask)."""
    return land_fraction(LAT2, LON2)


@pytest.fixture(scope="module")
def reference_ocean2() -> np.ndarray:
    """Independent reference: the whole mask in memory (~1 GB, once), block sums by reshape."""
    with np.load(landmask_source()) as npz:
        mask = npz["mask"]
        lat_edges = npz["lat"]
    rows = 240  # 2 degrees of 30-arc-second pixels
    w = np.cos(np.deg2rad(lat_edges - 1 / 240)).reshape(90, rows)
    counts = mask.reshape(90, rows, 180, rows).sum(axis=3)  # (lat band, row, lon cell)
    del mask
    ocean = (counts * w[:, :, None]).sum(axis=1) / (w.sum(axis=1)[:, None] * rows)
    return ocean[::-1]  # the npz runs north to south; LAT2 runs south to north


def test_fractions_are_fractions(frac2):
    assert frac2.dims == ("lat", "lon") and frac2.shape == (90, 180)
    assert frac2.dtype == np.float32
    assert float(frac2.min()) >= 0.0 and float(frac2.max()) <= 1.0
    # coastlines give partial cells, oceans and continents whole ones
    assert ((frac2 > 0) & (frac2 < 1)).sum() > 500
    np.testing.assert_array_equal(frac2.lat, LAT2)


def test_streamed_equals_in_memory_reference(frac2, reference_ocean2):
    np.testing.assert_allclose(1.0 - frac2.values, reference_ocean2, atol=1e-6)


@pytest.mark.parametrize(
    ("where", "lat", "lon", "land"),
    [
        ("mid Pacific", 1, -151, 0.0),
        ("central Africa (Congo basin)", 1, 23, 1.0),
        ("Siberia", 61, 101, 1.0),
        ("Sahara", 23, 5, 1.0),
        ("Antarctic plateau", -81, 1, 1.0),
        ("South Atlantic", -31, -15, 0.0),
    ],
)
def test_known_points(frac2, where, lat, lon, land):
    assert float(frac2.sel(lat=lat, lon=lon)) == pytest.approx(land, abs=1e-6), where


def test_global_ocean_share(frac2):
    ocean = 1.0 - frac2
    assert 0.6 < float(ocean.mean()) < 0.75  # share of cells
    w = np.cos(np.deg2rad(frac2.lat))
    area_share = float(ocean.weighted(w).mean())
    assert 0.69 < area_share < 0.73  # the Earth is about 71 % ocean


def test_ocean_mask_threshold(frac2):
    mask = ocean_mask(LAT2, LON2)
    assert mask.dtype == np.int8 and mask.attrs["flag_meanings"] == "land ocean"
    np.testing.assert_array_equal(mask.values, ((1.0 - frac2) >= 0.5).values.astype(np.int8))
    assert int(ocean_mask(LAT2, LON2, threshold=0.0).min()) == 1
    with pytest.raises(SpecError, match="threshold"):
        ocean_mask(LAT2, LON2, threshold=1.5)


def test_grid_conventions_do_not_matter(frac2):
    # descending latitudes and 0..360 longitudes describe the same cells
    other = land_fraction(LAT2[::-1], np.arange(1.0, 360.0, 2.0))
    back = other.isel(lat=slice(None, None, -1))
    back = back.assign_coords(lon=(back.lon + 180) % 360 - 180).sortby("lon")
    np.testing.assert_allclose(back.values, frac2.values, atol=1e-6)


def test_committed_cube_mask_equals_recomputation(frac2):
    with xr.open_zarr(STORE) as ds:
        stored_mask = ds["ocean_mask"].load()
        stored_frac = ds["ocean_fraction"].load()
    np.testing.assert_array_equal(stored_mask.values, ocean_mask(LAT2, LON2).values)
    np.testing.assert_allclose(stored_frac.values, 1.0 - frac2.values, atol=1e-6)
    assert "global-land-mask" in stored_mask.attrs["source"]


@pytest.mark.parametrize(
    ("lat", "lon", "match"),
    [
        (np.array([0.0, 1.0, 3.0]), LON2, "regularly spaced"),
        (np.array([5.0]), LON2, "at least 2"),
        (np.arange(0, 1, 0.001), LON2, "finer than"),
        (np.arange(-89.0, 90.0, 2.0), np.arange(0.0, 720.0, 2.0), "more than the globe"),
    ],
)
def test_bad_grids(lat, lon, match):
    with pytest.raises(SpecError, match=match):
        land_fraction(lat, lon)


def test_unknown_source():
    with pytest.raises(SpecError, match="not supported"):
        land_fraction(LAT2, LON2, source="basemap")  # type: ignore[arg-type]


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(landmask.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError, match=r"cube-engine\[landmask\]"):
        land_fraction(LAT2, LON2)


def test_mask_file_is_found_without_importing_the_package():
    # importing global_land_mask would decompress 933 MB; the engine must never do it
    code = (
        "import sys; from engine.io.landmask import landmask_source; p = landmask_source(); "
        "assert 'global_land_mask' not in sys.modules; print(p)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    assert path.endswith("globe_combined_mask_compressed.npz")
    assert "mask.npy" in zipfile.ZipFile(path).namelist()
