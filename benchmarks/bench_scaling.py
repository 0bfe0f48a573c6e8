"""Scaling of the inference + write pipeline over dask worker processes (and one GPU).

Workload (one *run*, timed from opening the input to the finished store)
    ``xr.open_zarr(input)`` -> :func:`engine.ml.predict.predict` of a conv net
    (``engine.ml.archs.conv_net``, 3x3 kernels, random weights) with 64x64 tiles, 50 %
    overlap, Gaussian blending -> :func:`engine.io.writer.write` to a fresh local store,
    one region per image (``region_chunks={"time": 1}``, so every worker has regions to
    write). The input is a synthetic float32 cube (3 variables, one chunk per image, so
    predict runs exactly the global window grid: ``tiles`` counts those windows) stored
    once with ``to_zarr`` before anything is timed.

Methods
    ``k CPU workers``: ``distributed.LocalCluster(n_workers=k, threads_per_worker=1,
    processes=True)`` for k in the size's list (``large``: 1, 2, 4, 8, capped at the
    core count). Each cluster is started, its workers import torch and the engine, and
    one warm-up run loads the model into every worker -- none of it timed; then the
    median of ``repeats`` runs. Torch intra-op threads per worker are recorded: the
    nanny starts workers with ``OMP_NUM_THREADS=1``, which the engine keeps
    (``predict._execution_context``); the benchmark sets 1 explicitly where a worker
    reports more. The warm-up covers the first k images only (every worker gets one).
    Every k's output must equal the k=1 output (float32 tolerance).
    ``1 GPU`` (only where ``torch.cuda.is_available()`` and ``dask_cuda`` imports):
    ``dask_cuda.LocalCUDACluster(n_workers=1, resources={"GPU": 1})``, the same pipeline
    with a UNet-sized model (``unet_small``, base 16, depth 2), ``device="cuda"``,
    ``precision="bf16"`` (autocast), larger batches; tiles/s per GPU. Its first image is
    checked against the same model in fp32 on the CPU (bf16 tolerance). Elsewhere the
    GPU row is skipped with the reason recorded.

Figures per k: seconds, tiles/s, tiles/s per worker, output px/s, input MB/s read and
output MB/s written, speedup ``t1 / tk`` and parallel efficiency ``speedup / k``.

Ratio ``speedup_2_workers`` = t1 / t2. Target 1.3 (65 % parallel efficiency): on a
2-core machine the client, the scheduler and both workers share the two cores with
whatever else runs; 2.0 is the unreachable ideal. ``large`` also reports
``speedup_<k>_workers`` for its largest k (no target). Peak memory is sampled every
50 ms: walking the worker processes more often costs enough CPU to depress the speedup.
Measured figures: benchmarks/README.md.

A PNG with tiles/s against workers (and the ideal linear line) and the efficiency is
written next to the JSON: ``benchmarks/results/bench_scaling-<size>.png``.

Run ``python -m benchmarks.bench_scaling [tiny|default|large] [--tag TAG]``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import dask
import numpy as np
import xarray as xr

from benchmarks._common import RESULTS, PeakRSS, cli, machine, print_ratios
from engine.io.writer import WriteResult, write
from engine.kernels.windows import grid_padding
from engine.testing.cubes import synthetic_cube

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": (4, 128, 128), "workers": [1, 2], "repeats": 3,
             "model": {"hidden": 8, "layers": 2, "kernel_size": 3}, "batch": 32,
             "gpu_batch": 256},
    "default": {"shape": (8, 512, 512), "workers": [1, 2], "repeats": 3,
                "model": {"hidden": 16, "layers": 3, "kernel_size": 3}, "batch": 32,
                "gpu_batch": 256},
    "large": {"shape": (16, 1024, 1024), "workers": [1, 2, 4, 8], "repeats": 3,
              "model": {"hidden": 16, "layers": 3, "kernel_size": 3}, "batch": 32,
              "gpu_batch": 512},
}
VARIABLES = ("t2m", "lst", "ndvi")
TILE, OVERLAP = 64, 0.5
UNET = {"base": 16, "depth": 2}
GPU_PRECISION = "bf16"
GPU_DEVICE = "cuda"
MiB = 2**20


# ---------------------------------------------------------------------- workers


def _worker_setup() -> dict[str, int]:
    """Runs in every worker: import torch and the engine, one intra-op thread each."""
    import torch

    import engine.ml.predict  # noqa: F401  (import cost out of the timed runs)

    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    return {"torch_threads_found": before, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)}


def _gpu_name() -> str | None:
    """The worker's CUDA device name (runs in the worker)."""
    import torch

    try:
        return torch.cuda.get_device_name(0)
    except Exception:
        return None


