"""Project the measured throughput and task counts to a global multi-year reprocessing.

``python -m benchmarks.projection [--gpu-tiles-per-s R]`` reads the results committed
under ``benchmarks/results/`` (default size on this machine, and a GPU result where one
exists: ``bench_scaling-*-<tag>.json`` with a measured ``gpu`` row), prints the
projection as Markdown and writes ``results/projection.json``. Every input is either a
measured figure (named with the file it came from) or a published number (named with its
source in ``benchmarks/README.md``); nothing else is assumed.

The archive: 0.083-degree global grid, 8-daily, 20 years: ``2160 x 4320 x 900`` steps,
4 float32 input variables, 1 float32 output variable, inferred with a UNet-sized model on
64x64 tiles at 50 % overlap (stride 32), written through the engine's writer.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from typing import Any

from benchmarks._common import RESULTS

ARCHIVE = {"time": 900, "lat": 2160, "lon": 4320}
V_IN, V_OUT, BYTES = 4, 1, 4
TILE, STRIDE = 64, 32
GPUS = (8, 64, 512)
REGION_MB = 64  # engine.write.region-mb default

#: Published numbers (sources in benchmarks/README.md, "Inputs").
SCHEDULER_TASKS_PER_S = (1_000, 5_000)  # 1 ms .. 200 us per task (dask docs; Rocklin)
SCHEDULER_BYTES_PER_TASK = 1_000         # ~1 kB of scheduler memory per task (Rocklin)
STORE_GB_PER_S = 20.0                    # Zarr on GCS, ~400 cores (Abernathey et al.)
PROCESS_GB_PER_S = 1.6                   # per-process object-store ceiling (derived, §6)
S3_GET_PER_S, S3_PUT_PER_S = 5_500, 3_500  # per prefix (AWS S3 performance guidelines)
#: H100 NVL, ResNet-50 AMP, 224x224x3, GPU-resident batches (calebrob6/throughput-bench)
H100_RESNET50_IMG_PER_S = 9_100
RESNET50_GFLOP = 8.2                     # 4.1 GMAC per 224x224 image

#: Chunkings of the archive compared: the one the task counts were measured with, and the
#: engine's work unit (whole steps of one variable, ~37 MB; 4 steps ~150 MB).
CHUNKINGS = {
    "512x512 px, 4 steps (4 MB, as measured)": (4, 512, 512),
    "full grid, 1 step (37 MB)": (1, 2160, 4320),
    "full grid, 4 steps (149 MB, engine work unit)": (4, 2160, 4320),
}


def _load(pattern: str) -> dict[str, Any] | None:
    paths = sorted(glob.glob(os.path.join(RESULTS, pattern)))
    return json.load(open(paths[0])) if paths else None


def _unet_gflop_per_tile() -> float:
    """FLOPs of the UNet the GPU row runs, per 64x64 tile (torch's flop counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engine.ml.registry import build_architecture

    model = build_architecture("unet_small", in_channels=3, out_channels=1, base=16, depth=2)
    x = torch.zeros(8, 3, TILE, TILE)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 8 / 1e9


def inputs(gpu_tiles_per_s: float | None = None) -> dict[str, Any]:
    """Every figure the projection uses, with where it came from."""
    scaling = _load("bench_scaling-default.json")
    write = _load("bench_write-default.json")
    if scaling is None or write is None:
        raise SystemExit("run `python -m benchmarks scaling write` first (default size)")
    pred = _load("bench_predict-default.json")
    if pred is None or "host_ceiling_tiles_per_s_1thread" not in pred["tiled"]:
        raise SystemExit("run `python -m benchmarks predict` first (default size)")
    cpu1 = next(r for r in scaling["rows"] if r["workers"] == 1)
    pw = next(g for g in write["graphs"] if g["method"] == "predict -> write"
              and g["scheduler"] == "threads")
    pw_cluster = next((g for g in write["graphs"] if g["method"] == "predict -> write"
                       and g["scheduler"] == "2 procs"), None)
    out: dict[str, Any] = {
        "cpu_tiles_per_s_per_worker": cpu1["tiles_per_s_per_worker"],
        "cpu_model": scaling["model"]["cpu"] if isinstance(scaling["model"], dict)
        else scaling["model"],
        "cpu_source": "bench_scaling-default.json, 1 CPU worker",
        "tasks_per_output_chunk": pw["tasks_per_chunk"],
        "graph_mb_per_gb": pw["graph_mb_per_gb"],
        "tasks_source": "bench_write-default.json, predict -> write (threads: the dask graph)",
        "cluster_tasks_per_region": pw_cluster["tasks_per_unit"] if pw_cluster else None,
        "cluster_source": "bench_write-default.json, predict -> write (2 procs: the scheduler)",
        "unet_gflop_per_tile": _unet_gflop_per_tile(),
        # cut + copy + blend per tile in the worker process, one thread (a dask-cuda
        # worker runs one thread per GPU by default)
        "host_tiles_per_s": pred["tiled"]["host_ceiling_tiles_per_s_1thread"],
        "host_source": ("bench_predict-default.json, predict of a model that computes "
                        "nothing, one thread"),
    }
    measured = None
    end_to_end = False
    # the GPU benchmark's predict -> write rate of the projection's UNet (base 16, depth 2)
    # in bf16: measured end to end on a dask-cuda worker, host work included
    for path in sorted(glob.glob(os.path.join(RESULTS, "bench_gpu-default-*.json"))):
        res = json.load(open(path))
        row = next((r for r in res.get("rows", []) if r["model"] == "unet_b16_d2"
                    and r["precision"] == "bf16"), None)
        if row:
            gpu_name = ", ".join(res.get("gpus", [])) or "GPU"
            measured = (row["predict_write_tiles_per_s"],
                        f"{os.path.basename(path)}, predict -> write, {gpu_name}")
            end_to_end = True
            break
    out["end_to_end"] = end_to_end and not gpu_tiles_per_s
    for path in ([] if measured else
                 sorted(glob.glob(os.path.join(RESULTS, "bench_scaling-*-*.json")))):
        res = json.load(open(path))
        gpu = res.get("gpu") or {}
        if gpu.get("tiles_per_s"):
            measured = (gpu["tiles_per_s"], os.path.basename(path))
            break
    if gpu_tiles_per_s:
        out["gpu_tiles_per_s"], out["gpu_source"] = gpu_tiles_per_s, "given on the command line"
    elif measured:
        out["gpu_tiles_per_s"], out["gpu_source"] = measured[0], f"measured: {measured[1]}"
    else:
        sustained = H100_RESNET50_IMG_PER_S * RESNET50_GFLOP  # GFLOP/s a CNN sustains
        out["gpu_tiles_per_s"] = sustained / out["unet_gflop_per_tile"]
        out["gpu_source"] = ("ESTIMATE, no GPU measured: FLOP parity with ResNet-50 AMP on an "
                             f"H100 NVL ({sustained / 1e3:.0f} TFLOP/s sustained) / "
                             f"{out['unet_gflop_per_tile']:.3f} GFLOP per tile")
    # a measured end-to-end rate already includes the worker's host work
    out["effective_tiles_per_s"] = (out["gpu_tiles_per_s"] if end_to_end and not gpu_tiles_per_s
                                    else min(out["gpu_tiles_per_s"], out["host_tiles_per_s"]))
    return out


def project(inp: dict[str, Any]) -> dict[str, Any]:
    """Wall time, tasks, scheduler load and store requests for each GPU count."""
    t, h, w = ARCHIVE["time"], ARCHIVE["lat"], ARCHIVE["lon"]
    windows = (math.ceil((h - TILE) / STRIDE) + 1) * (math.ceil((w - TILE) / STRIDE) + 1)
    tiles = windows * t
    read_gb = t * h * w * V_IN * BYTES / 1e9
    write_gb = t * h * w * V_OUT * BYTES / 1e9
    rows = []
    for n in GPUS:
        compute_s = tiles / (n * inp["effective_tiles_per_s"])
        read_ceiling = min(n * PROCESS_GB_PER_S, STORE_GB_PER_S)
        io_s = read_gb / read_ceiling
        wall = max(compute_s, io_s)
        row = {"gpus": n, "compute_s": compute_s, "read_s": io_s, "wall_s": wall,
               "bound": ("GPU" if inp["gpu_tiles_per_s"] <= inp["host_tiles_per_s"]
                         else "host-side tiling per worker") if compute_s >= io_s else
               ("object-store bandwidth" if n * PROCESS_GB_PER_S > STORE_GB_PER_S
                else "per-worker read bandwidth"),
               "read_gb_per_s_needed": read_gb / compute_s,
               "cpu_workers_equivalent": inp["effective_tiles_per_s"] * n
               / inp["cpu_tiles_per_s_per_worker"],
               "chunkings": {}}
        for name, (ct, ch, cw) in CHUNKINGS.items():
            n_out_chunks = math.ceil(t / ct) * math.ceil(h / ch) * math.ceil(w / cw)
            # a dask graph of the pipeline: tasks scale with chunks (per chunk the same
            # overlap/predict/write structure); the engine on a cluster: one task per region
            tasks = inp["tasks_per_output_chunk"] * n_out_chunks
            # regions grow by whole chunks up to REGION_MB (engine.write.region-mb)
            per_region = max(1, int(REGION_MB * 2**20 // (ct * ch * cw * BYTES)))
            n_regions = math.ceil(n_out_chunks / per_region)
            engine_tasks = n_regions * (inp["cluster_tasks_per_region"] or 1.0)
            gets = n_out_chunks * V_IN
            puts = n_out_chunks * V_OUT + n_regions  # chunks + one manifest per region
            row["chunkings"][name] = {
                "output_chunks": n_out_chunks, "tasks": tasks,
                "tasks_per_s": tasks / wall,
                "scheduler_share": tasks / wall / SCHEDULER_TASKS_PER_S[0],
                "graph_mb_if_one_submission": tasks * SCHEDULER_BYTES_PER_TASK / 1e6,
                "engine_tasks": engine_tasks, "engine_tasks_per_s": engine_tasks / wall,
                "get_per_s": gets / wall, "put_per_s": puts / wall,
            }
        rows.append(row)
    return {"archive": ARCHIVE, "tiles": tiles, "read_gb": read_gb, "write_gb": write_gb,
            "inputs": inp, "rows": rows}


def _fmt_s(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def markdown(p: dict[str, Any]) -> str:
    inp = p["inputs"]
    lines = [
        f"Archive {p['archive']['time']} x {p['archive']['lat']} x {p['archive']['lon']}: "
        f"{p['tiles']:,} tiles of {TILE}x{TILE} at stride {STRIDE}; {p['read_gb']:,.0f} GB "
        f"read ({V_IN} variables), {p['write_gb']:,.0f} GB written.",
        "",
        f"- GPU model rate: {inp['gpu_tiles_per_s']:,.0f} tiles/s per GPU ({inp['gpu_source']}).",
        f"- Host-side ceiling: {inp['host_tiles_per_s']:,.0f} tiles/s per worker process "
        f"({inp['host_source']}).",
        f"- Rate used: {inp['effective_tiles_per_s']:,.0f} tiles/s per GPU worker "
        + ("(the measured predict -> write rate: host work included)."
           if inp.get("end_to_end") else "(the lower)."),
        f"- CPU rate: {inp['cpu_tiles_per_s_per_worker']:,.0f} tiles/s per 1-thread worker "
        f"({inp['cpu_model']}; {inp['cpu_source']}).",
        f"- Tasks: {inp['tasks_per_output_chunk']:.1f} per output chunk in the dask graph "
        f"({inp['tasks_source']}); {inp['cluster_tasks_per_region'] or 1:.0f} per "
        f"{REGION_MB} MB region on the scheduler ({inp['cluster_source']}).",
        "",
        "| GPUs | compute time | read time | wall | bound by | read GB/s needed at compute speed |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for r in p["rows"]:
        lines.append(f"| {r['gpus']} | {_fmt_s(r['compute_s'])} | {_fmt_s(r['read_s'])} | "
                     f"{_fmt_s(r['wall_s'])} | {r['bound']} | "
                     f"{r['read_gb_per_s_needed']:,.1f} |")
    lines += ["", "| GPUs | chunking | dask graph tasks | tasks/s | engine tasks | tasks/s "
              "| GET/s | PUT/s |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in p["rows"]:
        for name, c in r["chunkings"].items():
            lines.append(f"| {r['gpus']} | {name} | {c['tasks']:,.0f} | "
                         f"{c['tasks_per_s']:,.0f} | {c['engine_tasks']:,.0f} | "
                         f"{c['engine_tasks_per_s']:,.1f} | "
                         f"{c['get_per_s']:,.0f} | {c['put_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.projection")
    ap.add_argument("--gpu-tiles-per-s", type=float, default=None,
                    help="per-GPU rate to project with (default: measured, else estimated)")
    args = ap.parse_args(argv)
    p = project(inputs(args.gpu_tiles_per_s))
    print(markdown(p))
    path = os.path.join(RESULTS, "projection.json")
    with open(path, "w") as f:
        json.dump(p, f, indent=2)
    print(f"\nwrote {path}")
    return p


if __name__ == "__main__":
    main()
