"""Intake 2 and V1 catalogs: lazy opening, chunk plans, descriptions and errors."""

from __future__ import annotations

import math
import os
import shutil
import socket
import textwrap

import dask
import numpy as np
import pytest
import xarray as xr
import yaml

from engine.errors import CatalogError, CubeError, EngineError, SpecError
from engine.io.catalog import (
    coarsen_chunks,
    describe_entry,
    list_entries,
    open_cube,
    read_entry,
    storage_chunks,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOGS = os.path.join(ROOT, "catalogs")
DEMO = os.path.join(CATALOGS, "demo.yaml")
DEMO_V1 = os.path.join(CATALOGS, "demo_v1.yaml")
ESDC = os.path.join(CATALOGS, "esdc.yaml")
STORE = os.path.join(CATALOGS, "data", "coads_climatology.zarr")
ENTRY = "coads_climatology"


def _raise_on_compute(*args, **kwargs):
    raise AssertionError("a dask computation ran while opening the cube")


def _without_catalog_attr(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs.pop("engine_catalog")
    return ds


def _write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def _v2_catalog(url: str, chunks: dict | None = None, *, full: bool = False) -> str:
    """A one-entry Intake 2 catalog as YAML text.

    ``full`` spells out every key plain intake requires; without it the catalog is the
    shortest hand-written form, which the engine accepts too.
    """
    datatype = "NetCDF3" if url.endswith(".nc") else "Zarr"
    data = {"datatype": f"intake.readers.datatypes:{datatype}", "kwargs": {"url": url}}
    entry = {
        "reader": "intake.readers.readers:XArrayDatasetReader",
        "kwargs": {"args": ["{data(store)}"]},
        "metadata": {"description": "a test cube"},
    }
    if chunks is not None:
        entry["kwargs"]["chunks"] = chunks
    cat = {"version": 2, "data": {"store": data}, "entries": {"cube": entry}}
    if full:
        data.update(metadata={}, user_parameters={})
        entry.update(user_parameters={}, output_instance="xarray:Dataset")
        cat.update(user_parameters={}, aliases={}, metadata={})
    return yaml.safe_dump(cat)


# ----------------------------------------------------------------------------- V1 == V2


def test_v1_and_v2_catalogs_open_the_same_dataset():
    v2 = open_cube(DEMO, ENTRY)
    v1 = open_cube(DEMO_V1, ENTRY)
    xr.testing.assert_identical(_without_catalog_attr(v2), _without_catalog_attr(v1))
    assert v2.chunks == v1.chunks
    assert v2.attrs["engine_catalog"] == DEMO and v1.attrs["engine_catalog"] == DEMO_V1
    assert v2.attrs["engine_entry"] == ENTRY
    with xr.open_zarr(STORE) as direct:
        xr.testing.assert_equal(v2.load(), direct.load())


def test_v2_catalog_dir_template_and_relative_url_agree(tmp_path):
    shutil.copytree(STORE, tmp_path / "data" / "c.zarr")
    relative = open_cube(_write(tmp_path / "rel.yaml", _v2_catalog("data/c.zarr")), "cube")
    templated = open_cube(
        _write(tmp_path / "tpl.yaml", _v2_catalog("{CATALOG_DIR}/data/c.zarr")), "cube"
    )
    xr.testing.assert_identical(_without_catalog_attr(relative), _without_catalog_attr(templated))
    assert read_entry(tmp_path / "rel.yaml", "cube").url == str(tmp_path / "data" / "c.zarr")


def test_plain_intake_reads_the_same_v2_entry(tmp_path):
    """Our YAML is real Intake 2: intake itself opens it (with {CATALOG_DIR})."""
    import intake

    shutil.copytree(STORE, tmp_path / "c.zarr")
    path = _write(tmp_path / "cat.yaml", _v2_catalog("{CATALOG_DIR}/c.zarr", {}, full=True))
    via_intake = intake.from_yaml_file(path)["cube"].read()
    ours = open_cube(path, "cube")
    xr.testing.assert_equal(via_intake, ours)


@pytest.mark.parametrize("flavour", ["v1", "v2"])
def test_netcdf_entries(tmp_path, flavour):
    ds = xr.Dataset(
        {"T": (("TIME", "LATITUDE", "LONGITUDE"), np.arange(24, dtype="f4").reshape(2, 3, 4))},
        coords={"TIME": [0.0, 1.0], "LATITUDE": [-1.0, 0.0, 1.0], "LONGITUDE": np.arange(4.0)},
    )
    ds.to_netcdf(tmp_path / "cube.nc", engine="scipy")
    if flavour == "v2":
        path = _write(tmp_path / "cat.yaml", _v2_catalog("cube.nc"))
    else:
        path = _write(
            tmp_path / "cat.yaml",
            """\
            sources:
              cube:
                driver: intake_xarray.netcdf.NetCDFSource
                args:
                  urlpath: '{{ CATALOG_DIR }}/cube.nc'
                  xarray_kwargs: {engine: scipy}
            """,
        )
    cube = open_cube(path, "cube")
    assert dict(cube.sizes) == {"time": 2, "lat": 3, "lon": 4}  # aliases renamed
    assert cube["T"].chunks is not None
    np.testing.assert_array_equal(cube["T"].values, ds["T"].values)


def test_v1_parameters_and_env(tmp_path, monkeypatch):
    shutil.copytree(STORE, tmp_path / "c.zarr")
    monkeypatch.setenv("CUBE_ENGINE_TEST_STORE", "c.zarr")
    path = _write(
        tmp_path / "cat.yaml",
        """\
        sources:
          cube:
            driver: zarr
            parameters:
              tchunk: {type: int, default: 6}
            args:
              urlpath: "{{ CATALOG_DIR }}/{{ env(CUBE_ENGINE_TEST_STORE) }}"
              chunks: {time: "{{ tchunk }}"}
        """,
    )
    allowed = ["CUBE_ENGINE_TEST_STORE"]
    assert read_entry(path, "cube", allow_env=allowed).chunks == {"time": 6}
    assert open_cube(path, "cube", allow_env=allowed).chunks["time"] == (6, 6)
    with dask.config.set({"engine.catalog.allow-env": allowed}):
        assert read_entry(path, "cube").url == str(tmp_path / "c.zarr")


# ---------------------------------------------------------------------------------- lazy


def test_open_and_describe_compute_nothing():
    with dask.config.set(scheduler=_raise_on_compute):
        ds = open_cube(DEMO, ENTRY, variables=["SST", "AIRT"], sel={"lat": slice(-30, 30)})
        describe_entry(DEMO, ENTRY)
    assert all(isinstance(v.data, dask.array.Array) for v in ds.data_vars.values())
    assert ds.SST.chunks == ((3, 3, 3, 3), (15, 15), (90, 90))


def test_no_data_chunk_is_read_on_open(tmp_path):
    """Corrupt every data chunk: opening and describing still work, computing fails."""
    store = tmp_path / "data" / "c.zarr"
    shutil.copytree(STORE, store)
    for name in ("SST", "AIRT", "SLP", "SPEH", "UWND", "VWND", "WSPD", "ocean_mask"):
        for root, _, files in os.walk(store / name / "c"):
            for f in files:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"not a blosc frame")
    path = _write(tmp_path / "cat.yaml", _v2_catalog("data/c.zarr"))
    ds = open_cube(path, "cube")
    info = describe_entry(path, "cube")
    assert info["variables"]["SST"]["dtype"] == "float32"
    with pytest.raises(Exception):  # noqa: B017 - any decode error proves the read is lazy
        ds.SST.isel(time=0, lat=0, lon=0).compute()


# -------------------------------------------------------------------------------- chunks


def test_entry_chunks_are_work_units():
    ds = open_cube(DEMO, ENTRY)
    assert {d: c[0] for d, c in ds.chunks.items()} == {"time": 3, "lat": 45, "lon": 90}


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ("storage", {"time": 3, "lat": 45, "lon": 90}),
        ("auto", {"time": 12, "lat": 90, "lon": 180}),  # the demo is far below 128 MB
        ({"time": 1}, {"time": 3, "lat": 45, "lon": 90}),  # rounded up to storage
        ({"time": 4, "lon": -1}, {"time": 6, "lat": 45, "lon": 180}),
        ({"lon": 100}, {"time": 3, "lat": 45, "lon": 180}),
    ],
)
def test_chunk_overrides_stay_aligned(chunks, expected):
    ds = open_cube(DEMO, ENTRY, chunks=chunks)
    assert {d: c[0] for d, c in ds.chunks.items()} == expected


