"""The GPU data path against raw loops on the same GPU: ``python -m benchmarks gpu``.

For each model (``unet_small`` base 16 depth 2, base 64 depth 3) and precision (fp32,
bf16), on a ``T x H x W x 3`` float32 cube in Zarr (one chunk per time step), 64x64 tiles
at 50 % overlap, batches of 512:

``raw, device-resident``
    the model in a plain loop over the same tiles already on the GPU, in the batch
    shapes predict runs (per image: full batches and a remainder).
``raw, pinned copies`` -- the baseline of every ratio
    the same loop with each batch in pinned host memory, copied ``non_blocking``.
``predict``
    :func:`engine.ml.predict.predict` over the Zarr cube on dask-cuda (one worker per
    GPU, ``engine.cluster.gpu-threads-per-worker`` threads), persisted on the worker.
``predict -> write``
    the same written by :func:`engine.io.writer.write` to a local Zarr store.
``train``
    :func:`engine.ml.fit.fit` fed by :func:`engine.ops.patches.iter_patches` over the
    Zarr cube (pinned batches prefetched to the GPU) vs ``raw train``: the same number
    of steps of the same model over batches already on the GPU.

Correctness: the first image predicted on the GPU vs the CPU in fp32 (max and mean
absolute error over the reference's largest absolute value). GPU utilisation sampled
through NVML (``engine.ml.device.GpuSampler``) during predict and predict -> write.

``ratios.<model>_<precision>_predict_vs_raw`` etc. are the engine's tiles/s over the
pinned-copy raw loop's. ``BENCH_GPU_ONLY=bf16`` (a precision, a model, or
``model:precision``) runs a subset. Without a CUDA device the default and large sizes are skipped
with the reason; ``tiny`` then runs the same code on the CPU (so it never rots).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks._common import cli, machine

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": (2, 128, 128), "models": {"unet_b8_d2": {"base": 8, "depth": 2}},
             "precisions": ("fp32",), "batch": 64, "repeats": 1, "train_steps": 4},
    "default": {"shape": (16, 1024, 1024),
                "models": {"unet_b16_d2": {"base": 16, "depth": 2},
                           "unet_b64_d3": {"base": 64, "depth": 3}},
                "precisions": ("fp32", "bf16"), "batch": 512, "repeats": 2,
                "train_steps": 24},
    "large": {"shape": (64, 1024, 1024),
              "models": {"unet_b16_d2": {"base": 16, "depth": 2},
                         "unet_b64_d3": {"base": 64, "depth": 3}},
              "precisions": ("fp32", "bf16"), "batch": 512, "repeats": 2,
              "train_steps": 48},
}
VARIABLES = ("t2m", "lst", "ndvi")
TILE, STRIDE = 64, 32
TARGETS = {"predict_vs_raw": 0.8, "predict_write_vs_raw": 0.5, "train_vs_raw": 0.8}


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _model(arch: dict[str, int], dev: Any) -> Any:
    import torch

    from engine.ml.registry import build_architecture

    torch.manual_seed(0)
    return build_architecture("unet_small", in_channels=len(VARIABLES), **arch).to(dev).eval()


def _tiles(store: str, n_time: int, dev: Any) -> tuple[Any, list[int]]:
    """The tiles predict runs (padded global grid of every image), as a host tensor, and
    the batch boundaries predict uses (per image: full batches, then the remainder)."""
    import torch
    import xarray as xr

    from engine.kernels.windows import grid_padding, pad_array, window_view

    ds = xr.open_zarr(store)
    out = []
    for t in range(n_time):
        img = np.stack([ds[v].isel(time=t).values for v in VARIABLES]).astype(np.float32)
        pads = [(0, 0)] + [(p.before, p.after) for p in
                           (grid_padding(n, TILE, STRIDE) for n in img.shape[1:])]
        img = pad_array(img, pads, "reflect")
        win = window_view(img, (1, 2), (TILE, TILE), (STRIDE, STRIDE))  # (C, nH, nW, T, T)
        out.append(np.ascontiguousarray(np.moveaxis(win, 0, 2)).reshape(-1, len(VARIABLES),
                                                                       TILE, TILE))
    return torch.from_numpy(np.concatenate(out)), [len(o) for o in out]


def _raw_loops(model: Any, host: Any, per_image: list[int], batch: int, precision: str,
               dev: Any, repeats: int) -> dict[str, float]:
    import torch

    from engine.ml.predict import _autocast

    bounds = []
    start = 0
    for n in per_image:
        bounds += [(start + b, start + min(n, b + batch)) for b in range(0, n, batch)]
        start += n
    resident = host.to(dev)
    pinned = host.pin_memory() if dev.type == "cuda" else host

    def run(src: Any, copy: bool) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for a, b in bounds:
                x = src[a:b].to(dev, non_blocking=True) if copy else src[a:b]
                with _autocast(dev, precision):
                    model(x)
        _sync(dev)
        return time.perf_counter() - t0

    run(resident, False)  # warm-up: cuDNN algorithm choice for every batch shape
    n = len(host)
    t_res = min(run(resident, False) for _ in range(repeats))
    t_pin = min(run(pinned, True) for _ in range(repeats))
    del resident
    return {"raw_resident_tiles_per_s": n / t_res, "raw_pinned_tiles_per_s": n / t_pin}


def _engine_runs(client: Any, store: str, model: Any, batch: int, precision: str, dev: Any,
                 root: str, repeats: int, n_tiles: int) -> dict[str, Any]:
    import xarray as xr
    from distributed import wait

    from engine.io.writer import write
    from engine.ml.device import GpuSampler
    from engine.ml.predict import predict

    device = "cuda" if dev.type == "cuda" else "cpu"
    extra = {} if device == "cuda" else {"resources": {"GPU": 0.25}}

    def pred() -> Any:
        return predict(xr.open_zarr(store), model.cpu(), variables=list(VARIABLES),
                       tile={"lat": TILE, "lon": TILE}, overlap=0.5, batch_size=batch,
                       device=device, precision=precision, **extra)

    def run_predict() -> None:
        fut = client.persist(pred().data)
        wait(fut)
        del fut

    def run_write() -> None:
        out = os.path.join(root, "pred.zarr")
        shutil.rmtree(out, ignore_errors=True)
        write(pred().to_dataset(name="prediction"), out, client=client)

    run_predict()  # warm-up: model load per worker, cuDNN algorithms, batch shapes
    res: dict[str, Any] = {}
    for name, fn in (("predict", run_predict), ("predict_write", run_write)):
        with GpuSampler(interval=0.05) as sampler:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        res[f"{name}_tiles_per_s"] = n_tiles / min(times)
        res[f"{name}_s"] = min(times)
        util = sampler.summary()
        res[f"{name}_gpu"] = util
        if util:
            res[f"{name}_gpu_busy_pct"] = float(np.mean([u["busy_mean_pct"]
                                                         for u in util.values()]))
    got = xr.open_zarr(os.path.join(root, "pred.zarr"))["prediction"].isel(time=0).values
    res["first_image"] = got
    return res


def _correctness(store: str, model: Any, got: np.ndarray) -> dict[str, float]:
    """The first image on the CPU in fp32 (threaded scheduler) vs the engine's."""
    import xarray as xr

    from engine.ml.predict import predict

    src = xr.open_zarr(store).isel(time=slice(0, 1))
    ref = predict(src, model.cpu(), variables=list(VARIABLES), tile={"lat": TILE, "lon": TILE},
                  overlap=0.5, device="cpu", precision="fp32").compute(
        scheduler="threads").values[0]
    scale = float(np.abs(ref).max()) or 1.0
    return {"max_rel_err_vs_cpu_fp32": float(np.abs(got - ref).max()) / scale,
            "mean_rel_err_vs_cpu_fp32": float(np.abs(got - ref).mean())
            / (float(np.abs(ref).mean()) or 1.0)}


