"""engine.ml.device and engine.ml.fit on the CPU (their CUDA halves: tests/test_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from engine.errors import SpecError
from engine.kernels.windows import overlap_add
from engine.ml.device import (
    DeviceLoader,
    GpuSampler,
    fold_add,
    gpu_slots,
    resolve_device,
    to_device,
    to_host,
    unfold_windows,
)
from engine.ml.fit import evaluate_loss, fit


@settings(max_examples=40, deadline=None)
@given(data=st.data(), k=st.integers(1, 3))
def test_fold_add_matches_the_numpy_overlap_add(data, k):
    size = [data.draw(st.integers(1, 6)) for _ in range(k)]
    stride = [data.draw(st.integers(1, s)) for s in size]
    counts = [data.draw(st.integers(0, 4)) for _ in range(k)]
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2))
    extra = [data.draw(st.integers(0, 3)) for _ in range(k)]
    shape = [max(0, (c - 1) * s + z) + e if c else z + e
             for c, s, z, e in zip(counts, stride, size, extra, strict=True)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    preds = rng.random((*lead, *counts, *size)).astype(np.float32)
    want = np.zeros((*lead, *shape), np.float32)
    overlap_add(want, preds, stride)
    got = torch.zeros(want.shape)
    fold_add(got, torch.from_numpy(preds), stride)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), k=st.integers(1, 3))
def test_grid_boxes_cover_a_flat_range_exactly(data, k):
    from engine.ml.device import grid_boxes

    shape = tuple(data.draw(st.integers(1, 5)) for _ in range(k))
    n = int(np.prod(shape))
    lo = data.draw(st.integers(0, n))
    hi = data.draw(st.integers(lo, n))
    seen = []
    boxes = list(grid_boxes(lo, hi, shape))
    for start, size in boxes:
        idx = np.indices(size).reshape(k, -1).T + np.array(start)
        seen += [int(np.ravel_multi_index(tuple(i), shape)) for i in idx]
    assert seen == list(range(lo, hi))  # in order, each once
    assert len(boxes) <= 2 * k - 1


@settings(max_examples=40, deadline=None)
@given(data=st.data(), k=st.integers(1, 3))
def test_fold_add_run_over_batches_equals_one_weighted_fold(data, k):
    """Consecutive runs of a window grid (a model's batches, cutting rows anywhere) added
    with weights give the weighted fold of the whole grid."""
    from engine.ml.device import fold_add_run

    size = [data.draw(st.integers(1, 5)) for _ in range(k)]
    stride = [data.draw(st.integers(1, s)) for s in size]
    counts = [data.draw(st.integers(1, 4)) for _ in range(k)]
    shape = [(c - 1) * s + z for c, s, z in zip(counts, stride, size, strict=True)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    preds = torch.from_numpy(rng.random((*counts, 2, *size)).astype(np.float32))
    w = torch.from_numpy(rng.random(size).astype(np.float32))
    want = np.zeros((2, *shape), np.float32)  # numpy's own weighted overlap-add
    overlap_add(want, preds.movedim(k, 0).numpy(), stride, weights=w.numpy())
    got = torch.zeros((2, *shape))
    flat = preds.reshape(-1, 2, *size)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(flat)), max_size=4))))
    for a, b in zip([0, *cuts], [*cuts, len(flat)], strict=True):
        fold_add_run(got, flat[a:b], counts, a, stride, w)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_fold_add_refuses_windows_past_the_end():
    with pytest.raises(ValueError, match="exceed"):
        fold_add(torch.zeros(5), torch.ones(3, 4), (1,))  # windows reach index 6
    with pytest.raises(ValueError, match="do not match"):
        fold_add(torch.zeros(2, 8), torch.ones(3, 2, 4), (4,))


def test_unfold_windows_is_the_window_grid():
    x = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    w = unfold_windows(x, 2, (4, 5), (2, 3))
    assert tuple(w.shape) == (2, 3, 4, 3, 4, 5)
    assert torch.equal(w[1, 2, 3, 2], x[1, 2, 6:10, 6:11])
    assert w.data_ptr() == x.data_ptr()  # a view, no copy


def test_to_device_fills_nan_on_the_cpu():
    a = np.array([[1.0, np.nan], [3.0, 4.0]], np.float64)
    t = to_device(a, torch.device("cpu"), fill_value=-1.0)
    assert t.shape == (2, 2) and t.dtype == torch.float32
    np.testing.assert_array_equal(to_host(t), [[1, -1], [3, 4]])


def test_resolve_device_and_slots():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
    assert gpu_slots() == 4
    import dask

    with dask.config.set({"engine.predict.gpu-tasks-per-gpu": 3}), \
            pytest.raises(ValueError, match="power of two"):
        gpu_slots()


def test_device_loader_passes_every_batch_in_order():
    batches = [(np.full((2, 3), i, np.float32), np.full(2, i, np.int64)) for i in range(5)]
    got = list(DeviceLoader(batches, "cpu"))
    assert [int(x[0, 0]) for x, _ in got] == list(range(5))
    assert all(isinstance(x, torch.Tensor) and y.dtype == torch.int64 for x, y in got)


def test_device_loader_takes_patch_batches():
    from engine.ops.patches import iter_patches
    from engine.testing.cubes import synthetic_cube

    it = iter_patches(synthetic_cube({"time": 2, "lat": 32, "lon": 32}), size={"lat": 16,
                                                                               "lon": 16},
                      batch_size=4)
    n = sum(len(x) for x, _ in DeviceLoader(it, "cpu"))
    assert n == it.n_windows


def test_gpu_sampler_without_a_gpu_is_empty_not_an_error():
    with GpuSampler(interval=0.01) as s:
        pass
    assert s.available or s.summary() == {}


def _regression(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    return x, x @ np.array([[1.5], [-2.0], [0.5]], np.float32) + 0.25


def test_fit_learns_and_is_reproducible():
    x, y = _regression()
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]

    def once():
        torch.manual_seed(1)  # the same initial weights; fit's seed covers the steps
        return fit(nn.Linear(3, 1), lambda e: batches, loss=nn.functional.mse_loss, epochs=60,
                   lr=0.05, device="cpu", seed=7)

    runs = [once(), once()]
    assert runs[0].history[-1]["train_loss"] < 1e-3
    assert [r["train_loss"] for r in runs[0].history] == [r["train_loss"]
                                                          for r in runs[1].history]
    assert runs[0].samples == 60 * len(x) and runs[0].samples_per_s > 0


def test_fit_stops_early_and_keeps_the_best_weights():
    x, y = _regression()
    xv, yv = x[:64] * 0, y[:64] * 0 + 100.0  # validation the model cannot fit: gets worse
    res = fit(nn.Linear(3, 1), lambda e: [(x, y)], loss=nn.functional.mse_loss, epochs=50,
              lr=0.05, val=lambda: [(xv, yv)], patience=3, device="cpu", seed=0)
    assert res.stopped_early and len(res.history) < 50
    best = min(r["val_loss"] for r in res.history)
    assert res.history[res.best_epoch]["val_loss"] == best
    got = evaluate_loss(res.model, [(xv, yv)], nn.functional.mse_loss, "cpu")
    assert got == pytest.approx(best, rel=1e-5)


def test_fit_bad_arguments_are_one_line():
    x, y = _regression(8)
    for kw, msg in (({"precision": "fp8"}, "precision"), ({"epochs": 0}, "epochs"),
                    ({"patience": 2}, "val=")):
        args = {"loss": nn.functional.mse_loss, "epochs": 1, "device": "cpu", **kw}
        with pytest.raises(SpecError, match=msg):
            fit(nn.Linear(3, 1), lambda e: [(x, y)], **args)
    with pytest.raises(SpecError, match="empty"):
        fit(nn.Linear(3, 1), lambda e: [], loss=nn.functional.mse_loss, epochs=1, device="cpu")
    with pytest.raises(SpecError, match="validation batches are empty"):
        fit(nn.Linear(3, 1), lambda e: [(x, y)], loss=nn.functional.mse_loss, epochs=2,
            val=lambda: [], device="cpu")
    with pytest.raises(SpecError, match="patience=0"):
        fit(nn.Linear(3, 1), lambda e: [(x, y)], loss=nn.functional.mse_loss, epochs=2,
            val=lambda: [(x, y)], patience=0, device="cpu")
    for bad in ("gpu", "CPU", "cuda:x"):
        with pytest.raises(SpecError, match="use auto, cpu, cuda"):
            fit(nn.Linear(3, 1), lambda e: [(x, y)], loss=nn.functional.mse_loss, epochs=1,
                device=bad)


def test_nan_in_the_data_stops_training_with_one_line():
    """A NaN target made every loss NaN, and with it the weights, silently (no epoch was
    ever 'best'): now the first epoch says so."""
    from engine.errors import TrainingError

    x, y = _regression(32)
    y[3] = np.nan
    with pytest.raises(TrainingError, match="epoch 0: the training loss is nan"):
        fit(nn.Linear(3, 1), lambda e: [(x, y)], loss=nn.functional.mse_loss, epochs=3,
            device="cpu")
    xv, yv = _regression(8)
    yv[0] = np.nan
    with pytest.raises(TrainingError, match="the validation loss is nan"):
        fit(nn.Linear(3, 1), lambda e: [(x[:3], x[:3, :1])], loss=nn.functional.mse_loss,
            epochs=3, val=lambda: [(xv, yv)], device="cpu")


def test_seed_covers_numpy_and_random_in_the_batch_function():
    import random

    x, y = _regression(40)

    def batches(epoch):
        idx = np.random.permutation(len(x))  # noqa: NPY002 (a user batch function on the global generator)
        random.shuffle(idx)
        return [(x[idx[i:i + 8]], y[idx[i:i + 8]]) for i in range(0, len(x), 8)]

    def once():
        torch.manual_seed(1)
        net = nn.Linear(3, 1)
        return [r["train_loss"] for r in fit(net, batches, loss=nn.functional.mse_loss,
                                              epochs=3, device="cpu", seed=5).history]

    assert once() == once()


def test_an_in_place_model_does_not_change_the_callers_batches():
    """On the CPU batches are the loop's own copies, as on a GPU (torch's DataLoader
    never hands a model the dataset's memory either)."""
    x, y = _regression(16)
    x0 = x.copy()
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 1))
    fit(model, lambda e: [(x, y)], loss=nn.functional.mse_loss, epochs=2, device="cpu")
    np.testing.assert_array_equal(x, x0)
    t = torch.from_numpy(x0.copy())
    got = next(iter(DeviceLoader([(t, y)], "cpu")))[0]
    assert not np.shares_memory(got.numpy(), t.numpy())


