"""Throughput counters: what each worker (and each GPU) did during a run.

The engine's task functions -- patch units, predict blocks, writer regions -- call
:func:`record` with what they processed. Counters live in the process that ran the task,
keyed by the dask worker that ran it (``"local"`` under the threaded scheduler), so they
cost one lock per task and no communication. A :class:`Meter` on the client resets them
at the start of a phase and gathers them at its end with ``client.run``; its
:meth:`Meter.summary` turns them into rates over the phase's wall time: patches/s,
output pixels/s, MB/s read and written, per worker and per GPU.

Counts are exact for the tasks that finished; a task retried after a worker died is
counted on the worker that finished it (the dead worker's counters die with it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["record", "snapshot", "reset", "watch_gpu", "Meter", "FIELDS"]

#: Per-kind counters: ``tasks``, ``items`` (patches, tiles or regions), ``pixels``
#: (output cells), ``bytes_read`` (decoded input), ``bytes_written``, ``seconds`` (busy).
FIELDS = ("tasks", "items", "pixels", "bytes_read", "bytes_written", "seconds")

_LOCK = threading.Lock()
_COUNTS: dict[str, dict[str, dict[str, float]]] = {}   # worker -> kind -> field -> value
_GPUS: dict[str, set[str]] = {}                        # worker -> GPU names used
_WATCHED: dict[str, Any] = {}                          # GPU name -> NVML handle
_GPU_SAMPLES: dict[str, list[tuple[float, float]]] = {}  # GPU name -> (time, busy %)
_SAMPLER: list[threading.Thread] = []
_PHASE_T0 = [time.monotonic()]
_SAMPLE_S = 0.1


def _worker_name() -> str:
    if "distributed" in sys.modules:
        from distributed import get_worker

        try:
            return str(get_worker().address)
        except ValueError:
            pass
    return "local"


def record(kind: str, *, items: int = 0, pixels: int = 0, bytes_read: int = 0,
           bytes_written: int = 0, seconds: float = 0.0, gpu: str | None = None) -> None:
    """Add one finished task of ``kind`` ("patches", "predict", "write") to this
    worker's counters; ``gpu`` names the device it ran on, if any."""
    worker = _worker_name()
    with _LOCK:
        kinds = _COUNTS.setdefault(worker, {})
        c = kinds.setdefault(kind, dict.fromkeys(FIELDS, 0))
        c["tasks"] += 1
        c["items"] += items
        c["pixels"] += pixels
        c["bytes_read"] += bytes_read
        c["bytes_written"] += bytes_written
        c["seconds"] += seconds
        if gpu:
            _GPUS.setdefault(worker, set()).add(gpu)


def _nvml_handle(uuid: str | None) -> Any:
    """NVML handle of the GPU with this UUID (NVML numbers GPUs without regard to
    CUDA_VISIBLE_DEVICES, so the UUID is the only safe key); None without pynvml."""
    if not uuid:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        text = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        return pynvml.nvmlDeviceGetHandleByUUID(text)
    except Exception:
        return None


def _sample_forever() -> None:
    import pynvml

    while True:
        now = time.monotonic()
        with _LOCK:
            watched = list(_WATCHED.items())
        for name, handle in watched:
            try:
                util = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:
                continue
            with _LOCK:
                rows = _GPU_SAMPLES.setdefault(name, [])
                rows.append((now, util))
                if len(rows) > 100_000:  # about 3 hours at 10 Hz
                    del rows[:50_000]
        time.sleep(_SAMPLE_S)


def watch_gpu(name: str, uuid: str | None) -> None:
    """Sample the busy share of GPU ``name`` (NVML, 10 Hz, in a daemon thread of this
    process) from now on, for its row in the throughput table. Called by the inference
    task functions when they first use a CUDA device; a no-op without NVML."""
    with _LOCK:
        if name in _WATCHED:
            return
    handle = _nvml_handle(uuid)
    if handle is None:
        return
    with _LOCK:
        _WATCHED[name] = handle
        if not _SAMPLER:
            t = threading.Thread(target=_sample_forever, name="engine-nvml", daemon=True)
            _SAMPLER.append(t)
            t.start()


def _gpu_busy() -> dict[str, dict[str, float]]:
    """Mean busy percent of each watched GPU since the phase began (lock held)."""
    out = {}
    for name, rows in _GPU_SAMPLES.items():
        vals = [u for t, u in rows if t >= _PHASE_T0[0]]
        if vals:
            out[name] = {"busy_pct": sum(vals) / len(vals), "samples": len(vals)}
    return out


def snapshot() -> dict[str, Any]:
    """The counters of every worker that ran tasks in this process, with the busy share
    of the GPUs they used."""
    with _LOCK:
        busy = _gpu_busy()
        return {
            w: {"host": socket.gethostname(), "pid": os.getpid(),
                "gpus": sorted(_GPUS.get(w, ())),
                "gpu_busy": {g: busy[g] for g in _GPUS.get(w, ()) if g in busy},
                "kinds": {k: dict(v) for k, v in kinds.items()}}
            for w, kinds in _COUNTS.items()
        }


