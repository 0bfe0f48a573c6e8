"""Resumable, chunk-aligned Zarr writer with the local scheduler (no cluster)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import dask
import dask.array as da
import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr

from engine.errors import (
    MissingExtraError,
    RegionFailedError,
    ResumeError,
    SpecError,
    StoreError,
    StoreExistsError,
)
from engine.io import writer
from engine.testing.faults import count_computations, counting_cube

REGIONS = {"time": 4, "lat": 5, "lon": 4}  # one dask chunk per region: 3 x 2 x 2 = 12


def snapshot(path) -> dict[str, tuple[int, str]]:
    """Every file under ``path`` with its mtime and content hash."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = (
                    os.stat(p).st_mtime_ns,
                    hashlib.sha1(fh.read()).hexdigest(),
                )
    return out


def open_store(url, **kw) -> xr.Dataset:
    return xr.open_zarr(url, consolidated=True, **kw).compute()


# the threaded scheduler unless a test passes its own client (conftest.threads_scheduler)
pytestmark = pytest.mark.usefixtures("threads_scheduler")


@pytest.fixture
def cube(tmp_path):
    return counting_cube(tmp_path / "work")


def test_round_trip_consolidated_with_provenance(tmp_path, cube):
    url = str(tmp_path / "out.zarr")
    res = writer.write(cube, url, region_chunks=REGIONS, fingerprint={"job": "rt"})
    assert (res.n_regions, res.n_written, res.n_skipped) == (12, 12, 0)
    assert res.bytes_written == cube.t2m.nbytes
    assert len(res.regions) == 12 and res.seconds > 0
    root = json.load(open(os.path.join(url, "zarr.json")))
    assert "t2m" in root["consolidated_metadata"]["metadata"]
    out = open_store(url)
    xr.testing.assert_identical(out, cube.compute())
    assert out.attrs == {"title": "counting cube", "seed": 0}
    assert out.t2m.encoding["chunks"] == (4, 5, 4)
    assert out.time.encoding["chunks"] == (12,)  # coordinates: one object each
    assert writer.verify(url).ok
    fp = json.load(open(os.path.join(url, ".engine", "fingerprint.json")))
    assert fp["fingerprint"]["user"] == {"job": "rt"}
    assert fp["fingerprint"]["variables"]["t2m"]["chunks"] == [4, 5, 4]
    record = writer.read_manifest(url)[(1, 0, 1)]
    assert record["slices"] == {"time": [4, 8], "lat": [0, 5], "lon": [4, 8]}
    assert record["fingerprint"] == fp["hash"] and record["nbytes"] == 4 * 5 * 4 * 4


def test_template_is_written_before_any_region(tmp_path, cube):
    url = str(tmp_path / "out.zarr")
    seen = []

    def progress(done, total):
        if not seen:  # first call: template exists, no region yet
            assert writer.read_manifest(url) == {}
            tmpl = xr.open_zarr(url, consolidated=False)
            np.testing.assert_array_equal(tmpl.lat.values, cube.lat.values)
            assert tmpl.t2m.shape == (12, 10, 8) and tmpl.attrs["title"] == "counting cube"
            assert np.isnan(tmpl.t2m.values).all()
            assert count_computations(tmp_path / "work") == 0
        seen.append((done, total))

    writer.write(cube, url, region_chunks=REGIONS, progress=progress)
    assert seen[0] == (0, 12) and seen[-1] == (12, 12) and len(seen) == 13


@pytest.mark.parametrize(
    ("chunks", "encoding", "region_chunks", "match"),
    [
        ((3, 10, 8), {"t2m": {"chunks": (5, 10, 8)}}, None, "multiples of the Zarr chunk size 5"),
        ((4, 5, 4), {"t2m": {"chunks": (2, 5, 4), "shards": (8, 5, 4)}}, None, "shard size 8"),
        ((4, 5, 4), None, {"time": 6}, r"region_chunks\['time'\]=6"),
    ],
    ids=["dask-3-into-zarr-5", "partial-shard", "region-not-chunk-multiple"],
)
def test_misaligned_plan_is_refused_before_writing(
    tmp_path, chunks, encoding, region_chunks, match
):
    ds = counting_cube(tmp_path / "work", chunks=chunks)
    url = str(tmp_path / "out.zarr")
    with pytest.raises(StoreError, match=match):
        writer.write(ds, url, encoding=encoding, region_chunks=region_chunks)
    assert not os.path.exists(url)
    assert count_computations(tmp_path / "work") == 0


