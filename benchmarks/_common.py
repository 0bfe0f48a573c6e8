"""Shared pieces of the benchmarks: machine description, paired timing, peak memory,
JSON output and the command-line entry point every ``bench_*.py`` module uses.

Every benchmark module defines ``SIZES`` (``tiny``, ``default``, ``large``), ``run(size)``
returning a JSON-able dict with ``benchmark``, ``size``, ``machine``, ``ratios`` and
``targets``, and ``_print(res)``; ``main = cli("name", run, _print)`` gives it a command
line (``python -m benchmarks.bench_x [size] [--tag TAG]``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

__all__ = ["machine", "paired", "timed", "PeakRSS", "save", "cli", "print_ratios", "na",
           "RESULTS"]

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

_LIBRARIES = ("numpy", "dask", "distributed", "xarray", "zarr", "torch", "xbatcher",
              "ml4xcube", "dask-cuda", "cupy-cuda12x", "s3fs", "fsspec")


def _gpus() -> list[str]:
    """GPU names from ``nvidia-smi`` (no CUDA initialisation in this process)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores, memory, GPUs, load and library versions."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f
                             if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu_model = platform.processor()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": _gpus(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": versions,
    }


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median seconds over ``repeats`` calls, all the times, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def na(x: Any, fmt: str) -> str:
    """``format(x, fmt)``, or ``"n/a"`` for a figure that was not measured (None)."""
    return "n/a" if x is None else format(x, fmt)


def paired(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, float, float]:
    """Interleave ``a`` and ``b`` ``repeats`` times: median seconds of each and the median
    of the per-round ratios ``t_b / t_a`` (robust to load from other processes)."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    ratio = statistics.median(y / x for x, y in zip(ta, tb, strict=True))
    return statistics.median(ta), statistics.median(tb), ratio


class PeakRSS:
    """Peak resident memory of this process and its children (worker processes of a
    LocalCluster included) while the block runs, sampled every ``interval`` seconds
    (walking the process tree costs CPU: much below 20 ms it slows what it measures).

    ``peak_mb`` is the peak of the sum; ``delta_mb`` the peak minus the sum on entry.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = 0.0
        self.start_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss() / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start_mb = self.peak_mb = self._rss() / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss() / 2**20)

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb


def print_ratios(res: dict[str, Any], label: Callable[[str], str] = str) -> None:
    """One line per ratio of ``res``: ``label(name): value`` and its target, if any."""
    for name, value in res["ratios"].items():
        target = res.get("targets", {}).get(name)
        print(f"{label(name)}: {value:.2f}x" + (f" (target >= {target}x)" if target else ""))


def save(res: dict[str, Any], tag: str | None = None) -> str:
    """Write ``res`` to ``benchmarks/results/bench_<name>-<size>[-<tag>].json``."""
    os.makedirs(RESULTS, exist_ok=True)
    name = f"bench_{res['benchmark']}-{res['size']}" + (f"-{tag}" if tag else "")
    path = os.path.join(RESULTS, name + ".json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2, default=str)
    return path


def cli(name: str, run: Callable[[str], dict[str, Any]],
        show: Callable[[dict[str, Any]], None]) -> Callable[[list[str] | None], dict[str, Any]]:
    """The ``main(argv)`` of a benchmark module: run, print, write JSON."""

    def main(argv: list[str] | None = None) -> dict[str, Any]:
        p = argparse.ArgumentParser(prog=f"python -m benchmarks.bench_{name}")
        p.add_argument("size", nargs="?", default="default", choices=["tiny", "default", "large"])
        p.add_argument("--tag", default=None,
                       help="suffix of the results file, e.g. the machine (h100)")
        args = p.parse_args(argv)
        res = run(args.size)
        show(res)
        print(f"wrote {save(res, args.tag)}")
        return res

    return main
