"""The writer over the real S3 protocol: moto's server on 127.0.0.1, a 2-process cluster
whose workers have no AWS environment, so endpoint and credentials must travel inside
the tasks as ``storage_options``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.timeout(120)  # a hung cluster fails, never blocks

from engine.io import writer  # noqa: E402
from engine.testing.clusters import process_client  # noqa: E402
from engine.testing.faults import count_computations, counting_cube  # noqa: E402
from engine.testing.s3 import moto_s3  # noqa: E402

REGIONS = {"time": 4, "lat": 5, "lon": 4}


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module")
def client():
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(name)  # workers inherit this environment: keep credentials out
        with process_client(2) as c:
            yield c


def aws_env() -> list[str]:
    return sorted(k for k in os.environ if k.startswith("AWS_"))


def test_write_resume_and_read_back_on_s3(tmp_path, s3, client):
    assert all(v == [] for v in client.run(aws_env).values())
    url = s3.url("cubes/out.zarr")
    work = tmp_path / "work"
    ds = counting_cube(work)
    res = writer.write(
        ds, url, storage_options=s3.storage_options, region_chunks=REGIONS, client=client
    )
    assert (res.n_regions, res.n_written) == (12, 12)
    pids = {r["pid"] for r in writer.read_manifest(url, s3.storage_options).values()}
    assert pids <= set(client.run(os.getpid).values())  # written by the workers

    fs = s3.filesystem()
    assert fs.exists(f"{s3.bucket}/cubes/out.zarr/.engine/fingerprint.json")
    for rid in ("0.0.0", "2.1.1"):
        fs.rm(f"{s3.bucket}/cubes/out.zarr/.engine/manifest/{rid}.json")
    res = writer.write(
        counting_cube(work),
        url,
        storage_options=s3.storage_options,
        region_chunks=REGIONS,
        client=client,
    )
    assert res.regions == ((0, 0, 0), (2, 1, 1)) and res.n_skipped == 10
    assert count_computations(work) == 14

    out = xr.open_zarr(url, storage_options=s3.storage_options, consolidated=True).compute()
    xr.testing.assert_identical(out, ds.compute())
    assert out.attrs["title"] == "counting cube"
    assert writer.verify(url, storage_options=s3.storage_options).ok


def test_all_nan_region_on_s3(tmp_path, s3, client):
    url = s3.url("nan.zarr")
    ds = counting_cube(tmp_path / "work", nan_blocks=[(0, 0, 0)])
    writer.write(ds, url, storage_options=s3.storage_options, region_chunks=REGIONS, client=client)
    fs = s3.filesystem()
    assert not fs.exists(f"{s3.bucket}/nan.zarr/t2m/c/0/0/0")  # no object for an all-NaN chunk
    assert (0, 0, 0) in writer.read_manifest(url, s3.storage_options)
    res = writer.write(ds, url, storage_options=s3.storage_options, client=client)
    assert res.n_written == 0
    out = xr.open_zarr(url, storage_options=s3.storage_options).t2m.values
    assert np.isnan(out[:4, :5, :4]).all() and not np.isnan(out[4:]).any()


def test_no_task_carries_the_credentials(tmp_path, s3, client):
    """Storage options reach the workers through a worker plugin: no region task's
    run_spec on the scheduler holds the secret, the workers still write, and a rotated
    secret resumes the finished store."""
    import pickle

    import cloudpickle

    secret = "cube-engine-test-SECRET-6f1c"  # moto accepts any credentials
    so = {**s3.storage_options, "secret": secret}
    seen: list[tuple[int, int]] = []

    def scan(dask_scheduler=None, secret=secret):
        n = hits = 0
        for ts in dask_scheduler.tasks.values():
            if not str(ts.key).startswith("write-region"):
                continue
            n += 1
            blob = cloudpickle.dumps(ts.run_spec)
            hits += secret.encode() in blob or secret in repr(ts.run_spec)
        return n, hits

    url = s3.url("nosecret.zarr")
    ds = counting_cube(tmp_path / "work")
    res = writer.write(ds, url, storage_options=so, region_chunks=REGIONS, client=client,
                       progress=lambda *_: seen.append(client.run_on_scheduler(scan)))
    assert res.n_written == 12
    assert sum(n for n, _ in seen) > 0 and sum(h for _, h in seen) == 0
    assert pickle.dumps(seen)  # the scan really ran on the scheduler's tasks
    fs = s3.filesystem()
    stored = b"".join(fs.cat(p) for p in fs.find(f"{s3.bucket}/nosecret.zarr"))
    assert secret.encode() not in stored
    # the options are gone from the workers once the write ends
    assert client.run(lambda: len(__import__("engine.io.stores").io.stores._OPTIONS)) == \
        dict.fromkeys(client.run(os.getpid), 0)

    rotated = {**s3.storage_options, "secret": "another-secret"}
    res = writer.write(counting_cube(tmp_path / "work"), url, storage_options=rotated,
                       region_chunks=REGIONS, client=client)
    assert (res.n_written, res.n_skipped) == (0, 12)
    out = xr.open_zarr(url, storage_options=rotated, consolidated=True).compute()
    xr.testing.assert_identical(out, ds.compute())


def test_resume_redoes_a_deleted_chunk_on_s3(tmp_path, s3, client):
    url = s3.url("lost.zarr")
    work = tmp_path / "work"
    writer.write(counting_cube(work), url, storage_options=s3.storage_options,
                 region_chunks=REGIONS, client=client)
    s3.filesystem().rm(f"{s3.bucket}/lost.zarr/t2m/c/2/1/0")
    res = writer.verify(url, storage_options=s3.storage_options, checksums=False)
    assert [(d.region, d.problem) for d in res.damaged] == [((2, 1, 0), "missing")]
    res = writer.write(counting_cube(work), url, storage_options=s3.storage_options,
                       region_chunks=REGIONS, client=client)
    assert res.regions == ((2, 1, 0),)
    assert writer.verify(url, storage_options=s3.storage_options).ok