def test_fold_add_without_windows_and_with_a_bad_stride():
    fold_add(torch.zeros(3), torch.ones(0, 5), (1,))  # no window: nothing to add
    with pytest.raises(ValueError, match="step must be >= 1"):
        fold_add(torch.zeros(8), torch.ones(2, 4), (0,))


def test_leaving_the_gpu_loader_early_does_not_wait_for_a_slow_source(monkeypatch):
    """The CUDA producer/consumer logic, its CUDA calls stubbed on the CPU: breaking out
    while the source is inside a slow next() (a chunk being read) returns at once; the
    producer, a daemon thread, exits when that next() returns."""
    import contextlib
    import threading
    import time

    import engine.ml.device as D

    class Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: Stream())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None, raising=False)
    monkeypatch.setattr(D, "_pin", lambda x: x)
    release = threading.Event()
    batch = (np.zeros((2, 3), np.float32),)

    def source():
        yield batch
        yield batch
        release.wait(10)  # a slow read
        yield batch

    loader = D.DeviceLoader(source(), "cpu")._cuda()
    next(loader)
    t0 = time.perf_counter()
    loader.close()
    assert time.perf_counter() - t0 < 1.0
    release.set()
    producers = [t for t in threading.enumerate() if t.name == "engine-device-loader"]
    for t in producers:
        t.join(2)
    assert not any(t.is_alive() for t in producers)