def test_auto_chunks_follow_target_mb():
    ds = open_cube(DEMO, ENTRY, chunks="auto", target_mb=0.2)
    sizes = {d: c[0] for d, c in ds.chunks.items()}
    assert sizes["time"] % 3 == 0 and sizes["lat"] % 45 == 0 and sizes["lon"] % 90 == 0
    assert math.prod(sizes.values()) * 4 <= 0.2 * 2**20
    with dask.config.set({"engine.chunks.target-mb": 0.2}):
        assert open_cube(DEMO, ENTRY, chunks="auto").chunks == ds.chunks


def test_coarsen_chunks_property():
    """Whole multiples of storage, within the budget, and no dim could grow one more step."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        ndim = int(rng.integers(1, 4))
        dims = ["time", "lat", "lon"][:ndim]
        sizes = {d: int(rng.integers(1, 5000)) for d in dims}
        storage = {d: int(rng.integers(1, sizes[d] + 1)) for d in dims}
        variables = [(tuple(dims), int(rng.choice([1, 4, 8]))), ((dims[-1],), 8)]
        target = int(rng.integers(1, 2**28))
        plan = coarsen_chunks(sizes, storage, variables, target)

        def nbytes(p, variables=variables):
            return max(i * math.prod(p[d] for d in vd) for vd, i in variables)

        for d in dims:
            assert plan[d] == sizes[d] or plan[d] % storage[d] == 0
            assert plan[d] >= min(storage[d], sizes[d])
        start = {d: min(storage[d], sizes[d]) for d in dims}
        assert nbytes(plan) <= max(target, nbytes(start))
        for d in dims:
            if plan[d] < sizes[d] and nbytes(start) <= target:
                grown = dict(plan, **{d: min(plan[d] + storage[d], sizes[d])})
                assert nbytes(grown) > target


def test_storage_chunks_use_lcm_and_shards(tmp_path):
    ds = xr.Dataset(
        {
            "a": (("time", "lat"), np.zeros((12, 10), "f4")),
            "b": (("time", "lat"), np.zeros((12, 10), "f4")),
        }
    )
    ds.to_zarr(
        tmp_path / "s.zarr",
        zarr_format=3,
        encoding={"a": {"chunks": (2, 5)}, "b": {"chunks": (3, 5), "shards": (6, 10)}},
        consolidated=False,
    )
    with xr.open_zarr(tmp_path / "s.zarr", chunks=None, consolidated=False) as reopened:
        assert storage_chunks(reopened) == {"time": 6, "lat": 10}


# ----------------------------------------------------------------------------- describe


def test_describe_entry_keys():
    info = describe_entry(DEMO, ENTRY)
    for key in (
        "name",
        "catalog",
        "catalog_version",
        "description",
        "metadata",
        "url",
        "format",
        "storage_options",
        "dims",
        "extent",
        "variables",
        "storage_chunks",
        "chunks",
        "nbytes",
        "n_chunks",
        "attrs",
        "provenance",
    ):
        assert key in info, key
    assert info["dims"] == {"time": 12, "lat": 90, "lon": 180}
    assert info["chunks"] == {"time": 3, "lat": 45, "lon": 90}
    assert info["storage_chunks"] == {"time": 3, "lat": 45, "lon": 90}
    sst = info["variables"]["SST"]
    assert sst["dtype"] == "float32" and sst["units"] == "degC" and sst["n_chunks"] == 16
    assert sst["long_name"] == "sea surface temperature"
    assert sst["nbytes"] == 12 * 90 * 180 * 4
    assert info["n_chunks"] == 7 * 16 + 2 * 4
    assert info["extent"]["lon"] == [-179.0, 179.0]
    assert info["provenance"]["source_package"].startswith("ferret-datasets")
    assert "Ferret" in info["metadata"]["license"]


def test_list_entries():
    (entry,) = list_entries(DEMO)
    assert entry["name"] == ENTRY and entry["format"] == "zarr"
    assert entry["url"] == STORE and entry["catalog_version"] == 2
    assert "COADS" in entry["description"]
    (v1,) = list_entries(DEMO_V1)
    assert v1["url"] == STORE and v1["catalog_version"] == 1 and v1["reader"] == "zarr"


def test_esdc_catalog_lists_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("list_entries touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    entries = {e["name"]: e for e in list_entries(ESDC)}
    assert sorted(entries) == [
        "esdc-8d-0.083deg-184x270x270-2.1.1",
        "esdc-8d-0.25deg-184x90x90-2.1.1",
        "esdc-8d-0.25deg-1x720x1440-2.1.1",
    ]
    for name, e in entries.items():
        assert e["url"] == f"s3://esdl-esdc-v2.1.1/{name}.zarr"
        assert e["storage_options"] == {
            "anon": True,
            "client_kwargs": {"endpoint_url": "https://s3.bgc-jena.mpg.de:9000"},
        }
        assert {"land_surface_temperature", "air_temperature_2m"} <= set(e["metadata"]["variables"])
        assert e["chunks"] is None  # chunks: {} -> storage chunks coarsened to work units


def test_secrets_are_redacted(tmp_path):
    path = _write(
        tmp_path / "cat.yaml",
        """\
        sources:
          cube:
            driver: zarr
            args:
              urlpath: s3://bucket/cube.zarr
              storage_options: {key: AKIA, secret: hush, client_kwargs: {endpoint_url: x}}
        """,
    )
    (entry,) = list_entries(path)
    assert entry["storage_options"] == {
        "key": "***",
        "secret": "***",
        "client_kwargs": {"endpoint_url": "x"},
    }
    assert read_entry(path, "cube").storage_options["secret"] == "hush"


# -------------------------------------------------------------------------------- errors


def test_missing_catalog_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(CatalogError) as err:
        open_cube(missing, ENTRY)
    assert str(err.value) == (
        f"catalog file not found: {missing}; pass the path of an Intake YAML catalog, "
        "e.g. catalogs/demo.yaml"
    )
    with pytest.raises(CatalogError, match="not found"):
        list_entries(missing)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("version: 2\nentries: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "not an Intake catalog"),
        ("version: 2\nentries: {x: {reader: 3}}\n", "not a valid Intake 2 catalog|reader"),
    ],
)
def test_malformed_catalogs(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=match) as err:
        list_entries(path)
    assert "\n" not in str(err.value)


def test_unknown_entry_suggests_the_closest():
    with pytest.raises(CatalogError) as err:
        open_cube(DEMO, "coads_climatolgy")
    msg = str(err.value)
    assert "'coads_climatolgy'" in msg and "did you mean 'coads_climatology'?" in msg
    assert "available entries: coads_climatology" in msg
    with pytest.raises(CatalogError, match="available entries"):
        describe_entry(DEMO_V1, "sst")


def test_unknown_variable_and_dimension():
    with pytest.raises(CubeError) as err:
        open_cube(DEMO, ENTRY, variables=["SST", "LST"])
    assert str(err.value).startswith("variable 'LST' is not in cube 'coads_climatology'")
    assert "AIRT" in str(err.value)
    with pytest.raises(CubeError, match="dimension 'depth'"):
        open_cube(DEMO, ENTRY, sel={"depth": 0})
    with pytest.raises(CubeError, match="chunks dimension 'depth'"):
        open_cube(DEMO, ENTRY, chunks={"depth": 5})
    with pytest.raises(SpecError):
        open_cube(DEMO, ENTRY, chunks={"time": 0})


def test_unsupported_driver_and_missing_store(tmp_path):
    path = _write(
        tmp_path / "cat.yaml",
        """\
        sources:
          csv:
            driver: csv
            args: {urlpath: x.csv}
          gone:
            driver: zarr
            args: {urlpath: '{{ CATALOG_DIR }}/missing.zarr'}
          templ:
            driver: zarr
            args: {urlpath: '{{ WHERE }}/x.zarr'}
        """,
    )
    with pytest.raises(CatalogError, match="driver 'csv'"):
        open_cube(path, "csv")
    with pytest.raises(CatalogError, match="cannot open entry 'gone'"):
        open_cube(path, "gone")
    with pytest.raises(CatalogError, match="WHERE"):
        read_entry(path, "templ")
    assert all(issubclass(e, EngineError) for e in (CatalogError, CubeError))


# ---------------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 holding the demo catalog and store."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
        "skip_instance_cache": True,
        "use_listings_cache": False,
    }
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("cubes")
    fs.put(DEMO, "cubes/catalogs/demo.yaml")
    fs.put(STORE, "cubes/catalogs/data/coads_climatology.zarr", recursive=True)
    yield options
    server.stop()


def test_catalog_and_store_on_s3(s3):
    url = "s3://cubes/catalogs/demo.yaml"
    (entry,) = list_entries(url, catalog_storage_options=s3)
    assert entry["url"] == "s3://cubes/catalogs/data/coads_climatology.zarr"
    remote = open_cube(
        url, ENTRY, storage_options=s3, catalog_storage_options=s3, variables=["SST"]
    )
    assert remote.attrs["engine_catalog"] == url
    local = open_cube(DEMO, ENTRY, variables=["SST"])
    xr.testing.assert_equal(remote.load(), local.load())


def test_s3_catalog_may_not_open_local_files(s3):
    """A catalog on S3 naming a local store is refused (one line) unless allowed."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    url = "s3://cubes/catalogs/local.yaml"
    fs.pipe(url, _v2_catalog(STORE).encode())
    with pytest.raises(CatalogError) as err:
        open_cube(url, "cube", catalog_storage_options=s3)
    msg = str(err.value)
    assert "points at local data" in msg and "allow_local=True" in msg and "\n" not in msg
    with pytest.raises(CatalogError, match="points at local data"):
        list_entries(url, catalog_storage_options=s3)
    assert "testing" not in msg  # the key and secret of the catalog's options
    ds = open_cube(url, "cube", catalog_storage_options=s3, allow_local=True)
    assert dict(ds.sizes) == {"time": 12, "lat": 90, "lon": 180}
    fs.pipe(url, _v2_catalog("../../other/c.zarr").encode())
    assert read_entry(url, "cube", catalog_storage_options=s3).url == "s3://cubes/other/c.zarr"


# ------------------------------------------------------------------------ network (ESDC)


@pytest.mark.network
@pytest.mark.parametrize("entry", [e["name"] for e in list_entries(ESDC)])
def test_esdc_entries_open(entry):
    pytest.importorskip("s3fs")
    ds = open_cube(ESDC, entry, variables=["land_surface_temperature", "air_temperature_2m"])
    assert {"time", "lat", "lon"} <= set(ds.dims)
    assert ds.land_surface_temperature.chunks is not None
