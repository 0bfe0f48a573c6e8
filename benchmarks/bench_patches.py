"""Patch-generation throughput: iter_patches vs xbatcher, a per-chunk reference, memcpy.

All read the same cube (chunks held in memory, so the figures measure patch cutting and
scheduling, not storage) and produce the same float32 bytes:

``iter_patches``
    one epoch with the scheduler it uses without a client (local thread pool).
``per-chunk reference``
    a hand-written loop: one ``dask.compute`` per chunk (sync scheduler, graph built
    once), reshape into ``(n, variable, 64, 64)`` patches with one copy.
``xbatcher (dask)``
    ``BatchGenerator(input_dims={"time": 1, "lat": 64, "lon": 64})`` on the same
    dask-backed cube, one item per patch, converted to a numpy array. It is slow, so it
    is timed on a subset of patches and extrapolated per patch (stated in the output).
``xbatcher (numpy)``
    the same generator on the cube loaded into memory as numpy (xbatcher's fast case).
``memcpy``
    ``np.copyto`` of the same number of bytes into a warmed buffer (the ceiling).

Peak memory is the resident-set growth of this process while each method runs.
Run ``python -m benchmarks.bench_patches [tiny|default|large]``; JSON goes to
``benchmarks/results/``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import dask
import numpy as np

from benchmarks._common import PeakRSS, cli, machine, print_ratios
from engine.ops.patches import iter_patches
from engine.testing.cubes import synthetic_cube

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": (2, 256, 256), "chunks": (1, 128, 128), "patch": 32, "xb_patches": 20,
             "repeats": 1},
    "default": {"shape": (16, 1024, 1024), "chunks": (4, 512, 512), "patch": 64,
                "xb_patches": 200, "repeats": 11},
    "large": {"shape": (64, 1024, 1024), "chunks": (8, 512, 512), "patch": 64,
              "xb_patches": 300, "repeats": 3},
}
VARIABLES = ("t2m", "lst", "ndvi")


def _cube(cfg: dict) -> Any:
    t, h, w = cfg["shape"]
    ct, ch, cw = cfg["chunks"]
    ds = synthetic_cube({"time": t, "lat": h, "lon": w}, chunks={"time": ct, "lat": ch, "lon": cw},
                        variables=VARIABLES)
    return ds.persist(scheduler="threads")  # chunks in memory: measure cutting, not I/O


def _timed(fn, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _bench_iter_patches(ds, p: int) -> int:
    n = 0
    for b in iter_patches(ds, size={"lat": p, "lon": p}, batch_size=256):
        n += len(b)
    return n


def _bench_reference(ds, p: int) -> int:
    blocks = [ds[v].data.to_delayed() for v in VARIABLES]
    n = 0
    for idx in np.ndindex(blocks[0].shape):
        chunks = dask.compute(*[b[idx] for b in blocks], scheduler="sync")
        t, h, w = chunks[0].shape
        out = np.empty((t, h // p, w // p, len(chunks), p, p), np.float32)
        for v, c in enumerate(chunks):
            out[:, :, :, v] = c[:, :h // p * p, :w // p * p].reshape(
                t, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4)
        n += t * (h // p) * (w // p)
    return n


def _bench_xbatcher(ds, p: int, n_patches: int) -> float:
    import xbatcher

    gen = xbatcher.BatchGenerator(ds[list(VARIABLES)], input_dims={"time": 1, "lat": p, "lon": p})
    first = np.stack([gen[0][v].values for v in VARIABLES], axis=0)  # same bytes as ours
    np.testing.assert_array_equal(first[:, 0], np.stack(
        [ds[v].values[0, :p, :p] for v in VARIABLES]))
    t0 = time.perf_counter()
    for i in range(n_patches):
        item = gen[i]
        arr = np.stack([item[v].values for v in VARIABLES], axis=0)
        assert arr.shape[-2:] == (p, p)
    return (time.perf_counter() - t0) / n_patches


def _bench_memcpy(nbytes: int, repeats: int) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    t, _ = _timed(lambda: np.copyto(dst, src), max(3, repeats))
    return t


def run(size: str = "default") -> dict[str, Any]:
    """Run the benchmark at ``size`` (tiny, default, large); returns the result dict."""
    cfg = SIZES[size]
    p, reps = cfg["patch"], cfg["repeats"]
    ds = _cube(cfg)
    t, h, w = cfg["shape"]
    n_expected = t * (h // p) * (w // p)
    nbytes = n_expected * len(VARIABLES) * p * p * 4
    n_ours = _bench_iter_patches(ds, p)  # warm-up: graph materialisation, page faults
    n_ref = _bench_reference(ds, p)
    assert n_ours == n_ref == n_expected, (n_ours, n_ref, n_expected)
    # alternate the two so that load from other processes hits both
    t_ours_all, t_ref_all = [], []
    peak = {}
    for i in range(reps):
        with PeakRSS() as m_ours:
            t_ours_all.append(_timed(lambda: _bench_iter_patches(ds, p), 1)[0])
        with PeakRSS() as m_ref:
            t_ref_all.append(_timed(lambda: _bench_reference(ds, p), 1)[0])
        if i == 0:
            peak["iter_patches"], peak["reference"] = m_ours.delta_mb, m_ref.delta_mb
    t_ours, t_ref = statistics.median(t_ours_all), statistics.median(t_ref_all)
    ratio_ref = statistics.median(r / o for o, r in zip(t_ours_all, t_ref_all, strict=True))
    with PeakRSS() as m_xb:
        t_xb = _bench_xbatcher(ds, p, cfg["xb_patches"]) * n_expected
    in_memory = ds.compute()  # numpy-backed: xbatcher's fastest case
    with PeakRSS() as m_xbn:
        t_xbn = _bench_xbatcher(in_memory, p, cfg["xb_patches"]) * n_expected
    del in_memory
    t_copy = _bench_memcpy(nbytes, reps)

    def row(name: str, seconds: float, peak_mb: float | None, note: str = "") -> dict[str, Any]:
        return {"name": name, "seconds": seconds, "mb_per_s": nbytes / seconds / 1e6,
                "patches_per_s": n_expected / seconds, "peak_mb": peak_mb, "note": note}

    xb_note = f"timed on {cfg['xb_patches']} patches, extrapolated to {n_expected}"
    rows = [
        row("iter_patches", t_ours, peak["iter_patches"], f"local thread pool, median of {reps}"),
        row("per-chunk reference", t_ref, peak["reference"], "one compute per chunk + reshape"),
        row("xbatcher 0.4 (dask-backed)", t_xb, m_xb.delta_mb, xb_note),
        row("xbatcher 0.4 (numpy-backed)", t_xbn, m_xbn.delta_mb, xb_note + ", cube in RAM"),
        row("np.copyto (same bytes)", t_copy, None, "memory-bandwidth ceiling"),
    ]
    return {
        "benchmark": "patches",
        "size": size,
        "cube": {"shape": cfg["shape"], "chunks": cfg["chunks"], "variables": len(VARIABLES),
                 "dtype": "float32", "patch": [p, p], "n_patches": n_expected,
                 "bytes": nbytes},
        "machine": machine(),
        "rows": rows,
        "ratios": {
            "vs_xbatcher": t_xb / t_ours,
            "vs_xbatcher_numpy": t_xbn / t_ours,
            "vs_reference": ratio_ref,
            "vs_memcpy": t_copy / t_ours,
        },
        "targets": {"vs_xbatcher": 100.0, "vs_reference": 1.0},
    }


def _print(res: dict[str, Any]) -> None:
    c = res["cube"]
    print(f"patches benchmark ({res['size']}): cube {c['shape']} x {c['variables']} vars "
          f"float32, chunks {c['chunks']}, patches {c['patch']}, {c['n_patches']} patches, "
          f"{c['bytes'] / 1e6:.0f} MB")
    print(f"{'method':32s} {'seconds':>9s} {'MB/s':>10s} {'patches/s':>12s} {'peak MB':>8s}  note")
    for r in res["rows"]:
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(f"{r['name']:32s} {r['seconds']:9.3f} {r['mb_per_s']:10.0f} "
              f"{r['patches_per_s']:12.0f} {peak:>8s}  {r['note']}")
    print_ratios(res, lambda k: f"iter_patches {k}")


main = cli("patches", run, _print)


if __name__ == "__main__":
    main()
