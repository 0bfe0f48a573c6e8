"""Any dims: catalog ``chunks:``, ``chunks=`` and ``sel=`` accept canonical names, aliases
and the store's own names; dims are canonicalised by alias or CF attributes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr
import yaml

from engine.errors import CubeError
from engine.io.catalog import describe_entry, open_cube, read_entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "catalogs", "demo.yaml")
ENTRY = "coads_climatology"
READER = "intake.readers.readers:XArrayDatasetReader"


def _sizes(ds: xr.Dataset) -> dict[str, int]:
    return {str(d): c[0] for d, c in ds.chunks.items()}


def _catalog(tmp_path, url: str, chunks: dict | None = None) -> str:
    datatype = "NetCDF3" if url.endswith(".nc") else "Zarr"
    entry: dict = {"reader": READER, "kwargs": {"args": ["{data(store)}"]}}
    if chunks is not None:
        entry["kwargs"]["chunks"] = chunks
    doc = {
        "version": 2,
        "data": {"store": {"datatype": f"intake.readers.datatypes:{datatype}",
                           "kwargs": {"url": url}}},
        "entries": {"cube": entry},
    }
    path = tmp_path / "cat.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.mark.parametrize("name", ["lat", "latitude", "LATITUDE", "y", "COADSY", "y_lat"])
def test_chunks_accept_aliases(name):
    assert _sizes(open_cube(DEMO, ENTRY, chunks={name: 90, "t": 6})) == {
        "time": 6, "lat": 90, "lon": 90}


@pytest.mark.parametrize("name", ["lat", "latitude", "y", "COADSY"])
def test_sel_accepts_aliases(name):
    ds = open_cube(DEMO, ENTRY, sel={name: slice(-30, 30), "x": slice(0, 10)})
    ref = open_cube(DEMO, ENTRY, sel={"lat": slice(-30, 30), "lon": slice(0, 10)})
    xr.testing.assert_identical(ds, ref)
    assert ds.sizes["lat"] == 30 and ds.sizes["lon"] == 5


def test_entry_chunks_with_aliases_are_the_same_as_canonical(tmp_path):
    store = os.path.join(ROOT, "catalogs", "data", "coads_climatology.zarr")
    aliased = _catalog(tmp_path, store, {"latitude": 90, "COADSX": 180, "T": 6})
    assert read_entry(aliased, "cube").chunks == {"latitude": 90, "COADSX": 180, "T": 6}
    assert _sizes(open_cube(aliased, "cube")) == {"time": 6, "lat": 90, "lon": 180}
    assert describe_entry(aliased, "cube")["chunks"] == {"time": 6, "lat": 90, "lon": 180}


def test_one_dim_named_twice_is_an_error():
    with pytest.raises(CubeError, match="twice"):
        open_cube(DEMO, ENTRY, chunks={"lat": 45, "latitude": 90})
    with pytest.raises(CubeError, match="sel dimension 'depth'"):
        open_cube(DEMO, ENTRY, sel={"depth": 0})


def _nc(tmp_path, dims, attrs, extra=None, name="cube.nc") -> str:
    shape = (2, 3, 4)
    coords = {d: (d, np.arange(n, dtype="f8"), a) for d, n, a in zip(dims, shape, attrs,
                                                                      strict=True)}
    ds = xr.Dataset({"v": (dims, np.arange(24, dtype="f4").reshape(shape))}, coords=coords)
    if extra:
        ds = ds.assign(extra)
    ds.to_netcdf(tmp_path / name, engine="scipy")
    return _catalog(tmp_path, name)


def test_dims_found_by_cf_attributes_are_canonicalised(tmp_path):
    path = _nc(
        tmp_path,
        ("TT", "YAX", "XAX"),
        [{"axis": "T"}, {"units": "degrees_north"}, {"standard_name": "longitude"}],
    )
    ds = open_cube(path, "cube", chunks={"YAX": 3, "XAX": -1}, sel={"TT": 1.0})
    assert dict(ds.sizes) == {"lat": 3, "lon": 4}
    assert ds.v.values.tolist() == np.arange(12, 24).reshape(3, 4).tolist()
    info = describe_entry(path, "cube", chunks={"y": 3})
    assert info["dims"] == {"time": 2, "lat": 3, "lon": 4} and info["chunks"]["lat"] == 3
    path = _nc(tmp_path, ("time", "gy", "gx"), [{}, {"axis": "Y"}, {"axis": "X",
                                                                   "units": "degree_E"}],
               name="axis.nc")
    assert dict(open_cube(path, "cube").sizes) == {"time": 2, "lat": 3, "lon": 4}


def test_projected_rotated_or_taken_names_are_not_renamed(tmp_path):
    projected = _nc(
        tmp_path,
        ("time", "y", "x"),
        [{}, {"standard_name": "projection_y_coordinate", "units": "m", "axis": "Y"},
         {"standard_name": "projection_x_coordinate", "units": "m", "axis": "X"}],
    )
    ds = open_cube(projected, "cube", chunks={"y": 3})
    assert dict(ds.sizes) == {"time": 2, "y": 3, "x": 4}
    rotated = _nc(tmp_path, ("time", "rlat", "rlon"),
                  [{}, {"standard_name": "grid_latitude", "units": "degrees"},
                   {"standard_name": "grid_longitude", "units": "degrees"}], name="rot.nc")
    assert set(open_cube(rotated, "cube").dims) == {"time", "rlat", "rlon"}
    taken = _nc(tmp_path, ("time", "j", "i"),
                [{}, {"units": "degrees_north"}, {"units": "degrees_east"}],
                extra={"lat": (("j", "i"), np.zeros((3, 4)))}, name="taken.nc")
    ds = open_cube(taken, "cube")
    assert set(ds.dims) == {"time", "j", "lon"} and "lat" in ds.data_vars
    assert _sizes(open_cube(taken, "cube", chunks={"latitude": 2}))["j"] == 2