def _train(store: str, arch: dict[str, int], batch: int, precision: str, dev: Any,
           steps: int) -> dict[str, float]:
    """fit() fed by iter_patches from Zarr vs the same steps on GPU-resident batches."""
    import torch
    import xarray as xr
    from torch import nn

    from engine.ml.fit import _autocast, fit
    from engine.ops.patches import iter_patches

    def loss(pred: Any, x: Any) -> Any:  # reconstruct the first channel: a real gradient
        return nn.functional.mse_loss(pred.float(), x[:, :1])

    ds = xr.open_zarr(store)[list(VARIABLES)]
    n_windows = iter_patches(ds, size={"lat": TILE, "lon": TILE}).n_windows
    batch = min(batch, max(1, n_windows // 2))  # tiny cubes: two batches an epoch
    it = iter_patches(ds, size={"lat": TILE, "lon": TILE}, batch_size=batch)
    per_epoch = it.n_windows // batch
    epochs = max(1, -(-steps // max(1, per_epoch)))

    def batches(epoch: int) -> Any:
        for b in it:
            if len(b) == batch:  # the raw loop runs full batches only
                yield (b.data, b.data)

    train_model = _model(arch, dev).train()
    fit(train_model, batches, loss=loss, epochs=1, device=dev, precision=precision)  # warm-up
    res = fit(train_model, batches, loss=loss, epochs=epochs, device=dev, precision=precision)
    n_steps = res.samples // batch
    # raw: the same number of steps over batches already on the device
    x = torch.randn((min(n_steps, 8) * batch, len(VARIABLES), TILE, TILE), device=dev)
    raw_model = _model(arch, dev).train()
    opt = torch.optim.AdamW(raw_model.parameters(), lr=1e-3)

    def raw(n: int) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(n):
            xb = x[(i % 8) * batch:(i % 8 + 1) * batch] if len(x) >= 8 * batch else \
                x[:batch]
            with _autocast(dev, precision):
                value = loss(raw_model(xb), xb)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
        _sync(dev)
        return time.perf_counter() - t0

    raw(2)
    t_raw = raw(n_steps)
    return {"train_samples_per_s": res.samples_per_s,
            "raw_train_samples_per_s": n_steps * batch / t_raw,
            "train_steps": n_steps, "train_input_wait_s": res.input_wait_s}


@contextlib.contextmanager
def _cluster(dev: Any) -> Any:
    from distributed import Client, LocalCluster

    from engine.cluster import connect

    if dev.type == "cuda":
        with connect("local-cuda", dashboard_address=None) as client:
            yield client
    else:  # the CPU stand-in: one worker with GPU=1, as dask-cuda declares it
        with LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                          resources={"GPU": 1}, dashboard_address=None) as c, Client(c) as client:
            yield client


def run(size: str = "default") -> dict[str, Any]:
    """Run the benchmark at ``size``; returns the result dict (``skipped`` without GPU)."""
    import torch

    from engine.kernels.windows import grid_padding
    from engine.testing.cubes import synthetic_cube

    cfg = SIZES[size]
    base = {"benchmark": "gpu", "size": size, "machine": machine(), "targets": {}}
    cuda = torch.cuda.is_available()
    if not cuda and size != "tiny":
        return {**base, "skipped": "no CUDA device (torch.cuda.is_available() is False)",
                "ratios": {}}
    if cuda:
        try:
            import dask_cuda  # noqa: F401
        except ImportError:
            return {**base, "skipped": "dask_cuda is not installed: make install-gpu "
                                       "CUDA=12|13", "ratios": {}}
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    t, h, w = cfg["shape"]
    per_image = grid_padding(h, TILE, STRIDE).windows * grid_padding(w, TILE, STRIDE).windows
    n_tiles = t * per_image
    root = tempfile.mkdtemp(prefix="bench-gpu-")
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    targets: dict[str, float] = {}
    try:
        store = os.path.join(root, "cube.zarr")
        synthetic_cube({"time": t, "lat": h, "lon": w}, chunks={"time": 1},
                       variables=VARIABLES).to_zarr(store, mode="w")
        host, sizes = _tiles(store, t, dev)
        with _cluster(dev) as client:
            gpu_names = list(client.run(lambda: __import__("torch").cuda.get_device_name(0)
                                        if __import__("torch").cuda.is_available()
                                        else "cpu").values())
            only = os.environ.get("BENCH_GPU_ONLY", "")  # e.g. "bf16" or "unet_b64_d3"
            for mname, arch in cfg["models"].items():
                for precision in cfg["precisions"]:
                    if only and only not in (mname, precision, f"{mname}:{precision}"):
                        continue
                    model = _model(arch, dev)
                    row: dict[str, Any] = {"model": mname, "architecture": {"unet_small": arch},
                                           "precision": precision, "batch": cfg["batch"],
                                           "tiles": n_tiles}
                    row.update(_raw_loops(model, host, sizes, cfg["batch"], precision, dev,
                                          cfg["repeats"]))
                    eng = _engine_runs(client, store, model, cfg["batch"], precision, dev,
                                       root, cfg["repeats"], n_tiles)
                    first = eng.pop("first_image")
                    row.update(eng)
                    row.update(_correctness(store, _model(arch, dev), first))
                    rows.append(row)
        # training reads the cube in this process (a local thread pool), as a training
        # process on a GPU node does: no cluster from here on
        for row in rows:
            arch = cfg["models"][row["model"]]
            row.update(_train(store, arch, cfg["batch"], row["precision"], dev,
                              cfg["train_steps"]))
            raw = row["raw_pinned_tiles_per_s"]
            key = f"{row['model']}_{row['precision']}"
            ratios[f"{key}_predict_vs_raw"] = row["predict_tiles_per_s"] / raw
            ratios[f"{key}_predict_write_vs_raw"] = row["predict_write_tiles_per_s"] / raw
            ratios[f"{key}_train_vs_raw"] = (row["train_samples_per_s"]
                                             / row["raw_train_samples_per_s"])
            row["ratios"] = {k.split(f"{key}_", 1)[1]: v for k, v in ratios.items()
                             if k.startswith(key)}
            if cuda:
                targets[f"{key}_predict_vs_raw"] = TARGETS["predict_vs_raw"]
                targets[f"{key}_train_vs_raw"] = TARGETS["train_vs_raw"]
                if row["model"] == "unet_b64_d3":
                    targets[f"{key}_predict_write_vs_raw"] = TARGETS["predict_write_vs_raw"]
            print(_line(row), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {**base, "device": str(dev), "gpus": gpu_names,
            "cube": {"shape": [t, h, w, len(VARIABLES)], "chunks": [1, h, w],
                     "dtype": "float32", "store": "zarr (local disk)"},
            "tile": TILE, "stride": STRIDE, "rows": rows, "ratios": ratios,
            "targets": targets}


def _line(r: dict[str, Any]) -> str:
    busy = r.get("predict_gpu_busy_pct")
    return (f"{r['model']:12s} {r['precision']:5s} raw resident "
            f"{r['raw_resident_tiles_per_s']:9,.0f}  raw pinned "
            f"{r['raw_pinned_tiles_per_s']:9,.0f}  predict "
            f"{r['predict_tiles_per_s']:9,.0f} ({r['ratios']['predict_vs_raw']:.2f}x)  "
            f"predict->write {r['predict_write_tiles_per_s']:9,.0f} "
            f"({r['ratios']['predict_write_vs_raw']:.2f}x)  train "
            f"{r['train_samples_per_s']:8,.0f} vs raw {r['raw_train_samples_per_s']:8,.0f} "
            f"({r['ratios']['train_vs_raw']:.2f}x)  GPU busy "
            + ("n/a" if busy is None else f"{busy:.0f} %")
            + f"  err max {r['max_rel_err_vs_cpu_fp32']:.1e} mean "
              f"{r['mean_rel_err_vs_cpu_fp32']:.1e}")


def _print(res: dict[str, Any]) -> None:
    if res.get("skipped"):
        print(f"gpu benchmark skipped: {res['skipped']}")
        return
    shape = res["cube"]["shape"]
    print(f"gpu benchmark ({res['size']}) on {', '.join(res['gpus'])}: cube {shape} float32 "
          f"Zarr, tiles {res['tile']} stride {res['stride']}; tiles/s (samples/s for train)")
    hdr = (f"{'model':12s} {'prec':5s} {'raw res.':>9s} {'raw pin.':>9s} {'predict':>9s} "
           f"{'pred->write':>11s} {'train':>8s} {'raw train':>9s} {'busy %':>6s} "
           f"{'max err':>8s} {'mean err':>8s}")
    print(hdr)
    for r in res["rows"]:
        busy = r.get("predict_gpu_busy_pct")
        print(f"{r['model']:12s} {r['precision']:5s} {r['raw_resident_tiles_per_s']:9,.0f} "
              f"{r['raw_pinned_tiles_per_s']:9,.0f} {r['predict_tiles_per_s']:9,.0f} "
              f"{r['predict_write_tiles_per_s']:11,.0f} {r['train_samples_per_s']:8,.0f} "
              f"{r['raw_train_samples_per_s']:9,.0f} "
              f"{'n/a' if busy is None else f'{busy:.0f}':>6s} "
              f"{r['max_rel_err_vs_cpu_fp32']:8.1e} {r['mean_rel_err_vs_cpu_fp32']:8.1e}")
    for name, value in res["ratios"].items():
        target = res["targets"].get(name)
        print(f"{name}: {value:.2f}x" + (f" (target >= {target}x)" if target else ""))


main = cli("gpu", run, _print)


if __name__ == "__main__":
    main()