def test_sharded_round_trip(tmp_path):
    ds = counting_cube(tmp_path / "work", chunks=(8, 10, 8))
    url = str(tmp_path / "out.zarr")
    enc = {"t2m": {"chunks": (4, 5, 4), "shards": (8, 10, 8)}}
    res = writer.write(ds, url, encoding=enc)
    arr = zarr.open_array(os.path.join(url, "t2m"), mode="r")
    assert arr.chunks == (4, 5, 4) and arr.shards == (8, 10, 8)
    # regions are whole shards (dask chunks here): 2 along time, with 2 threads or more
    assert res.n_regions == 2 and res.regions == ((0, 0, 0), (1, 0, 0))
    xr.testing.assert_identical(open_store(url), ds.compute())
    res = writer.write(ds, str(tmp_path / "two.zarr"), encoding=enc, region_chunks={"time": 8})
    assert res.n_regions == 2
    xr.testing.assert_identical(open_store(str(tmp_path / "two.zarr")), ds.compute())


def test_region_size_follows_config(tmp_path, cube):
    one_chunk = 4 * 5 * 4 * 4
    with dask.config.set({"engine.write.region-mb": 2 * one_chunk / 2**20}):
        res = writer.write(cube, str(tmp_path / "out.zarr"))
    assert res.n_regions == 8  # two chunks along time per region (last ragged): 2 x 2 x 2
    xr.testing.assert_identical(open_store(str(tmp_path / "out.zarr")), cube.compute())


def test_resume_recomputes_only_regions_without_record(tmp_path, cube):
    url = str(tmp_path / "out.zarr")
    work = tmp_path / "work"
    writer.write(cube, url, region_chunks=REGIONS)
    assert count_computations(work) == 12
    before = snapshot(os.path.join(url, "t2m"))
    for rid in ("0.1.0", "2.0.1"):
        os.remove(os.path.join(url, ".engine", "manifest", f"{rid}.json"))
    res = writer.write(counting_cube(work), url, region_chunks={"time": 12})  # grid is reused
    assert (res.n_written, res.n_skipped) == (2, 10)
    assert res.regions == ((0, 1, 0), (2, 0, 1))
    assert count_computations(work) == 14
    assert count_computations(work, (0, 1, 0)) == 2 and count_computations(work, (1, 1, 0)) == 1
    after = snapshot(os.path.join(url, "t2m"))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"c/0/1/0", "c/2/0/1"}  # chunks of finished regions untouched
    xr.testing.assert_identical(open_store(url), cube.compute())
    assert writer.write(cube, url).n_written == 0


def test_changed_fingerprint_raises_and_leaves_store_untouched(tmp_path, cube):
    url = str(tmp_path / "out.zarr")
    writer.write(cube, url, region_chunks=REGIONS, fingerprint={"seed": 1})
    before = snapshot(url)
    with pytest.raises(ResumeError, match=r"by a different job \(user.seed\): .*restart=True"):
        writer.write(cube, url, fingerprint={"seed": 2})
    with pytest.raises(ResumeError, match="variables.t2m"):
        writer.write(cube.chunk({"time": 6}), url, fingerprint={"seed": 1})
    with pytest.raises(StoreExistsError, match="already exists"):
        writer.write(cube, url, fingerprint={"seed": 1}, resume=False)
    assert snapshot(url) == before
    res = writer.write(
        cube,
        url,
        fingerprint={"seed": 2},
        restart=True,
        region_chunks={"time": 8, "lat": 10, "lon": 8},
    )
    assert res.n_written == res.n_regions == 2


def test_resume_refuses_a_changed_template(tmp_path, cube):
    url = str(tmp_path / "out.zarr")
    writer.write(cube, url, region_chunks=REGIONS)
    meta_path = os.path.join(url, "t2m", "zarr.json")
    meta = json.load(open(meta_path))
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [2, 5, 4]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ResumeError, match="differ from their template.*t2m.chunks"):
        writer.write(cube, url)


def test_foreign_store_refused_then_overwritten(tmp_path, cube):
    url = str(tmp_path / "out.zarr")
    xr.Dataset({"other": ("x", np.arange(3))}).to_zarr(url, zarr_format=3, consolidated=False)
    before = snapshot(url)
    with pytest.raises(StoreExistsError, match="not written by cube-engine.*--overwrite"):
        writer.write(cube, url)
    with pytest.raises(StoreExistsError, match="--restart only recomputes stores that cube-eng"):
        writer.write(cube, url, restart=True)
    assert snapshot(url) == before
    res = writer.write(cube, url, overwrite=True, region_chunks=REGIONS)
    assert res.n_written == 12
    out = open_store(url)
    assert set(out.variables) == {"t2m", "time", "lat", "lon"}
    xr.testing.assert_identical(out, cube.compute())


