"""Throughput counters: exact per-worker counts for patches, predict and write."""

import numpy as np
import pytest
import torch
import xarray as xr
from distributed import Client

from engine import meter
from engine.io.writer import write
from engine.meter import Meter
from engine.ml.predict import predict
from engine.ops.patches import iter_patches
from engine.testing.cubes import synthetic_cube


@pytest.fixture
def client():
    with Client(processes=False, n_workers=2, threads_per_worker=1,
                dashboard_address=":0") as c:
        yield c


def test_local_phase_counts_in_this_process():
    ds = synthetic_cube({"time": 2, "lat": 64, "lon": 64}, chunks={"lat": 32, "lon": 32})
    m = Meter()
    with m.phase("cut"):
        n = sum(len(b) for b in iter_patches(ds, size={"lat": 16, "lon": 16}))
    ph = m.summary()["phases"]["cut"]
    assert list(ph["workers"]) == ["local"]
    assert ph["total"]["patches"] == n == 2 * 4 * 4
    assert ph["total"]["tasks"] == ds.t2m.data.npartitions  # one task per chunk
    assert ph["total"]["mb_read"] * 1e6 == pytest.approx(ds.nbytes - sum(
        c.nbytes for c in ds.coords.values()))


def test_cluster_phases_count_every_task_once(client, tmp_path):
    ds = synthetic_cube({"time": 2, "lat": 128, "lon": 128},
                        chunks={"time": 1, "lat": 64, "lon": 64}, variables=("a", "b"))
    m = Meter(client)
    with m.phase("patches"):
        n = sum(len(b) for b in iter_patches(ds, size={"lat": 32, "lon": 32}, client=client))
    model = torch.nn.Conv2d(2, 1, 3, padding=1)
    y = predict(ds, model, variables=["a", "b"], tile={"lat": 32, "lon": 32}, overlap=0.5)
    with m.phase("predict+write"):
        res = write(y.to_dataset(name="y"), str(tmp_path / "out.zarr"), client=client)
    s = m.summary()["phases"]
    assert s["patches"]["total"]["patches"] == n == 2 * 4 * 4
    assert sum(w["patches"] for w in s["patches"]["workers"].values()) == n
    assert len(s["patches"]["workers"]) == 2  # both in-process workers, not double-counted
    pw = s["predict+write"]["total"]
    assert pw["output_pixels"] == 2 * 128 * 128  # halos excluded: each pixel once
    assert pw["mb_written"] * 1e6 == res.bytes_written
    assert s["predict+write"]["gpus"] == {}
    meter.reset()
    assert meter.snapshot() == {}


def test_pointwise_predict_counts_cells_and_points():
    ds = synthetic_cube({"time": 2, "lat": 16, "lon": 16}, chunks={"lat": 8})
    ds["t2m"] = ds.t2m.where(ds.lat > ds.lat[2])  # some NaN rows skip the model
    m = Meter()
    with m.phase("points"):
        predict(ds, torch.nn.Linear(2, 1), variables=["t2m", "lst"], tile=None).compute()
    tot = m.summary()["phases"]["points"]["total"]
    assert tot["output_pixels"] == 2 * 16 * 16
    assert tot["tiles_or_points"] == int(np.isfinite(ds.t2m + ds.lst).sum())


@pytest.mark.gpu
def test_gpu_rows_name_the_device():
    """Predict on a CUDA device records the GPU, and the summary has a per-GPU row."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ds = synthetic_cube({"time": 2, "lat": 64, "lon": 64}, chunks={"lat": 32})
    m = Meter()
    with m.phase("gpu"):
        predict(ds, torch.nn.Conv2d(2, 1, 3, padding=1), variables=["t2m", "lst"],
                tile={"lat": 32, "lon": 32}, device="cuda").compute()
    ph = m.summary()["phases"]["gpu"]
    (row,) = ph["gpus"].values()
    assert row["output_pixels"] == ph["total"]["output_pixels"] == 2 * 64 * 64
    assert torch.cuda.get_device_name(0) in next(iter(ph["gpus"]))


def test_a_prediction_feeding_two_variables_runs_once_per_block(client, tmp_path):
    """Regions computed inside their write task run a block shared by two output
    variables once (no per-consumer copies of the model call), on several regions."""
    ds = synthetic_cube({"time": 4, "lat": 16, "lon": 16}, chunks={"time": 1, "lat": 8})
    p = predict(ds, torch.nn.Linear(2, 1), variables=["t2m", "lst"], tile=None)
    out = ds[["t2m"]].assign(p=p, q=ds.t2m.where(np.isfinite(ds.t2m), p))
    m = Meter(client)
    with m.phase("w"):
        res = write(out, str(tmp_path / "o.zarr"), client=client)
    assert res.n_regions > 1
    assert m.summary()["phases"]["w"]["total"]["output_pixels"] == 4 * 16 * 16


def test_model_weights_travel_once_not_with_every_region(client, tmp_path, monkeypatch):
    """Large literals in the region graphs (the model) are scattered once per write and
    shared by every region task; the output equals a local compute."""
    from engine.io import writer

    monkeypatch.setattr(writer, "_LIFT_BYTES", 1)  # lift the (small) test model too
    scattered = []
    real = client.scatter
    monkeypatch.setattr(client, "scatter", lambda v, **kw: scattered.append(v) or real(v, **kw))
    ds = synthetic_cube({"time": 4, "lat": 16, "lon": 16}, chunks={"time": 1, "lat": 8})
    torch.manual_seed(0)
    p = predict(ds, torch.nn.Linear(2, 1), variables=["t2m", "lst"], tile=None)
    res = write(p.to_dataset(name="p"), str(tmp_path / "o.zarr"), client=client)
    assert res.n_regions > 1 and len(scattered) == 1
    np.testing.assert_allclose(xr.open_zarr(str(tmp_path / "o.zarr")).p.values,
                               p.compute(scheduler="sync").values, rtol=1e-6)


def test_gpu_rows_carry_the_gpus_own_busy_share(monkeypatch):
    """A GPU row's busy column is the device's NVML utilisation over the phase (sampled
    in the worker process), not its threads' busy time; samples from before the phase
    do not count."""
    from engine import meter

    m = Meter()
    with m.phase("gpu"):
        meter.record("predict", items=10, pixels=100, gpu="H200 (cuda:0)")
        with meter._LOCK:  # what the NVML sampler thread appends
            meter._GPU_SAMPLES["H200 (cuda:0)"] = [(meter._PHASE_T0[0] - 5, 0.0),
                                                   (meter._PHASE_T0[0] + 0.1, 80.0),
                                                   (meter._PHASE_T0[0] + 0.2, 60.0)]
    (row,) = m.summary()["phases"]["gpu"]["gpus"].values()
    assert row["busy_share"] == pytest.approx(0.70)
    meter._GPU_SAMPLES.clear()
