"""Dims are found by CF attributes or by name; nothing assumes lat/lon."""

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.dims import cube_dims, horizontal_dims, resolve_dim, resolve_keys
from engine.errors import CubeError


def cube(names, attrs=None):
    shape = tuple(range(2, 2 + len(names)))
    coords = {n: (n, np.arange(s, dtype=float), (attrs or {}).get(n, {}))
              for n, s in zip(names, shape, strict=True)}
    return xr.Dataset({"v": (names, np.zeros(shape))}, coords=coords)


@pytest.mark.parametrize("names, y, x", [
    (("time", "lat", "lon"), "lat", "lon"),
    (("time", "latitude", "longitude"), "latitude", "longitude"),
    (("T", "COADSY", "COADSX"), "COADSY", "COADSX"),
    (("y", "x"), "y", "x"),
    (("depth", "rlat", "rlon"), "rlat", "rlon"),
])
def test_by_name(names, y, x):
    assert horizontal_dims(cube(names)) == (y, x)


def test_by_cf_attributes_whatever_the_names():
    ds = cube(("when", "level_m", "north", "east"),
              {"north": {"units": "degrees_north"}, "east": {"standard_name": "longitude"},
               "when": {"units": "days since 2000-01-01"}, "level_m": {"positive": "down"}})
    d = cube_dims(ds)
    assert (d.y, d.x, d.time, d.vertical) == ("north", "east", "when", "level_m")


def test_axis_attribute_wins_over_the_name():
    ds = cube(("lat", "b"), {"lat": {"axis": "X"}, "b": {"axis": "Y"}})
    assert horizontal_dims(ds) == ("b", "lat")


def test_unknown_dims_ask_for_names():
    ds = cube(("row", "col"))
    with pytest.raises(CubeError, match="input.dims"):
        horizontal_dims(ds)
    assert horizontal_dims(ds, {"y": "row", "x": "col"}) == ("row", "col")
    with pytest.raises(CubeError, match="not a dimension"):
        cube_dims(ds, {"y": "nope"})


def test_two_candidates_are_an_error():
    ds = cube(("lat", "latitude", "lon"))
    with pytest.raises(CubeError, match="could each be"):
        cube_dims(ds)


def test_resolve_aliases():
    ds = cube(("time", "depth", "COADSY", "COADSX"),
              {"COADSY": {"units": "degrees_north"}, "COADSX": {"units": "degrees_east"}})
    assert resolve_dim(ds, "lat") == "COADSY" and resolve_dim(ds, "longitude") == "COADSX"
    assert resolve_dim(ds, "level") == "depth" and resolve_dim(ds, "t") == "time"
    assert resolve_keys(ds, {"lat": 1, "x": 2}, "split.blocks") == {"COADSY": 1, "COADSX": 2}
    with pytest.raises(CubeError, match="twice"):
        resolve_keys(ds, {"lat": 1, "COADSY": 2}, "split.blocks")
    with pytest.raises(CubeError, match="nope"):
        resolve_dim(ds, "nope")


@settings(max_examples=40, deadline=None)
@given(st.permutations(["tim", "lev", "north", "east"]))
def test_cf_roles_do_not_depend_on_dim_order(order):
    attrs = {"north": {"standard_name": "latitude"}, "east": {"units": "degrees_east"},
             "tim": {"axis": "T"}, "lev": {"axis": "Z"}}
    d = cube_dims(cube(tuple(order), attrs))
    assert (d.y, d.x, d.time, d.vertical) == ("north", "east", "tim", "lev")