def test_empty_directory_is_not_a_store(tmp_path, cube):
    url = tmp_path / "out.zarr"
    url.mkdir()
    assert writer.write(cube, str(url), region_chunks=REGIONS).n_written == 12


def test_all_nan_region_is_recorded_and_complete(tmp_path):
    work = tmp_path / "work"
    ds = counting_cube(work, nan_blocks=[(1, 1, 0)])
    url = str(tmp_path / "out.zarr")
    writer.write(ds, url, region_chunks=REGIONS)
    assert not os.path.exists(os.path.join(url, "t2m", "c", "1", "1", "0"))  # no object
    assert os.path.exists(os.path.join(url, "t2m", "c", "1", "1", "1"))
    assert (1, 1, 0) in writer.read_manifest(url)
    res = writer.write(counting_cube(work, nan_blocks=[(1, 1, 0)]), url)
    assert res.n_written == 0 and res.n_skipped == 12
    assert count_computations(work) == 12
    out = open_store(url)
    assert np.isnan(out.t2m.values[4:8, 5:10, 0:4]).all()
    xr.testing.assert_identical(out, ds.compute())
    assert writer.verify(url).ok


def test_verify_detects_a_torn_chunk(tmp_path, cube):
    url = str(tmp_path / "out.zarr")
    writer.write(cube, url, region_chunks=REGIONS)
    chunk = os.path.join(url, "t2m", "c", "2", "0", "1")
    blob = open(chunk, "rb").read()
    open(chunk, "wb").write(blob[: len(blob) // 2])  # a write cut short
    res = writer.verify(url)
    assert res.regions == [(2, 0, 1)] and res.damaged[0].problem == "size"


def test_failed_region_keeps_the_others_and_resumes(tmp_path):
    work = tmp_path / "work"
    url = str(tmp_path / "out.zarr")
    bad = counting_cube(work, fail_always=[(2, 1, 0)])
    # the fault injection changes the graph, not the values: the caller names the data
    same = {"data": "counting cube"}
    with pytest.raises(RegionFailedError, match=r"region 2\.1\.0 \(time=8:12, lat=5:10, lon=0:4\)"):
        writer.write(bad, url, region_chunks=REGIONS, retries=1, identity=same)
    assert len(writer.read_manifest(url)) == 11
    assert "consolidated_metadata" not in json.load(open(os.path.join(url, "zarr.json")))
    res = writer.write(counting_cube(work), url, identity=same)
    assert res.regions == ((2, 1, 0),)
    xr.testing.assert_identical(open_store(url), counting_cube(work).compute())


def test_transient_error_is_retried(tmp_path):
    ds = counting_cube(tmp_path / "a", fail_once=[(0, 0, 1)])
    assert (
        writer.write(ds, str(tmp_path / "a.zarr"), region_chunks=REGIONS, retries=1).n_written == 12
    )
    assert os.path.exists(tmp_path / "a" / "markers" / "0-0-1.fail")
    ds = counting_cube(tmp_path / "b", fail_once=[(0, 0, 1)])
    with pytest.raises(RegionFailedError, match="OSError: injected transient"):
        writer.write(ds, str(tmp_path / "b.zarr"), region_chunks=REGIONS, retries=0)


def test_memory_store_with_local_scheduler(tmp_path, cube):
    url = f"memory://writer-{uuid.uuid4().hex}/out.zarr"
    res = writer.write(cube, url, region_chunks=REGIONS)
    assert res.n_written == 12
    xr.testing.assert_identical(xr.open_zarr(url, consolidated=True).compute(), cube.compute())
    assert len(writer.read_manifest(url)) == 12
    fsspec.filesystem("memory").rm(url, recursive=True)


def test_variables_with_fewer_dims_and_in_memory_variables(tmp_path, cube):
    ds = cube.assign(
        mask=(("lat", "lon"), da.ones((10, 8), chunks=(5, 4), dtype="int8")),
        weights=("lat", np.cos(np.deg2rad(cube.lat.values))),
        aux=cube.t2m.isel(time=0, drop=True).chunk({"lat": 10}),
    )
    ds = ds.assign_coords(area=(("lat", "lon"), da.full((10, 8), 2.0, chunks=(5, 4))))
    url = str(tmp_path / "out.zarr")
    res = writer.write(
        ds,
        url,
        region_chunks={"time": 4, "lat": 10, "lon": 4},
        encoding={"aux": {"chunks": (10, 4)}},
    )
    assert res.n_regions == 6
    written = {v for r in writer.read_manifest(url).values() for v in r["variables"] if v != "t2m"}
    assert written == {"mask", "aux"}
    counts = [sum("mask" in r["variables"] for r in writer.read_manifest(url).values())]
    assert counts == [2]  # (lat, lon) only by the regions at time index 0
    xr.testing.assert_identical(open_store(url), ds.compute())


def test_bad_arguments(tmp_path, cube):
    with pytest.raises(SpecError, match="not in the dataset"):
        writer.write(cube, str(tmp_path / "o.zarr"), encoding={"nope": {}})
    with pytest.raises(SpecError, match="region_chunks names 'x'"):
        writer.write(cube, str(tmp_path / "o.zarr"), region_chunks={"x": 2})
    with pytest.raises(SpecError, match="shards .* multiples of chunks"):
        writer.write(cube, str(tmp_path / "o.zarr"), encoding={"t2m": {"chunks": 4, "shards": 6}})
    with pytest.raises(SpecError, match="xarray.Dataset"):
        writer.write(cube.t2m, str(tmp_path / "o.zarr"))
    assert not os.path.exists(tmp_path / "o.zarr")


def test_killed_while_writing_template_restarts_cleanly(tmp_path, cube):
    url = str(tmp_path / "out.zarr")
    writer.write(cube, url, region_chunks=REGIONS)
    fsspec.filesystem("file").rm(os.path.join(url, ".engine", "manifest"), recursive=True)
    os.remove(os.path.join(url, ".engine", "template.json"))
    assert writer.write(cube, url, region_chunks=REGIONS).n_written == 12


def test_file_url(tmp_path, cube):
    url = f"file://{tmp_path}/out.zarr"
    assert writer.write(cube, url, region_chunks=REGIONS).n_written == 12
    xr.testing.assert_identical(open_store(str(tmp_path / "out.zarr")), cube.compute())
    assert len(writer.read_manifest(str(tmp_path / "out.zarr"))) == 12  # same store


def test_missing_filesystem_names_the_extra(cube):
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    with pytest.raises(MissingExtraError, match=r"cube-engine\[gcs\]"):
        writer.write(cube, "gs://bucket/out.zarr", storage_options={"token": "anon"})


def test_invalid_encoding_destroys_nothing(tmp_path, cube):
    url = str(tmp_path / "out.zarr")
    writer.write(cube, url, region_chunks=REGIONS)
    before = snapshot(url)
    with pytest.raises(SpecError, match="encoding is invalid.*compresor"):
        writer.write(cube, url, overwrite=True, encoding={"t2m": {"compresor": None}})
    assert snapshot(url) == before


def test_cluster_write_keeps_a_bounded_window_of_regions(tmp_path):
    """With a client the writer submits regions in a rolling window: the scheduler never
    holds more write tasks than engine.write.regions-in-flight, and every region lands."""
    from distributed import Client

    data = da.random.default_rng(0).random((12, 10, 8), chunks=(1, 5, 4)).astype("f4")
    ds = xr.Dataset({"x": (("time", "lat", "lon"), data)})
    held = []

    def in_scheduler(dask_scheduler=None):
        # unfinished region tasks (a finished one stays in memory until its release lands)
        return sum(1 for k, ts in dask_scheduler.tasks.items()
                   if str(k).startswith("write-region") and ts.state != "memory")

    with Client(processes=False, n_workers=2, threads_per_worker=1,
                dashboard_address=":0") as c, \
            dask.config.set({"engine.write.regions-in-flight": 3}):
        res = writer.write(ds, str(tmp_path / "w.zarr"), region_chunks={"time": 1},
                           client=c, progress=lambda *_: held.append(
                               c.run_on_scheduler(in_scheduler)))
    assert res.n_written == res.n_regions == 12 * 2 * 2
    assert max(held) <= 3
    np.testing.assert_array_equal(open_store(str(tmp_path / "w.zarr")).x.values,
                                  data.compute())


def test_other_values_on_the_same_layout_are_refused(tmp_path, cube):
    """A retrained model or changed inputs give another graph: resuming would keep the old
    values silently, so the data's dask token is part of the resume identity."""
    url = str(tmp_path / "out.zarr")
    writer.write(cube, url, region_chunks=REGIONS)
    before = snapshot(url)
    with pytest.raises(ResumeError, match=r"written from different inputs \(data: the input "
                                          r"values, or a model or a parameter that computes "
                                          r"them\): pass restart=True \(CLI --restart\) to "
                                          r"recompute") as err:
        writer.write(cube + 1, url, region_chunks=REGIONS)
    assert "\n" not in str(err.value)
    assert snapshot(url) == before
    assert writer.write(cube, url).n_written == 0  # the same graph resumes
    res = writer.write(cube + 1, url, restart=True, region_chunks=REGIONS)
    assert res.n_written == 12
    xr.testing.assert_identical(open_store(url), (cube + 1).compute())


def test_identity_names_what_changed(tmp_path, cube):
    url = str(tmp_path / "out.zarr")
    ident = {"model_hash": "m1", "inputs": "sha256:aa", "spec": "s1"}
    writer.write(cube, url, region_chunks=REGIONS, identity=ident)
    with pytest.raises(ResumeError, match=r"different inputs \(inputs, model_hash\)"):
        writer.write(cube, url, identity={**ident, "model_hash": "m2", "inputs": "sha256:bb"})
    with pytest.raises(ResumeError, match=r"different inputs \(spec\)"):
        writer.write(cube, url, identity={k: v for k, v in ident.items() if k != "spec"})
    assert writer.write(cube, url, identity=dict(ident)).n_skipped == 12
    fp = json.load(open(os.path.join(url, ".engine", "fingerprint.json")))["fingerprint"]
    assert fp["identity"]["model_hash"] == "m1" and len(fp["identity"]["data"]) == 32
    with pytest.raises(SpecError, match="identity must be a mapping"):
        writer.write(cube, url, identity="m1")


def test_rotating_a_secret_resumes_and_no_secret_is_stored(tmp_path, cube):
    url = str(tmp_path / "out.zarr")

    def job(secret):
        return dict(
            fingerprint={"job": "a", "storage_options": {"key": "AKIA", "secret": secret,
                                                         "endpoint_url": "http://h:9000"}},
            identity={"input": f"https://user:{secret}@host/in.zarr?sig={secret}",
                      "token": secret},
        )

    writer.write(cube, url, region_chunks=REGIONS, **job("old-secret-1"))
    res = writer.write(cube, url, region_chunks=REGIONS, **job("new-secret-2"))
    assert (res.n_written, res.n_skipped) == (0, 12)
    blobs = b"".join(open(os.path.join(d, f), "rb").read()
                     for d, _, fs in os.walk(url) for f in fs)
    assert b"old-secret-1" not in blobs and b"AKIA" not in blobs
    fp = json.load(open(os.path.join(url, ".engine", "fingerprint.json")))["fingerprint"]
    assert fp["user"]["storage_options"]["endpoint_url"] == "http://h:9000"  # kept: no secret


def test_region_keys_are_tokens_of_all_their_inputs(tmp_path, cube):
    from engine.io.writer.distributed import region_key, region_token
    from engine.io.writer.tasks import RegionTask, pack, region_data
    from engine.ops.regions import plan_layout, plan_regions

    layout = plan_layout(cube, {})
    region = plan_regions(layout, {"time": [0, 4, 12], "lat": [0, 10], "lon": [0, 8]})[0]

    def key(ds=cube, url="s3://b/out.zarr", secret="s1", endpoint="http://h", fp="f",
            lay=layout, reg=region):
        so = {"key": "k", "secret": secret, "client_kwargs": {"endpoint_url": endpoint}}
        task = RegionTask(url, None, reg, fp)
        return region_key(region_token(url, so, lay, fp), task, pack(region_data(ds, task)))

    k = key()
    assert k.startswith("write-region-0.0.0-") and key() == k
    assert key(secret="s2") == k  # no secret hashed; rotating one changes nothing
    others = [key(ds=cube + 1), key(url="s3://b/other.zarr"), key(endpoint="http://g"),
              key(fp="g"), key(lay={"t2m": {**layout["t2m"], "chunks": [2, 5, 4]}}),
              key(reg=plan_regions(layout, {"time": [0, 4, 12], "lat": [0, 10],
                                            "lon": [0, 8]})[1])]
    assert len({k, *others}) == 1 + len(others)


def test_two_writes_in_one_session_never_share_a_key(tmp_path, monkeypatch):
    """Concurrent writes of the same and of other data through one client: every region
    task has its own key, and each store gets its own values."""
    import threading

    from distributed import Client

    from engine.io.writer import distributed as dist

    keys: list[str] = []
    real = dist.region_key
    monkeypatch.setattr(dist, "region_key", lambda *a: keys.append(real(*a)) or keys[-1])
    data = da.random.default_rng(1).random((8, 10, 8), chunks=(4, 5, 4)).astype("f4")
    a = xr.Dataset({"x": (("time", "lat", "lon"), data)})
    jobs = [(a, "a.zarr"), (a, "b.zarr"), (a * 2, "c.zarr")]
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        threads = [threading.Thread(target=writer.write, args=(ds, str(tmp_path / name)),
                                    kwargs={"client": c, "region_chunks": {"time": 4}})
                   for ds, name in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(keys) == 3 * 2 * 2 * 2 and len(set(keys)) == len(keys)
    for ds, name in jobs:
        np.testing.assert_array_equal(open_store(str(tmp_path / name)).x.values,
                                      ds.x.values)


def test_store_identity_changes_with_one_chunk(tmp_path, cube):
    from engine.io.stores import store_identity

    url = str(tmp_path / "out.zarr")
    writer.write(cube, url, region_chunks=REGIONS)
    first = store_identity(url)
    assert first == store_identity(f"file://{url}/") and first.startswith("sha256:")
    path = os.path.join(url, "t2m", "c", "1", "1", "0")
    blob = bytearray(open(path, "rb").read())
    blob[-1] ^= 0xFF  # same size, other bytes
    open(path, "wb").write(bytes(blob))
    assert store_identity(url) != first
    assert store_identity(path) != store_identity(os.path.join(url, "t2m", "c", "1", "1", "1"))
    with pytest.raises(StoreError, match="nothing exists"):
        store_identity(str(tmp_path / "missing.zarr"))


def _flaky_cube(flag, delay: float = 0.0, steps: int = 8):
    """A cube whose blocks fail while the file ``flag`` exists, each taking ``delay`` s."""
    import time

    def block(x):
        if os.path.exists(flag):
            raise RuntimeError("transient failure")
        time.sleep(delay)
        return x

    data = da.random.default_rng(1).random((steps, 10, 8), chunks=(2, 5, 4)).astype("f4")
    return xr.Dataset({"x": (("time", "lat", "lon"), data.map_blocks(block, dtype="f4"))})


def test_a_failed_cluster_write_resumes_in_the_same_session(tmp_path):
    """The failure message says 'fix the cause and re-run': on the same client the re-run
    used to get the failed futures back (same keys, kept alive by the error's traceback)
    and fail again at once."""
    from distributed import Client

    flag = tmp_path / "fail"
    flag.touch()
    ds = _flaky_cube(str(flag))
    url = str(tmp_path / "out.zarr")
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        with pytest.raises(RegionFailedError):
            writer.write(ds, url, client=c, region_chunks={"time": 2}, retries=0)
        flag.unlink()
        writer.write(ds, url, client=c, region_chunks={"time": 2}, retries=0)
    np.testing.assert_array_equal(open_store(url).x.values, ds.x.values)


def test_an_interrupted_cluster_write_returns_with_nothing_of_it_running(tmp_path):
    """A write stopped part way (here by its progress callback, as by Ctrl-C) returns only
    when the region tasks already running on the workers have stopped: otherwise they
    wrote their regions after it returned, into a store a later overwrite had replaced."""
    from distributed import Client

    from engine.io.writer import distributed as dist

    ds = _flaky_cube(str(tmp_path / "no-flag"), delay=0.3, steps=12)
    url = str(tmp_path / "out.zarr")

    def stop(done, total):
        if done >= 1:
            raise RuntimeError("stopped by the user")

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as c:
        with pytest.raises(RuntimeError, match="stopped by the user"):
            writer.write(ds, url, client=c, region_chunks={"time": 2}, progress=stop)
        running = [k for ks in c.run(dist._executing).values() for k in ks]
        assert not [k for k in running if k.startswith("write-region")]
        # and a later overwrite is what the store holds, also a while later
        new = ds * 2
        writer.write(new, url, client=c, region_chunks={"time": 2}, overwrite=True)
    np.testing.assert_array_equal(open_store(url).x.values, new.x.values)
