"""Blockwise inference overhead on CPU: predict vs the same model on pre-cut batches.

``predict (tiled)``
    :func:`engine.ml.predict.predict` on a dask-backed cube (chunks in memory) with a
    conv net whose forward pass dominates, 64x64 tiles, 50 % overlap, Gaussian blending,
    computed with the default local (threaded) scheduler.
``model loop (tiled)``
    the same model called in a plain loop (run in a worker thread, like predict's
    forward passes) on pre-cut float32 batches: the same number
    of tiles predict runs, in batches of the same shapes (``batch_size`` per call, the
    remainder of each image in a smaller one). One chunk per image, so predict runs
    exactly the global grid; with smaller chunks the windows shared by two blocks' halos
    run twice.
``predict, no-op model`` / ``bare loop``
    the engine's own per-tile cost on one thread (a model that returns its first input
    channel, batches of 256, the synchronous scheduler) against the same memory work in
    bare numpy and torch on images padded in memory beforehand (windows copied, added
    weighted by fused multiply-adds, the core divided): ``host_ceiling_vs_floor`` is the share
    of the bare loop's speed the engine keeps. ``python -m benchmarks.noop_ceiling``
    compares the no-op ceiling of this checkout with another revision's.
``predict (pointwise)`` / ``model loop (pointwise)``
    the per-pixel path of the gap-filling job: an MLP on every pixel vs the same MLP
    on a pre-stacked ``(pixels, features)`` array in batches of the same size.

Runs alternate (predict, loop, predict, ...) and the ratio is the median of the
per-round ratios, so load from other processes hits both sides. The ratio
``loop seconds / predict seconds`` is the share of the model's own speed that
predict keeps (target >= 0.9). Run ``python benchmarks/bench_predict.py [tiny|default|large]``;
JSON goes to ``benchmarks/results/``.
"""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks._common import cli, machine, paired, print_ratios
from engine.kernels.windows import grid_padding
from engine.ml.predict import predict
from engine.ml.registry import build_architecture
from engine.testing.cubes import synthetic_cube

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": (2, 128, 128), "hidden": 8, "layers": 2, "tile": 32, "batch": 16,
             "pixels": (2, 128, 128), "repeats": 1},
    "default": {"shape": (8, 256, 256), "hidden": 32, "layers": 3, "tile": 64, "batch": 32,
                "pixels": (8, 512, 512), "repeats": 15},
    "large": {"shape": (8, 512, 512), "hidden": 64, "layers": 3, "tile": 64, "batch": 32,
              "pixels": (16, 1024, 1024), "repeats": 3},
}
VARIABLES = ("t2m", "lst", "ndvi")


class FirstChannel(nn.Module):
    """A model that computes nothing (its first input channel): predict's own cost."""

    def forward(self, x):
        return x[:, :1]


