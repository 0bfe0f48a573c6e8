"""The GPU data path without a GPU: the device block function run on the CPU, and the
scheduling of inference over many GPU workers on CPU workers that declare ``GPU=1``."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import engine.ml.predict as P
from engine.testing.cubes import synthetic_cube

TILE = {"lat": 32, "lon": 32}


def _net(out: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ELU(),
                         nn.Conv2d(4, out, 3, padding=1))


@pytest.mark.parametrize("out,blend,boundary,fill", [(1, "gaussian", "reflect", None),
                                                     (2, "mean", "constant", 0.5)])
def test_device_block_function_equals_the_host_one(monkeypatch, out, blend, boundary, fill):
    """_tiles_on_device (unfold, fold_add, device constants, one copy in and out) run on
    the CPU gives the host path's result; NaN inputs filled on the device too."""
    ds = synthetic_cube({"time": 2, "lat": 90, "lon": 70}, chunks={"lat": 45}).compute()
    ds["t2m"][0, 10:14, 20:30] = np.nan
    ds = ds.chunk({"lat": 45})
    kw = {"tile": TILE, "out_channels": out, "blend": blend, "boundary": boundary,
          "fill_value": fill, "device": "cpu"}
    host = P.predict(ds, _net(out), **kw).compute(scheduler="sync")
    calls = Counter()
    device_fn = P._tiles_on_device

    def counted(*a, **k):
        calls["device"] += 1
        return device_fn(*a, **k)

    monkeypatch.setattr(P, "_tiles_on_host", counted)
    dev = P.predict(ds, _net(out), batch_size=7, **kw).compute(scheduler="sync")
    assert calls["device"] > 0
    np.testing.assert_allclose(dev.values, host.values, rtol=1e-5, atol=1e-6)


class _Recorder(nn.Module):
    """Identity on channel 0 that records, per worker, how many forward passes overlap."""

    active: Counter = Counter()
    peak: Counter = Counter()
    calls: Counter = Counter()
    lock = threading.Lock()

    def forward(self, x):
        from distributed import get_worker

        w = get_worker().address
        with self.lock:
            self.active[w] += 1
            self.calls[w] += 1
            self.peak[w] = max(self.peak[w], self.active[w])
        time.sleep(0.02)  # long enough for the threads of one worker to overlap
        with self.lock:
            self.active[w] -= 1
        return x[:, :1]


def test_inference_spreads_over_gpu_workers_four_blocks_each():
    """Three workers, two of them declaring GPU=1: every inference task runs on a GPU
    worker, both GPU workers get blocks, and each runs at most gpu-tasks-per-gpu (4) at
    once although it has 6 threads -- the scheduling of a many-GPU dask-cuda cluster."""
    from distributed import Client, LocalCluster

    ds = synthetic_cube({"time": 24, "lat": 64, "lon": 64}, chunks={"time": 1}).compute()
    ds = ds.chunk({"time": 1})
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            async def add(resources):
                from distributed import Worker

                return await Worker(cluster.scheduler_address, nthreads=6,
                                    resources=resources, dashboard=False)

            workers = [client.sync(add, r) for r in ({"GPU": 1}, {"GPU": 1}, {})]
            gpu_addrs = {w.address for w in workers[:2]}
            _Recorder.active.clear(), _Recorder.peak.clear(), _Recorder.calls.clear()
            out = P.predict(ds, _Recorder(), tile=TILE, device="cpu",
                            resources={"GPU": 1 / P.gpu_slots()}, batch_size=4096)
            got = out.compute()
            np.testing.assert_allclose(got.values, ds["t2m"].values, rtol=1e-5, atol=1e-5)
            assert set(_Recorder.calls) == gpu_addrs, "a GPU worker got no block, or a CPU one did"
            assert max(_Recorder.peak.values()) <= 4
            assert max(_Recorder.peak.values()) >= 2, "the blocks of a GPU worker never overlapped"
            for w in workers:
                client.sync(w.close)


def test_write_regions_take_a_smaller_gpu_share_than_inference_blocks():
    """A region task reads, predicts, encodes and stores; it asks for 1/8 of a GPU
    worker (write.gpu-regions-per-gpu) where an inference block asks for 1/4, so
    reading and encoding of other regions overlap the forward passes."""
    import dask

    from engine.io.writer.distributed import fused
    from engine.io.writer.tasks import pack

    ds = synthetic_cube({"time": 2, "lat": 64, "lon": 64}, chunks={"time": 1})
    out = P.predict(ds, _net(), tile=TILE, device="cuda").to_dataset()
    region = fused(pack(out.isel(time=slice(0, 1))))
    assert region is not None and region.resources == {"GPU": 0.125}
    with dask.config.set({"engine.write.gpu-regions-per-gpu": 2}):
        assert fused(pack(out.isel(time=slice(0, 1)))).resources == {"GPU": 0.25}
    cpu = P.predict(ds, _net(), tile=TILE, device="cpu").to_dataset()
    assert fused(pack(cpu.isel(time=slice(0, 1)))).resources == {}
