"""Run the benchmarks: ``python -m benchmarks [NAME ...] [--size tiny|default|large] [--tag T]``.

Each benchmark compares the engine against a named baseline in the same run, prints its
table and writes JSON to benchmarks/results/. At the end one table lists every ratio
against its target (the peer table), also written to ``results/summary-<size>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from typing import Any

BENCHMARKS = {
    "patches": "benchmarks.bench_patches",
    "predict": "benchmarks.bench_predict",
    "prep": "benchmarks.bench_prep",
    "gapfill": "benchmarks.bench_gapfill",
    "write": "benchmarks.bench_write",
    "scaling": "benchmarks.bench_scaling",
    "gpu": "benchmarks.bench_gpu",
    "archive": "benchmarks.bench_archive",
    "convml": "benchmarks.compare_convml",
}

#: What each ratio compares (engine vs baseline); ratio > 1 means the engine is better.
LABELS = {
    ("patches", "vs_xbatcher"): "iter_patches vs xbatcher 0.4 (dask-backed), patches/s",
    ("patches", "vs_xbatcher_numpy"): "iter_patches vs xbatcher 0.4 (numpy-backed), patches/s",
    ("patches", "vs_reference"): "iter_patches vs per-chunk numpy reference",
    ("patches", "vs_memcpy"): "iter_patches vs memcpy of the same bytes (ceiling)",
    ("predict", "tiled"): "tiled predict vs model loop on pre-cut batches",
    ("predict", "pointwise"): "pointwise predict vs model loop on pre-cut batches",
    ("prep", "prep_speed_vs_ml4xcube"): "split + sample stream vs ml4xcube split + XrDataset, time",
    ("prep", "peak_memory_vs_ml4xcube"): "split + sample stream vs ml4xcube, peak memory",
    ("gapfill", "wall_vs_ml4xcube"): "gap filling (linear) vs ml4xcube sampler+trainer, wall",
    ("gapfill", "rmse_ml4xcube_over_engine"): "gap filling (linear): ml4xcube RMSE / engine RMSE",
    ("gapfill", "wall_vs_ml4xcube_mlp"): "gap filling (MLP) vs ml4xcube sampler+trainer, wall",
    ("gapfill", "rmse_ml4xcube_over_engine_mlp"): "gap filling (MLP): ml4xcube RMSE / engine RMSE",
    ("write", "vs_to_zarr"): "resumable write vs plain to_zarr, threads",
    ("write", "vs_to_zarr_2procs"): "resumable write vs plain to_zarr, 2 worker processes",
    ("scaling", "speedup_2_workers"): "predict -> write, 2 vs 1 worker processes (speedup)",
    ("archive", "cost_linearity"): "apply over the archive, s/year at 1 year / at the longest",
    ("archive", "memory_flatness"): "apply over the archive, peak memory at 1 year / longest",
    ("archive", "cpu_linearity"): "apply over the archive, CPU s/year at 1 year / at the longest",
    ("archive", "scheduler_bound"): "apply over the archive, rolling window / scheduler peak tasks",
}


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ratio of every result: benchmark, comparison, ratio, target, holds."""
    rows = []
    for name, res in results.items():
        for key, value in res.get("ratios", {}).items():
            target = res.get("targets", {}).get(key)
            rows.append({
                "benchmark": name, "ratio_name": key,
                "comparison": LABELS.get((name, key), key.replace("_", " ")),
                "ratio": value, "target": target,
                "holds": None if target is None else bool(value >= target),
            })
    return rows


def print_summary(rows: list[dict[str, Any]], size: str) -> None:
    print(f"\n== summary ({size}): ratio > 1 means the engine is better ==")
    print(f"{'benchmark':10s} {'comparison':62s} {'ratio':>9s} {'target':>7s}  holds")
    for r in rows:
        target = "" if r["target"] is None else f"{r['target']:g}"
        holds = "" if r["holds"] is None else ("yes" if r["holds"] else "NO")
        print(f"{r['benchmark']:10s} {r['comparison'][:62]:62s} {r['ratio']:9.2f} {target:>7s}"
              f"  {holds}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("names", nargs="*", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--size", default="default", choices=["tiny", "default", "large"])
    p.add_argument("--tag", default=None,
                   help="suffix of the results files, e.g. the machine (h100)")
    p.add_argument("--summary-only", action="store_true",
                   help="print the table from the results files already written, run nothing")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    chosen = args.names or list(BENCHMARKS)
    # a subset run still writes the whole table: the others come from their results files
    for name in BENCHMARKS:
        if args.summary_only or name not in chosen:
            from benchmarks._common import RESULTS

            path = os.path.join(RESULTS, f"bench_{name}-{args.size}"
                                + (f"-{args.tag}" if args.tag else "") + ".json")
            if os.path.exists(path):
                results[name] = json.load(open(path))
            continue
        mod = importlib.import_module(BENCHMARKS[name])
        print(f"\n== {name} ==", flush=True)
        extra = ["--tag", args.tag] if args.tag else []
        results[name] = mod.main([args.size, *extra])
    rows = summary_rows(results)
    print_summary(rows, args.size)
    from benchmarks._common import RESULTS, machine

    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"summary-{args.size}" + (f"-{args.tag}" if args.tag else "")
                        + ".json")
    with open(path, "w") as f:
        json.dump({"size": args.size, "seconds": time.perf_counter() - t0,
                   "machine": machine(), "rows": rows}, f, indent=2)
    print(f"wrote {path}")
    failed = [r for r in rows if r["holds"] is False]
    return 1 if failed and args.size != "tiny" else 0


if __name__ == "__main__":
    raise SystemExit(main())