def reset() -> None:
    """Zero this process's counters; GPU busy shares count from now."""
    with _LOCK:
        _COUNTS.clear()
        _GPUS.clear()
        _PHASE_T0[0] = time.monotonic()


class Meter:
    """Phases of a run, each with its wall time and the counters of every worker.

    Parameters
    ----------
    client
        Distributed client whose workers run the tasks, or None for this process only.

    Examples
    --------
    >>> m = Meter()
    >>> with m.phase("demo"):
    ...     record("patches", items=10, bytes_read=4000)
    >>> m.summary()["phases"]["demo"]["total"]["patches"]
    10
    """

    def __init__(self, client: Any = None) -> None:
        self.client = client
        self.phases: dict[str, dict[str, Any]] = {}
        self._open: tuple[str, float] | None = None

    def _everywhere(self, fn: Any) -> list[dict[str, Any]]:
        out = [fn()]
        if self.client is not None:
            with contextlib.suppress(Exception):  # a dead worker must not break the run
                out.extend(self.client.run(fn).values())
        return out

    def _threads(self) -> dict[str, int]:
        if self.client is None:
            return {}
        try:
            return {str(k): int(v) for k, v in self.client.nthreads().items()}
        except Exception:
            return {}

    def begin(self, name: str) -> None:
        """Start phase ``name``: reset the counters everywhere and start its clock."""
        if self._open is not None:
            self.end()
        self._everywhere(reset)
        self._open = (name, time.perf_counter())

    def end(self) -> None:
        """End the open phase: gather every worker's counters with the phase's wall time."""
        if self._open is None:
            return
        name, t0 = self._open
        self._open = None
        wall = time.perf_counter() - t0
        workers: dict[str, Any] = {}
        for snap in self._everywhere(snapshot):
            workers.update(snap or {})  # in-process workers report the same dict
        self.phases[name] = {"wall_s": wall, "workers": workers, "threads": self._threads()}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """``begin(name)``, run the block, ``end()``."""
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def summary(self) -> dict[str, Any]:
        """Rates per phase: totals, per worker and per GPU (JSON-able)."""
        return {"phases": {name: _phase_summary(p) for name, p in self.phases.items()}}


def _rates(kinds: dict[str, dict[str, float]], wall: float) -> dict[str, Any]:
    def tot(field: str, kind: str | None = None) -> float:
        return sum(c[field] for k, c in kinds.items() if kind is None or k == kind)

    w = wall or float("nan")
    patches = int(tot("items", "patches"))
    pixels = int(tot("pixels", "predict"))
    read, written = tot("bytes_read"), tot("bytes_written")
    return {
        "tasks": int(tot("tasks")),
        "patches": patches,
        "patches_per_s": patches / w,
        "tiles_or_points": int(tot("items", "predict")),
        "output_pixels": pixels,
        "output_pixels_per_s": pixels / w,
        "mb_read": read / 1e6,
        "mb_per_s_read": read / 1e6 / w,
        "mb_written": written / 1e6,
        "mb_per_s_written": written / 1e6 / w,
        "busy_s": tot("seconds"),
    }


def _add(into: dict[str, dict[str, float]], kinds: dict[str, dict[str, float]]) -> None:
    for kind, c in kinds.items():
        acc = into.setdefault(kind, dict.fromkeys(FIELDS, 0))
        for f in FIELDS:
            acc[f] += c[f]


def _phase_summary(p: dict[str, Any]) -> dict[str, Any]:
    wall = p["wall_s"]
    rows = {}
    merged: dict[str, dict[str, float]] = {}
    gpus: dict[str, dict[str, dict[str, float]]] = {}
    busy: dict[str, float] = {}
    for name, w in sorted(p["workers"].items()):
        r = _rates(w["kinds"], wall)
        nthreads = p["threads"].get(name)
        if nthreads:
            r["busy_share"] = r["busy_s"] / (wall * nthreads) if wall else None
        r["gpus"] = w["gpus"]
        r["host"] = w["host"]
        rows[name] = r
        _add(merged, w["kinds"])
        for g in w["gpus"]:  # one GPU per worker (dask-cuda); attribute its counters
            key = f"{w['host']}:{name}:{g}"
            _add(gpus.setdefault(key, {}), w["kinds"])
            if g in w.get("gpu_busy", {}):
                busy[key] = w["gpu_busy"][g]["busy_pct"] / 100
    gpu_rows = {g: _rates(k, wall) for g, k in gpus.items()}
    for g, share in busy.items():  # the GPU's own busy share (NVML), not its threads'
        gpu_rows[g]["busy_share"] = share
    return {
        "wall_s": wall,
        "total": _rates(merged, wall),
        "workers": rows,
        "gpus": gpu_rows,
    }
