"""The GPU data path on a CUDA device (``-m gpu``; deselected by default, skipped without
CUDA). Run on a GPU machine: ``python -m pytest -m gpu tests``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from engine.ml.device import (
    DeviceLoader,
    GpuSampler,
    auto_batch_size,
    fold_add,
    resolve_device,
    to_device,
    to_host,
)
from engine.ml.fit import fit
from engine.ml.predict import _autocast, predict
from engine.testing.cubes import synthetic_cube

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
TILE = {"lat": 64, "lon": 64}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unet() -> nn.Module:
    from engine.ml.registry import build_architecture

    torch.manual_seed(0)
    return build_architecture("unet_small", in_channels=3, base=8, depth=2).eval()


def _cube(chunks: dict):
    return synthetic_cube({"time": 3, "lat": 200, "lon": 150}, chunks=chunks)


def test_device_predict_matches_the_cpu_in_fp32_and_bf16_within_its_precision():
    cube = _cube({"time": 1})
    cpu = predict(cube, _unet(), tile=TILE, device="cpu", precision="fp32").values
    gpu = predict(cube, _unet(), tile=TILE, device="cuda", precision="fp32").values
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-4)
    bf16 = predict(cube, _unet(), tile=TILE, device="cuda", precision="bf16").values
    scale = float(np.abs(cpu).max())
    assert float(np.abs(bf16 - cpu).max()) < 0.05 * scale  # 8-bit mantissa, ~20 layers


@pytest.mark.parametrize("chunks", [{"time": 1, "lat": 70}, {"time": 2, "lat": 37, "lon": 90}])
def test_device_predict_does_not_depend_on_the_chunking(chunks):
    one = predict(_cube({"time": 1}), _unet(), tile=TILE, device="cuda",
                  precision="fp32").values
    other = predict(_cube(chunks), _unet(), tile=TILE, device="cuda", precision="fp32")
    np.testing.assert_allclose(other.values, one, rtol=1e-5, atol=1e-5)


def test_fold_add_on_the_device_matches_the_host():
    rng = np.random.default_rng(0)
    preds = rng.random((2, 5, 6, 8, 8), dtype=np.float32)
    acc_h = torch.zeros((2, 4 * 4 + 8, 5 * 4 + 8))
    fold_add(acc_h, torch.from_numpy(preds), (4, 4))
    acc_d = torch.zeros_like(acc_h, device="cuda")
    fold_add(acc_d, torch.from_numpy(preds).cuda(), (4, 4))
    torch.testing.assert_close(acc_d.cpu(), acc_h)


def test_to_device_and_back_round_trips_through_pinned_memory():
    x = np.random.default_rng(1).random((3, 17, 19), dtype=np.float32)
    x[0, 0, 0] = np.nan
    dev = resolve_device("cuda")
    t = to_device(x, dev, fill_value=0.0)
    assert t.is_cuda
    back = to_host(t)
    assert back.flags.owndata and back[0, 0, 0] == 0.0
    np.testing.assert_array_equal(back[1:], x[1:])


def test_auto_batch_size_is_a_power_of_two_from_free_memory():
    dev = resolve_device("cuda")
    model = _unet().to(dev)
    bs = auto_batch_size(model, (3, 64, 64), dev, _autocast(dev, "bf16"), key="t")
    assert bs >= 16 and bs & (bs - 1) == 0


def test_device_loader_prefetches_batches_in_order_onto_the_gpu():
    from engine.ops.patches import iter_patches

    it = iter_patches(synthetic_cube({"time": 4, "lat": 64, "lon": 64}),
                      size={"lat": 32, "lon": 32}, batch_size=8)
    host = [b.data.copy() for b in it]
    got = list(DeviceLoader(it, "cuda", prefetch=3))
    assert all(x.is_cuda for x, _ in got)
    for (x, _), h in zip(got, host, strict=True):
        np.testing.assert_array_equal(x.cpu().numpy(), h)


def test_fit_on_the_gpu_learns_like_on_the_cpu():
    x = np.random.default_rng(0).normal(size=(512, 3)).astype(np.float32)
    y = x @ np.array([[1.0], [-2.0], [0.5]], np.float32)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    runs = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        runs[dev] = fit(nn.Linear(3, 1), lambda e: batches, loss=nn.functional.mse_loss,
                        epochs=30, lr=0.05, device=dev, seed=0)
    assert runs["cuda"].history[-1]["train_loss"] < 1e-3
    assert runs["cuda"].history[-1]["train_loss"] == pytest.approx(
        runs["cpu"].history[-1]["train_loss"], rel=0.2, abs=1e-5)


def test_gpu_sampler_reads_utilisation():
    with GpuSampler(interval=0.02) as s:
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):
            a = a @ a / 4096
        torch.cuda.synchronize()
    assert s.available
    summary = s.summary()
    assert summary and all(v["samples"] > 0 for v in summary.values())


def test_local_cuda_cluster_predicts_and_writes_with_blocks_overlapping(tmp_path):
    """dask-cuda: one worker per GPU with several threads; inference tasks take a quarter
    of its GPU each, so blocks overlap; the result equals the threaded run, and the
    meter names the GPU."""
    pytest.importorskip("dask_cuda")
    from engine import meter
    from engine.cluster import connect
    from engine.io.writer import write

    cube = _cube({"time": 1})
    want = predict(cube, _unet(), tile=TILE, device="cuda", precision="fp32").values
    with connect("local-cuda") as client:
        info = client.scheduler_info()["workers"]
        assert all(w["resources"].get("GPU") == 1 for w in info.values())
        assert all(w["nthreads"] >= 4 for w in info.values())
        m = meter.Meter(client)
        with m.phase("gpu"):
            out = predict(cube, _unet(), tile=TILE, device="cuda", precision="fp32")
            np.testing.assert_allclose(out.values, want, rtol=1e-5, atol=1e-5)
        assert m.summary()["phases"]["gpu"]["gpus"]
        url = str(tmp_path / "pred.zarr")
        write(out.to_dataset(), url)
    import xarray as xr

    np.testing.assert_allclose(xr.open_zarr(url)["prediction"].values, want, rtol=1e-5,
                               atol=1e-5)


def test_gapfill_demo_runs_on_local_cuda(run_cli, tmp_path):
    """The gap-fill job end to end on dask-cuda (--cluster local-cuda)."""
    pytest.importorskip("dask_cuda")
    job = os.path.join(ROOT, "jobs", "gapfill.yaml")
    out = str(tmp_path / "filled.zarr")
    code, stdout, err = run_cli(["run", job, "--cluster", "local-cuda", "--output", out])
    assert code == 0, err
    assert os.path.exists(os.path.join(out, "zarr.json"))