def _pipeline(input_path: str, model: Any, client: Any, cfg: dict, *, device: str = "cpu",
              precision: str = "fp32", batch: int | None = None,
              time_slice: slice | None = None) -> Callable[[str], WriteResult]:
    from engine.ml.predict import predict

    def run_once(path: str) -> WriteResult:
        src = xr.open_zarr(input_path)
        if time_slice is not None:
            src = src.isel(time=time_slice)
        out = predict(src, model, variables=list(VARIABLES), tile={"lat": TILE, "lon": TILE},
                      overlap=OVERLAP, batch_size=batch or cfg["batch"], device=device,
                      precision=precision)  # type: ignore[arg-type]
        res = write(out.to_dataset(), path, client=client, region_chunks={"time": 1})
        assert res.n_written == res.n_regions, res
        return res

    return run_once


def _timed_runs(fn: Callable[[str], WriteResult], warm_fn: Callable[[str], WriteResult],
                root: str, name: str, repeats: int) -> dict[str, Any]:
    """One warm-up run of ``warm_fn``, then ``repeats`` timed runs of ``fn``, each into a
    fresh store."""
    counter = itertools.count()

    def fresh() -> str:
        return os.path.join(root, f"{name}-{next(counter)}.zarr")

    warm = fresh()
    warm_fn(warm)
    shutil.rmtree(warm, ignore_errors=True)
    times, peaks, deltas, last, res = [], [], [], "", None
    for _ in range(repeats):
        path = fresh()
        with PeakRSS(interval=0.05) as peak:
            t0 = time.perf_counter()
            res = fn(path)
            times.append(time.perf_counter() - t0)
        peaks.append(peak.peak_mb)
        deltas.append(peak.delta_mb)
        if last:
            shutil.rmtree(last, ignore_errors=True)
        last = path
    return {"seconds": statistics.median(times), "times": times, "peak_mb": max(peaks),
            "delta_mb": max(deltas), "store": last, "result": res}


def _prediction(path: str) -> np.ndarray:
    return xr.open_zarr(path, chunks=None)["prediction"].values


# ---------------------------------------------------------------------- sections


