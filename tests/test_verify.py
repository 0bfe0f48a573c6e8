"""Lost, torn, garbled and overwritten chunks: a resume redoes what it can see cheaply
(missing objects, other sizes), :func:`engine.io.verify.verify` names every damaged region,
and ``cube-engine verify`` reports them with its exit code."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import xarray as xr

from engine._cli import verify as cli
from engine.errors import StoreError
from engine.io import writer
from engine.testing.faults import count_computations, counting_cube

REGIONS = {"time": 4, "lat": 5, "lon": 4}  # 3 x 2 x 2 regions of one chunk each


# the threaded scheduler unless a test passes its own client (conftest.threads_scheduler)
pytestmark = pytest.mark.usefixtures("threads_scheduler")


@pytest.fixture
def store(tmp_path):
    url = str(tmp_path / "out.zarr")
    writer.write(counting_cube(tmp_path / "work"), url, region_chunks=REGIONS)
    return url


def chunk(url, *index) -> str:
    return os.path.join(url, "t2m", "c", *map(str, index))


def run_cli(url, *flags) -> tuple[int, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="cube-engine")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["verify", url, *flags])
    return cli.run(args), args


def test_deleted_chunk_is_redone_by_resume(tmp_path, store):
    os.remove(chunk(store, 1, 0, 1))
    res = writer.verify(store, checksums=False)
    assert [(d.region, d.problem) for d in res.damaged] == [((1, 0, 1), "missing")]
    work = tmp_path / "work"
    before = count_computations(work)
    out = writer.write(counting_cube(work), store, region_chunks=REGIONS)
    assert out.regions == ((1, 0, 1),) and out.n_skipped == 11
    assert count_computations(work) - before == 1
    assert count_computations(work, (1, 0, 1)) == 2
    xr.testing.assert_identical(xr.open_zarr(store).compute(), counting_cube(work).compute())
    assert writer.verify(store).ok


def test_torn_chunk_is_redone_by_resume(tmp_path, store):
    path = chunk(store, 0, 1, 1)
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:-3])
    out = writer.write(counting_cube(tmp_path / "work"), store, region_chunks=REGIONS)
    assert out.regions == ((0, 1, 1),)
    assert open(path, "rb").read() == blob
    assert writer.verify(store).ok


def test_garbled_chunk_is_named_by_verify(store):
    path = chunk(store, 2, 0, 1)
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2:] = bytes(255 - b for b in blob[len(blob) // 2:])  # same size
    open(path, "wb").write(bytes(blob))
    res = writer.verify(store)
    assert res.regions == [(2, 0, 1)] and not res.ok
    assert res.damaged[0].problem in ("unreadable", "checksum")
    assert writer.verify(store, checksums=False).ok  # sizes alone cannot see it


def test_region_overwritten_with_valid_values_is_named(tmp_path):
    """Uncompressed chunks: other values have the same size, only checksums differ."""
    url = str(tmp_path / "raw.zarr")
    ds = counting_cube(tmp_path / "work")
    writer.write(ds, url, region_chunks=REGIONS, encoding={"t2m": {"compressors": None}})
    sizes = {p: os.path.getsize(chunk(url, *p)) for p in [(0, 1, 1)]}
    region = {"time": slice(0, 4), "lat": slice(5, 10), "lon": slice(4, 8)}
    other = ds[["t2m"]].isel(region).drop_vars(["time", "lat", "lon"]).compute() + 1.0
    other.to_zarr(url, region=region, mode="r+", consolidated=False, zarr_format=3)
    assert os.path.getsize(chunk(url, 0, 1, 1)) == sizes[(0, 1, 1)]
    res = writer.verify(url)
    assert [(d.region, d.problem) for d in res.damaged] == [((0, 1, 1), "checksum")]
    assert writer.verify(url, checksums=False).ok


def test_unfinished_and_unexpected_objects(tmp_path):
    work = tmp_path / "work"
    url = str(tmp_path / "out.zarr")
    writer.write(counting_cube(work, nan_blocks=[(1, 1, 0)]), url, region_chunks=REGIONS)
    assert writer.read_manifest(url)[(1, 1, 0)]["objects"] == {"t2m/c/1/1/0": None}
    os.remove(os.path.join(url, ".engine", "manifest", "2.1.1.json"))
    with open(chunk(url, 0, 0, 0), "rb") as f:  # an object where an all-NaN chunk was
        open(chunk(url, 1, 1, 0), "wb").write(f.read())
    res = writer.verify(url, checksums=False)
    assert [(d.region, d.problem) for d in res.damaged] == [
        ((1, 1, 0), "size"), ((2, 1, 1), "unfinished")]
    out = writer.write(counting_cube(work, nan_blocks=[(1, 1, 0)]), url)
    assert out.regions == ((1, 1, 0), (2, 1, 1))
    assert not os.path.exists(chunk(url, 1, 1, 0)) and writer.verify(url).ok


def test_cli_exit_codes(tmp_path, store, capsys):
    assert run_cli(store)[0] == 0
    assert "all 12 regions intact" in capsys.readouterr().out
    os.remove(chunk(store, 2, 1, 0))
    assert run_cli(store)[0] == 1
    out = capsys.readouterr().out
    assert "1 of 12 regions" in out
    assert "region 2.1.0 (time=8:12, lat=5:10, lon=0:4): missing" in out
    assert run_cli(store, "--json")[0] == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and [d["id"] for d in doc["damaged"]] == ["2.1.0"]
    assert doc["damaged"][0]["problem"] == "missing"

    plain = tmp_path / "plain.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(plain, zarr_format=3, consolidated=False)
    for bad in (str(plain), str(tmp_path / "nothing.zarr")):
        assert run_cli(bad)[0] == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cube-engine: error:" in err
    with pytest.raises(StoreError, match="not a cube-engine output store"):
        writer.verify(str(plain))
