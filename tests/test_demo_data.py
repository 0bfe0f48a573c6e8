"""The committed COADS demo store, and the converter that made it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr
import zarr

from engine.errors import SpecError, StoreExistsError
from engine.io import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE = os.path.join(ROOT, "catalogs", "data", "coads_climatology.zarr")
VARIABLES = ["SST", "AIRT", "SPEH", "WSPD", "UWND", "VWND", "SLP"]
HAVE_SOURCE = os.path.isfile(demo.DEFAULT_COADS_PATH)
needs_source = pytest.mark.skipif(
    not HAVE_SOURCE, reason="needs Debian's ferret-datasets (apt-get install ferret-datasets)"
)


@pytest.fixture(scope="module")
def cube() -> xr.Dataset:
    with xr.open_zarr(STORE) as ds:
        yield ds.load()


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_store_is_small_zarr_v3_with_work_unit_chunks():
    assert _du(STORE) < 6e6
    group = zarr.open_group(STORE, mode="r")
    assert group.metadata.zarr_format == 3
    for name in VARIABLES:
        arr = group[name]
        assert arr.dtype == np.float32
        assert arr.chunks == (3, 45, 90)  # 4 x 2 x 2 chunks: enough for split tests
        assert arr.compressors  # compressed
    assert group["ocean_mask"].chunks == (45, 90)


def test_canonical_grid(cube):
    assert dict(cube.sizes) == {"time": 12, "lat": 90, "lon": 180}
    lon, lat = cube.lon.values, cube.lat.values
    assert lon.min() >= -180 and lon.max() < 180 and (np.diff(lon) == 2).all()
    assert (np.diff(lat) == 2).all() and lat[0] == -89
    assert cube.time.dtype.kind == "M" and (cube.time.dt.year == 2000).all()
    np.testing.assert_array_equal(cube.month.values, np.arange(1, 13))
    np.testing.assert_array_equal(cube.time.dt.month.values, np.arange(1, 13))
    assert cube.time.attrs["climatology"] == "nominal year 2000"
    assert "wrapped to [-180, 180)" in cube.lon.attrs["comment"]


def test_cf_attributes_and_provenance(cube):
    units = {"SST": "degC", "AIRT": "degC", "SPEH": "g kg-1", "WSPD": "m s-1", "SLP": "hPa"}
    for name, unit in units.items():
        assert cube[name].attrs["units"] == unit
        assert cube[name].attrs["standard_name"]
    assert cube.SST.attrs["standard_name"] == "sea_surface_temperature"
    attrs = cube.attrs
    assert attrs["Conventions"] == "CF-1.8"
    assert attrs["source_package"].startswith("ferret-datasets")
    assert len(attrs["source_sha256"]) == 64
    assert attrs["converter"] == "engine.io.demo.convert_coads"
    assert attrs["source_file"].endswith("coads_climatology.cdf")
    for key in ("engine_version", "date_created", "license", "history"):
        assert attrs[key]
    assert "convert_coads" in attrs["history"]


def test_fill_values_became_nan(cube):
    for name in VARIABLES:
        values = cube[name].values
        assert np.isnan(values).any()
        assert np.nanmin(values) > -100  # no -1e34 left
    # ordinary ranges of the physical quantities
    assert -3 < np.nanmin(cube.SST) and np.nanmax(cube.SST) < 35
    assert 950 < np.nanmin(cube.SLP) and np.nanmax(cube.SLP) < 1060


def test_gap_filling_facts(cube):
    """The numbers the demo job relies on: SST gaps where AIRT exists, and tight coupling."""
    sst, airt = cube.SST, cube.AIRT
    assert 0.40 < float(sst.isnull().mean()) < 0.50
    assert 0.40 < float(airt.isnull().mean()) < 0.50
    gaps = airt.notnull() & sst.isnull()
    assert int(gaps.sum()) == 3516
    assert int((gaps & (cube.ocean_mask == 1)).sum()) > 3000
    both = sst.notnull() & airt.notnull()
    assert float(xr.corr(sst.where(both), airt.where(both))) > 0.99


def test_ocean_mask_is_plausible(cube):
    mask = cube.ocean_mask
    assert mask.dtype == np.int8 and set(np.unique(mask.values)) == {0, 1}
    np.testing.assert_array_equal(mask.values, (cube.ocean_fraction >= 0.5).values)
    assert 0.6 < float(mask.mean()) < 0.75
    # SST is measured by ships: almost all of it falls on ocean cells
    sst_on_ocean = float((cube.SST.notnull() & (mask == 1)).sum() / cube.SST.notnull().sum())
    assert sst_on_ocean > 0.9


@needs_source
def test_converter_reproduces_committed_store(tmp_path, cube):
    dest = str(tmp_path / "coads.zarr")
    assert demo.convert_coads(dest=dest) == dest
    with xr.open_zarr(dest) as fresh:
        fresh = fresh.load()
    xr.testing.assert_equal(fresh, cube)
    for key in ("source_sha256", "converter_version", "source_package", "Conventions"):
        assert fresh.attrs[key] == cube.attrs[key]


@needs_source
def test_existing_store_is_kept_or_refused(tmp_path):
    dest = tmp_path / "coads.zarr"
    demo.convert_coads(dest=str(dest), land_mask=False)
    stamp = xr.open_zarr(dest).attrs["date_created"]
    # same source, same converter: nothing to do
    demo.convert_coads(dest=str(dest), land_mask=False)
    assert xr.open_zarr(dest).attrs["date_created"] == stamp
    # a different conversion (with the mask) must not replace it silently
    with pytest.raises(StoreExistsError, match="overwrite"):
        demo.convert_coads(dest=str(dest), land_mask=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(StoreExistsError):
        demo.convert_coads(dest=str(other), land_mask=False)
    assert (other / "precious.txt").read_text() == "keep"
    # overwrite=True replaces it, and leaves no staging directory behind
    demo.convert_coads(dest=str(other), land_mask=False, overwrite=True)
    assert "SST" in xr.open_zarr(other).data_vars
    assert sorted(os.listdir(tmp_path)) == ["coads.zarr", "other"]


def test_missing_source(tmp_path, capsys):
    with pytest.raises(SpecError, match="ferret-datasets"):
        demo.coads_dataset(str(tmp_path / "nope.cdf"))
    code = demo.main(["--src", str(tmp_path / "nope.cdf"), "--dest", str(tmp_path / "x.zarr")])
    assert code == 2
    assert "COADS source not found" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()
