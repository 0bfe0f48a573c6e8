"""Writer fault tolerance on a real multi-process LocalCluster.

Faults are injected by the blocks of :func:`engine.testing.faults.counting_cube`:
killing the worker process (``os._exit``), raising once, raising every time. A killed
run is a subprocess killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import dask
import numpy as np
import pytest
import xarray as xr

from engine.errors import RegionFailedError, StoreError
from engine.io import manifest, writer
from engine.testing.clusters import process_client
from engine.testing.faults import count_computations, counting_cube

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.timeout(120)  # a hung cluster fails, never blocks

REGIONS = {"time": 4, "lat": 5, "lon": 4}  # one dask chunk per region: 12 regions
SHAPE, CHUNKS = (12, 10, 8), (4, 5, 4)


@pytest.fixture(scope="module")
def client():
    # one worker may die per test; the Nanny restarts it
    with dask.config.set({"distributed.scheduler.allowed-failures": 5}), process_client(2) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A clean run with the local scheduler: the bytes every faulty run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    url = str(tmp / "ref.zarr")
    with dask.config.set(scheduler="threads"):
        writer.write(counting_cube(tmp / "work"), url, region_chunks=REGIONS)
    return url


def store_files(url) -> dict[str, bytes]:
    """Every chunk and metadata object of a store (the engine's records left out)."""
    out = {}
    for d, dirs, files in os.walk(url):
        dirs[:] = [x for x in dirs if x != ".engine"]
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, url)] = open(p, "rb").read()
    return out


def assert_same_as_reference(url, reference):
    got, want = store_files(url), store_files(reference)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []  # bit for bit
    sums = {i: r["checksum"] for i, r in writer.read_manifest(url).items()}
    assert sums == {i: r["checksum"] for i, r in writer.read_manifest(reference).items()}
    xr.testing.assert_identical(
        xr.open_zarr(url, consolidated=True).compute(),
        xr.open_zarr(reference, consolidated=True).compute(),
    )
    assert writer.verify(url).ok


def test_worker_killed_mid_write(tmp_path, client, reference):
    work = tmp_path / "work"
    ds = counting_cube(work, exit_once=[(1, 1, 0)], sleep=0.05)
    pids = set(client.run(os.getpid).values())
    res = writer.write(ds, str(tmp_path / "out.zarr"), region_chunks=REGIONS, client=client)
    assert os.path.exists(work / "markers" / "1-1-0.exit")  # the worker really died
    assert pids != set(client.run(os.getpid).values())  # and was replaced
    assert res.n_written == res.n_regions == 12
    assert count_computations(work, (1, 1, 0)) == 1
    assert_same_as_reference(str(tmp_path / "out.zarr"), reference)


SCRIPT = textwrap.dedent(
    """
    import sys
    import dask
    from engine.io import manifest, writer
    from engine.testing.faults import counting_cube

    # same code version as the resuming test process, whatever edits the tree sees meanwhile
    manifest.code_version = lambda: sys.argv[3]
    dask.config.set(scheduler="threads", num_workers=2)
    ds = counting_cube(sys.argv[1], sleep=0.4)
    writer.write(ds, sys.argv[2], region_chunks={"time": 4, "lat": 5, "lon": 4},
                 identity={"data": "counting cube"})
    """
)


def test_killed_run_resumes_only_unfinished_regions(tmp_path, client, reference):
    work, url = tmp_path / "work", str(tmp_path / "out.zarr")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(work), url, manifest.code_version()])
    try:
        deadline = time.monotonic() + 40
        while len(writer.read_manifest(url)) < 4:
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no progress from the run to kill"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finished = set(writer.read_manifest(url))
    assert 4 <= len(finished) < 12
    before = count_computations(work)
    # the killed run's cube sleeps in its blocks (another graph, same values)
    res = writer.write(counting_cube(work), url, region_chunks=REGIONS, client=client,
                       identity={"data": "counting cube"})
    assert res.n_skipped == len(finished)
    assert set(res.regions) == {r for r in np.ndindex(3, 2, 2)} - finished
    assert count_computations(work) - before == 12 - len(finished)
    assert_same_as_reference(url, reference)


def test_region_failing_every_time_is_named(tmp_path, client):
    url = str(tmp_path / "out.zarr")
    ds = counting_cube(tmp_path / "work", fail_always=[(0, 1, 1)])
    with pytest.raises(RegionFailedError) as info:
        writer.write(ds, url, region_chunks=REGIONS, client=client, retries=1)
    msg = str(info.value)
    assert "region 0.1.1 (time=0:4, lat=5:10, lon=4:8)" in msg
    assert "RuntimeError: injected permanent failure" in msg and "11 other regions" in msg
    assert set(writer.read_manifest(url)) == set(np.ndindex(3, 2, 2)) - {(0, 1, 1)}
    with open(os.path.join(url, "zarr.json")) as f:
        assert "consolidated_metadata" not in f.read()


def test_transient_error_is_retried(tmp_path, client, reference):
    ds = counting_cube(tmp_path / "a", fail_once=[(2, 0, 0)])
    res = writer.write(
        ds, str(tmp_path / "a.zarr"), region_chunks=REGIONS, client=client, retries=2
    )
    assert res.n_written == 12
    assert os.path.exists(tmp_path / "a" / "markers" / "2-0-0.fail")
    assert_same_as_reference(str(tmp_path / "a.zarr"), reference)
    ds = counting_cube(tmp_path / "b", fail_once=[(2, 0, 0)])
    with pytest.raises(RegionFailedError, match=r"region 2\.0\.0 .*OSError: injected transient"):
        writer.write(ds, str(tmp_path / "b.zarr"), region_chunks=REGIONS, client=client, retries=0)


def test_memory_store_refused_with_processes(tmp_path, client):
    url = f"memory://writer-{uuid.uuid4().hex}/out.zarr"
    with pytest.raises(StoreError, match="memory:// lives in one process"):
        writer.write(counting_cube(tmp_path / "work"), url, client=client)
    import fsspec

    assert not fsspec.filesystem("memory").exists(url)


def test_default_client_is_used(tmp_path, client, reference):
    """Without client=, the active default client runs the regions (on its workers)."""
    res = writer.write(
        counting_cube(tmp_path / "work"), str(tmp_path / "o.zarr"), region_chunks=REGIONS
    )
    pids = {r["pid"] for r in writer.read_manifest(str(tmp_path / "o.zarr")).values()}
    assert res.n_written == 12
    assert pids <= set(client.run(os.getpid).values()) and os.getpid() not in pids
    assert_same_as_reference(str(tmp_path / "o.zarr"), reference)


def test_variables_sharing_inputs_and_fewer_dims(tmp_path, client):
    """A (lat, lon) mask that is also an input of another variable: shared graph keys
    across regions, the mask written only by the regions at time index 0."""
    ds = counting_cube(tmp_path / "work")
    mask = ds.t2m.isel(time=0, drop=True) > 0
    ds = ds.assign(mask=mask, filled=ds.t2m.where(mask))
    url = str(tmp_path / "out.zarr")
    res = writer.write(ds, url, region_chunks=REGIONS, client=client)
    assert res.n_written == 12
    by_region = writer.read_manifest(url)
    assert sum("mask" in r["variables"] for r in by_region.values()) == 4
    xr.testing.assert_identical(xr.open_zarr(url).compute(), ds.compute())
    assert writer.verify(url).ok