def _cpu(cfg: dict, input_path: str, root: str, counts: dict[str, float]) -> list[dict]:
    import torch
    from distributed import Client, LocalCluster

    from engine.ml.registry import build_architecture

    torch.manual_seed(0)
    model = build_architecture("conv_net", in_channels=len(VARIABLES), **cfg["model"]).eval()
    cores = os.cpu_count() or 1
    workers = [k for k in cfg["workers"] if k <= cores] or [1]
    rows, reference = [], None
    for k in workers:
        with LocalCluster(n_workers=k, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.wait_for_workers(k)
            setup = list(client.run(_worker_setup).values())
            # warm-up on the first k images: every worker loads the model once
            warm = _pipeline(input_path, model, client, cfg, time_slice=slice(0, k))
            out = _timed_runs(_pipeline(input_path, model, client, cfg), warm, root,
                              f"cpu{k}", cfg["repeats"])
        pred = _prediction(out["store"])
        shutil.rmtree(out["store"], ignore_errors=True)
        if reference is None:
            reference = pred
        else:  # the same model on the same input: the worker count must not matter
            np.testing.assert_allclose(pred, reference, rtol=1e-5, atol=1e-5)
        rows.append(_row(f"{k} CPU worker" + ("s" if k > 1 else ""), "cpu", k, out, counts,
                         torch_threads=[s["torch_threads"] for s in setup],
                         torch_threads_found=[s["torch_threads_found"] for s in setup]))
    t1 = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = t1 / r["seconds"]
        r["efficiency"] = r["speedup"] / r["workers"]
    return rows


def _gpu(cfg: dict, input_path: str, root: str, counts: dict[str, float]) -> dict[str, Any]:
    """One dask-cuda worker, UNet-sized model, bf16 autocast; a skip reason elsewhere."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return {"skipped": "dask_cuda is not installed: pip install "
                           "'cube-engine[gpu-cuda12]' (or [gpu-cuda13] for CUDA 13)"}
    from distributed import Client

    from engine.ml.predict import predict
    from engine.ml.registry import build_architecture

    torch.manual_seed(0)
    model = build_architecture("unet_small", in_channels=len(VARIABLES), **UNET).eval()
    try:
        cluster = LocalCUDACluster(n_workers=1, threads_per_worker=2, resources={"GPU": 1},
                                   dashboard_address=None)
    except Exception as err:  # no driver, NVML failure
        return {"skipped": f"dask_cuda.LocalCUDACluster did not start: {err}"}
    gpu_kw = {"device": GPU_DEVICE, "precision": GPU_PRECISION, "batch": cfg["gpu_batch"]}
    with cluster, Client(cluster) as client:
        client.wait_for_workers(1)
        names = list(client.run(_gpu_name).values())
        out = _timed_runs(_pipeline(input_path, model, client, cfg, **gpu_kw),
                          _pipeline(input_path, model, client, cfg, time_slice=slice(0, 1),
                                    **gpu_kw),
                          root, "gpu", cfg["repeats"])
    got = _prediction(out["store"])[:1]
    shutil.rmtree(out["store"], ignore_errors=True)
    # the first image with the same model in fp32 on the CPU (threaded scheduler)
    src = xr.open_zarr(input_path).isel(time=slice(0, 1))
    ref = np.asarray(predict(src, model, variables=list(VARIABLES),
                             tile={"lat": TILE, "lon": TILE}, overlap=OVERLAP, device="cpu",
                             precision="fp32").compute(scheduler="threads").values)
    scale = float(np.nanmax(ref) - np.nanmin(ref)) or 1.0
    max_err = float(np.nanmax(np.abs(got - ref))) / scale
    mean_err = float(np.nanmean(np.abs(got - ref))) / scale
    # bf16 keeps ~3 significant digits through ~10 layers; a misplaced tile is O(1) off
    if not (max_err < 0.1 and mean_err < 0.01):
        raise AssertionError(f"GPU ({GPU_PRECISION}) prediction differs from the CPU fp32 one "
                             f"by up to {max_err:.3g} (mean {mean_err:.3g}) of its range")
    row = _row("1 GPU (dask-cuda)", GPU_DEVICE, 1, out, counts, gpu=names[0] if names else None,
               precision=GPU_PRECISION, relative_error_vs_cpu_fp32=max_err,
               mean_relative_error_vs_cpu_fp32=mean_err)
    row["tiles_per_s_per_gpu"] = row["tiles_per_s"]
    return row


def _row(name: str, device: str, k: int, out: dict, counts: dict[str, float],
         **extra: Any) -> dict[str, Any]:
    s = out["seconds"]
    res: WriteResult = out["result"]
    return {
        "name": name, "device": device, "workers": k, "seconds": s, "times": out["times"],
        "tiles_per_s": counts["tiles"] / s, "tiles_per_s_per_worker": counts["tiles"] / s / k,
        "output_px_per_s": counts["pixels"] / s,
        "read_mb_per_s": counts["input_bytes"] / MiB / s,
        "write_mb_per_s": res.bytes_written / MiB / s,
        "regions": res.n_regions, "peak_mb": out["peak_mb"], "delta_mb": out["delta_mb"],
        **extra,
    }


# ---------------------------------------------------------------------------- plot


def _plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpu = res["rows"]
    ks = [r["workers"] for r in cpu]
    tps = [r["tiles_per_s"] for r in cpu]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ks, tps, "o-", label=f"conv_net, {res['machine']['cpus']}-core machine")
    left.plot(ks, [tps[0] * k for k in ks], "--", color="grey", label="ideal (linear)")
    gpu = res.get("gpu") or {}
    if "tiles_per_s" in gpu:
        left.axhline(gpu["tiles_per_s"], color="tab:green", ls=":",
                     label=f"1 GPU, unet_small {gpu['precision']}")
    left.set(xlabel="worker processes (1 thread each)", ylabel="tiles/s",
             title=f"predict + write, {TILE}x{TILE} tiles, overlap {OVERLAP}", xticks=ks)
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.plot(ks, [r["efficiency"] for r in cpu], "o-")
    right.axhline(1.0, color="grey", ls="--")
    right.set(xlabel="worker processes", ylabel="parallel efficiency (speedup / k)",
              ylim=(0, 1.1), xticks=ks, title=f"size {res['size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- run


def run(size: str = "default", png_dir: str | None = RESULTS) -> dict[str, Any]:
    """Run the benchmark at ``size`` (tiny, default, large); returns the result dict.

    The PNG goes to ``png_dir`` (default ``benchmarks/results``; None: no PNG).
    """
    from zarr.errors import ZarrUserWarning

    cfg = SIZES[size]
    t, h, w = cfg["shape"]
    stride = round(TILE * (1 - OVERLAP))
    counts = {
        "tiles": (t * grid_padding(h, TILE, stride).windows
                  * grid_padding(w, TILE, stride).windows),
        "pixels": t * h * w,
        "input_bytes": len(VARIABLES) * t * h * w * 4,
    }
    root = tempfile.mkdtemp(prefix="bench-scaling-")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata",
                                    category=ZarrUserWarning)
            input_path = os.path.join(root, "input.zarr")
            cube = synthetic_cube({"time": t, "lat": h, "lon": w}, chunks={"time": 1},
                                  variables=VARIABLES)
            with dask.config.set(scheduler="threads"):
                cube.to_zarr(input_path, zarr_format=3, consolidated=True)
            rows = _cpu(cfg, input_path, root, counts)
            gpu = _gpu(cfg, input_path, root, counts)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    by_k = {r["workers"]: r for r in rows}
    ratios, targets = {}, {}
    if 2 in by_k:
        ratios["speedup_2_workers"] = by_k[2]["speedup"]
        if (os.cpu_count() or 1) >= 2:
            targets["speedup_2_workers"] = 1.3
    if max(by_k) > 2:
        ratios[f"speedup_{max(by_k)}_workers"] = by_k[max(by_k)]["speedup"]
    if not ratios:  # a single worker fits the machine: still a positive figure
        ratios["tiles_per_s_1_worker"] = by_k[1]["tiles_per_s"]
    res = {
        "benchmark": "scaling",
        "size": size,
        "machine": machine(),
        "cube": {"shape": [t, h, w], "chunks": [1, h, w], "variables": list(VARIABLES),
                 "dtype": "float32", "input_mb": counts["input_bytes"] / MiB},
        "model": {"cpu": "conv_net " + " ".join(f"{k}={v}" for k, v in cfg["model"].items()),
                  "gpu": "unet_small " + " ".join(f"{k}={v}" for k, v in UNET.items())},
        "tile": TILE, "overlap": OVERLAP, "stride": stride, "tiles": counts["tiles"],
        "batch_size": {"cpu": cfg["batch"], "gpu": cfg["gpu_batch"]},
        "rows": rows,
        "gpu": gpu,
        "ratios": ratios,
        "targets": targets,
        "note": ("median of repeats after one warm-up run per cluster; cluster start, worker "
                 "imports and the input store are not timed; one region per image; the GPU "
                 "row runs a different (UNet-sized) model"),
    }
    if png_dir is not None:
        os.makedirs(png_dir, exist_ok=True)
        path = os.path.join(png_dir, f"bench_scaling-{size}.png")
        with contextlib.suppress(ImportError):
            _plot(res, path)
            res["png"] = path
    return res


def _print(res: dict[str, Any]) -> None:
    c = res["cube"]
    print(f"scaling benchmark ({res['size']}): cube {c['shape']} x {len(c['variables'])} vars "
          f"float32 ({c['input_mb']:.0f} MB), tiles {res['tile']} stride {res['stride']}: "
          f"{res['tiles']} tiles; CPU model {res['model']['cpu']}, "
          f"{res['machine']['cpus']} cores")
    print(f"{'method':20s} {'seconds':>8s} {'tiles/s':>9s} {'/worker':>8s} {'Mpx/s':>7s} "
          f"{'read MB/s':>9s} {'write MB/s':>10s} {'speedup':>7s} {'eff':>5s} "
          f"{'peak MB':>8s} {'torch thr':>9s}")
    for r in res["rows"] + ([res["gpu"]] if "seconds" in res["gpu"] else []):
        thr = ",".join(map(str, r.get("torch_threads", []))) or "-"
        sp = f"{r['speedup']:7.2f}" if "speedup" in r else f"{'-':>7s}"
        eff = f"{r['efficiency']:5.2f}" if "efficiency" in r else f"{'-':>5s}"
        print(f"{r['name']:20s} {r['seconds']:8.3f} {r['tiles_per_s']:9.1f} "
              f"{r['tiles_per_s_per_worker']:8.1f} {r['output_px_per_s'] / 1e6:7.2f} "
              f"{r['read_mb_per_s']:9.1f} {r['write_mb_per_s']:10.1f} {sp} {eff} "
              f"{r['peak_mb']:8.0f} {thr:>9s}")
    g = res["gpu"]
    if "skipped" in g:
        print(f"1 GPU: skipped ({g['skipped']})")
    else:
        print(f"1 GPU: {g.get('gpu')}, {res['model']['gpu']} {g['precision']}: "
              f"{g['tiles_per_s_per_gpu']:.0f} tiles/s per GPU "
              f"(error vs CPU fp32: max {g['relative_error_vs_cpu_fp32']:.2g}, mean "
              f"{g['mean_relative_error_vs_cpu_fp32']:.2g} of the range)")
    print_ratios(res)
    if res.get("png"):
        print(f"plot: {res['png']}")


main = cli("scaling", run, _print)

if __name__ == "__main__":
    main(None)