def _against(run_predict, loop, repeats: int) -> tuple[float, float, float, float]:
    """Time predict against the loop run in a worker thread, as predict's forward passes
    are (in this process the same loop ran ~1.5x slower on the main thread than on any
    other thread); the main-thread loop is timed too, for the record."""
    with ThreadPoolExecutor(1) as pool:
        def threaded() -> None:
            pool.submit(loop).result()

        threaded()
        loop()
        t_predict, t_loop, ratio = paired(run_predict, threaded, repeats)
    t_main = statistics.median(paired(loop, loop, max(1, repeats // 2))[:2])
    return t_predict, t_loop, ratio, t_main


def _bare_floor(ds, tile: int, stride: int):
    """The same per-tile memory work as predict with a no-op model, without the engine,
    on images already padded in memory: the windows copied into one array, the first
    channel added, weighted, into an accumulator by one fused multiply-add per grid
    offset (``engine.ml.device.fold_add``, as predict does per batch), the core divided
    into a fresh array. No dask, no gather from chunks, no batches, no model plumbing:
    the floor the engine's own cost is held to."""
    from engine.kernels.windows import gaussian_weights, overlap_add, window_view
    from engine.ml.device import fold_add

    h, w = ds.sizes["lat"], ds.sizes["lon"]
    ph, pw = grid_padding(h, tile, stride), grid_padding(w, tile, stride)
    cube = np.stack([ds[v].values for v in VARIABLES], axis=1)
    images = [np.pad(x, ((0, 0), (ph.before, ph.after), (pw.before, pw.after)),
                     mode="reflect") for x in cube]
    weights = gaussian_weights((tile, tile))
    n0, n1 = ph.windows, pw.windows
    cut = np.empty((n0, n1, len(VARIABLES), tile, tile), np.float32)
    acc = np.empty((1, *images[0].shape[1:]), np.float32)
    wsum = np.zeros(images[0].shape[1:], np.float32)
    overlap_add(wsum, np.broadcast_to(weights, (n0, n1, tile, tile)), (stride, stride))
    core = (slice(ph.before, ph.before + h), slice(pw.before, pw.before + w))
    cut_t, acc_t = torch.from_numpy(cut), torch.from_numpy(acc)
    w_t = torch.from_numpy(weights.copy())

    def loop() -> list[np.ndarray]:
        out = []
        for img in images:
            win = window_view(img, (1, 2), (tile, tile), (stride, stride))
            cut[...] = np.moveaxis(win, 0, 2)
            acc[...] = 0
            fold_add(acc_t, cut_t[:, :, :1].movedim(2, 0), (stride, stride), w_t)
            out.append(np.divide(acc[(0, *core)], wsum[core]))
        return out

    return loop


def _bench_tiled(cfg: dict) -> dict[str, Any]:
    t, h, w = cfg["shape"]
    tile, batch, reps = cfg["tile"], cfg["batch"], cfg["repeats"]
    stride = tile // 2
    ds = synthetic_cube({"time": t, "lat": h, "lon": w}, chunks={"time": 1},
                        variables=VARIABLES).persist(scheduler="threads")
    torch.manual_seed(0)
    model = build_architecture("conv_net", in_channels=3, hidden=cfg["hidden"],
                               layers=cfg["layers"], kernel_size=3).eval()
    out = predict(ds, model, tile={"lat": tile, "lon": tile}, overlap=0.5, batch_size=batch)
    out.data.compute()  # warm-up: model load into the process cache, thread pools

    # one chunk per image: predict runs exactly the global grid (no shared halo windows)
    per_image = grid_padding(h, tile, stride).windows * grid_padding(w, tile, stride).windows
    n_tiles = t * per_image
    x = np.random.default_rng(0).random((n_tiles, 3, tile, tile), dtype=np.float32)
    # the same batch shapes as predict: each block (image) is cut into batch_size batches
    # and a remainder -- CPU convolution time per tile depends strongly on the batch size
    batches = [x[i * per_image + b0:i * per_image + min(per_image, b0 + batch)]
               for i in range(t) for b0 in range(0, per_image, batch)]

    def loop() -> None:
        with torch.inference_mode():
            for xb in batches:
                model(torch.from_numpy(xb))

    t_predict, t_loop, ratio, t_main = _against(lambda: out.data.compute(), loop, reps)
    # the engine's own cost per tile (cut, copy, blend, accumulate), on one thread: a
    # model that computes nothing, batches of 256 as on a GPU, on the larger
    # cube of the pointwise case so that per-block graph costs do not dominate
    pt, ph, pw = cfg["pixels"]
    big = synthetic_cube({"time": pt, "lat": ph, "lon": pw}, chunks={"time": 1},
                         variables=VARIABLES).persist(scheduler="threads")
    trivial = predict(big, FirstChannel(), tile={"lat": tile, "lon": tile},
                      overlap=0.5, batch_size=256)
    trivial.data.compute(scheduler="sync")
    floor = _bare_floor(big, tile, stride)
    # both reproduce the first channel (a no-op model, normalised weights)
    for got in (floor(), trivial.values):
        np.testing.assert_allclose(np.asarray(got), big[VARIABLES[0]].values, atol=1e-4)
    t_host, t_floor, floor_ratio = paired(lambda: trivial.data.compute(scheduler="sync"),
                                          floor, max(5, reps))
    big_tiles = (pt * grid_padding(ph, tile, stride).windows
                 * grid_padding(pw, tile, stride).windows)
    return {
        "host_ceiling_tiles_per_s_1thread": big_tiles / t_host,
        "host_floor_tiles_per_s_1thread": big_tiles / t_floor,
        "host_ceiling_vs_floor": floor_ratio,
        "host_ceiling_tiles": big_tiles,
        "cube": {"shape": cfg["shape"], "chunks": [1, h, w], "variables": len(VARIABLES)},
        "model": f"conv_net hidden={cfg['hidden']} layers={cfg['layers']} kernel=3",
        "tile": tile, "stride": stride, "batch_size": batch,
        "tiles_run": n_tiles,
        "predict_s": t_predict, "loop_s": t_loop, "loop_main_thread_s": t_main,
        "predict_tiles_per_s": n_tiles / t_predict, "loop_tiles_per_s": n_tiles / t_loop,
        "output_px_per_s": t * h * w / t_predict,
        "ratio": ratio,
    }


def _bench_pointwise(cfg: dict) -> dict[str, Any]:
    t, h, w = cfg["pixels"]
    reps = cfg["repeats"]
    ds = synthetic_cube({"time": t, "lat": h, "lon": w}, chunks={"time": 1},
                        variables=VARIABLES).persist(scheduler="threads")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 1)).eval()
    batch = 4096
    out = predict(ds, mlp, tile=None, batch_size=batch)
    out.data.compute()
    x = np.stack([ds[v].values.reshape(-1) for v in VARIABLES], axis=1)

    def loop() -> None:
        with torch.inference_mode():
            for b0 in range(0, len(x), batch):
                mlp(torch.from_numpy(x[b0:b0 + batch]))

    t_predict, t_loop, ratio, t_main = _against(lambda: out.data.compute(), loop, reps)
    n = t * h * w
    return {"pixels": n, "batch_size": batch, "model": "MLP 3-64-64-1",
            "predict_s": t_predict, "loop_s": t_loop, "loop_main_thread_s": t_main,
            "predict_px_per_s": n / t_predict,
            "loop_px_per_s": n / t_loop, "ratio": ratio}


def run(size: str = "default") -> dict[str, Any]:
    """Run the benchmark at ``size`` (tiny, default, large); returns the result dict."""
    cfg = SIZES[size]
    # torch's intra-op thread count stays at its default for both sides
    tiled = _bench_tiled(cfg)
    point = _bench_pointwise(cfg)
    return {
        "benchmark": "predict", "size": size, "device": "cpu",
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
        "tiled": tiled, "pointwise": point,
        "ratios": {"tiled": tiled["ratio"], "pointwise": point["ratio"]},
        "targets": {"tiled": 0.9},
    }


def _print(res: dict[str, Any]) -> None:
    t, p = res["tiled"], res["pointwise"]
    print(f"predict benchmark ({res['size']}, CPU, {res['machine']['cpus']} cores)")
    print(f"tiled: cube {t['cube']['shape']} x {t['cube']['variables']} vars, {t['model']}, "
          f"tile {t['tile']} stride {t['stride']}, batch {t['batch_size']}: "
          f"{t['tiles_run']} tiles (the global grid)")
    print(f"{'method':28s} {'seconds':>9s} {'items/s':>12s}")
    print(f"{'predict (tiled)':28s} {t['predict_s']:9.3f} {t['predict_tiles_per_s']:12.1f}")
    print(f"{'model loop (tiled)':28s} {t['loop_s']:9.3f} {t['loop_tiles_per_s']:12.1f}")
    print(f"{'  same loop, main thread':28s} {t['loop_main_thread_s']:9.3f} "
          f"{t['tiles_run'] / t['loop_main_thread_s']:12.1f}")
    print(f"{'predict, no-op model, 1 thread':28s} "
          f"{t['host_ceiling_tiles'] / t['host_ceiling_tiles_per_s_1thread']:9.3f} "
          f"{t['host_ceiling_tiles_per_s_1thread']:12.1f}  "
          "(model computes nothing: the engine's own cost)")
    print(f"{'  bare loop, same memory work':28s} "
          f"{t['host_ceiling_tiles'] / t['host_floor_tiles_per_s_1thread']:9.3f} "
          f"{t['host_floor_tiles_per_s_1thread']:12.1f}  "
          f"(no engine, pre-padded: the engine keeps {t['host_ceiling_vs_floor']:.2f} of it)")
    print(f"{'predict (pointwise)':28s} {p['predict_s']:9.3f} {p['predict_px_per_s']:12.0f}")
    print(f"{'model loop (pointwise)':28s} {p['loop_s']:9.3f} {p['loop_px_per_s']:12.0f}")
    print(f"{'  same loop, main thread':28s} {p['loop_main_thread_s']:9.3f} "
          f"{p['pixels'] / p['loop_main_thread_s']:12.0f}")
    print_ratios(res, lambda k: f"model loop seconds / predict seconds ({k})")


main = cli("predict", run, _print)


if __name__ == "__main__":
    main()
