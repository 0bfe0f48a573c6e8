"""Writing a cube: the engine's resumable writer vs a plain ``to_zarr`` of the same data,
and the dask graph each one submits per GB of output.

Data
    A synthetic float32 cube (:func:`engine.testing.cubes.synthetic_cube`, 2 % NaN) is
    generated once and stored with a plain ``to_zarr`` as the *input store* (untimed).
    The timed writes read it **persisted in memory** (read back and ``persist``-ed), so
    both methods measure writing, not generating or reading. The graph accounting reads
    the input store **lazily** instead (one read task per chunk and variable), which is
    the graph a production job over an archive submits; its data never enters the graph.

Methods timed (interleaved ``engine, to_zarr, engine, ...``, a fresh target directory
each call; the ratio is the median of the per-round ratios, so load from other processes
hits both sides):

``engine write``
    :func:`engine.io.writer.write` into a new local store: plan, template, one work unit
    per *region* (compute the region, ``to_zarr(region=...)``, manifest record),
    consolidate. Regions are ``engine.write.region-mb`` big (the engine's config, 64 MB;
    ``tiny`` lowers it to get several regions out of 3 MB). Without a client the regions
    run in a thread pool, each computed with its own ``compute()``.
``to_zarr``
    ``ds.to_zarr(path, mode="w", consolidated=True, zarr_format=3)``: the same Zarr
    chunks (the dask chunks), the same default codec, the same format; one ``store``
    graph with one write task per chunk and variable.
``engine write, resume``
    the engine write re-run on its own finished store: every region is in the manifest,
    so nothing is computed; what remains is planning, fingerprinting, reading the
    manifest and consolidating.
``engine write, region-mb=N``
    (default/large) the engine write with another region size, for the trade-off.

Both stores are read back and must hold identical values (``np.array_equal`` with
``equal_nan``, so NaN positions count) and equal the source.

The threaded scheduler is always measured; at default and large size the engine write
and ``to_zarr`` are also timed on a 2-process ``LocalCluster`` (1 thread each), both
reading the input store lazily (persisted data would make half of each region travel to
the worker that writes it, which a job reading its input does not do).

Ratio ``vs_to_zarr`` = ``to_zarr`` seconds / ``engine write`` seconds: the share of a
plain write's speed the writer keeps while adding a template, region tasks, a manifest
with checksums and resumability. Target 0.8 (the writer may cost at most 25 % more than
a plain ``to_zarr``). Where the writer pays: each region is materialised in one task (a
copy of up to ``region-mb`` per thread), checksummed (CRC-32) and written by a single
``to_zarr(region=...)`` call, while ``to_zarr`` streams chunk by chunk on every thread;
too few regions per thread leave nothing to overlap (the ``region-mb=N`` rows show the
trade-off). On 2 processes both methods read the input store lazily, as a job does.
At ``tiny`` the fixed cost per region dominates. Measured figures: benchmarks/README.md.

Graph accounting (per method, one untimed run on the lazy input)
    *threaded*: a dask callback records every graph the local scheduler is handed, as it
    runs (after dask's optimisation and fusion; the engine's regions run one at a time
    for this, as the callbacks reach one of several concurrent computes only);
    ``tasks`` is the sum of ``len(graph)`` and ``graph MB`` the sum of
    ``len(pickle.dumps(graph))`` (cloudpickle where pickle fails). The engine hands over
    one graph per region; ``to_zarr`` one graph.
    *2 processes*: a scheduler plugin counts the keys of every ``update-graph`` (the
    tasks the scheduler materialised), and ``graph MB`` is the serialised size of what
    the client sent (the frames of the ``update-graph`` message: an unmaterialised
    expression). The engine submits one graph per region (a rolling window of regions
    in flight), so graph keys shared by all regions (an input array's handle, predict's
    model bytes) are serialised with every region; ``to_zarr`` submits one graph.
    Also measured: ``predict -> write``, a small tiled conv net
    (:func:`engine.ml.predict.predict`, 64x64 tiles, 50 % overlap) over the first time
    steps of the lazy input, written with the engine writer; each of its graphs holds
    the model bytes (``predict.model_kb``) once.
    Figures are per GB of *output* (GB = 2**30 bytes, MB = 2**20), with the work unit
    that produced them (a region for the engine, a chunk of one variable for
    ``to_zarr``) and per output chunk of one variable; they feed the projection of a
    2160 x 4320 x 900 archive (``archive tasks/var``: tasks/GB times its 31.3 GB per
    variable, valid for the same chunk and region sizes).

Run ``python -m benchmarks.bench_write [tiny|default|large] [--tag TAG]``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import dask
import numpy as np
import xarray as xr
from dask.callbacks import Callback
from distributed.diagnostics.plugin import SchedulerPlugin

from benchmarks._common import PeakRSS, cli, machine, paired, print_ratios, timed
from engine.io.writer import WriteResult, write
from engine.ml.predict import serialize_model
from engine.testing.cubes import synthetic_cube

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": (8, 128, 256), "chunks": (2, 64, 128), "variables": 3,
             "region_mb": 0.25, "sweep_mb": [], "repeats": 3, "processes": False,
             "predict_steps": 4},
    "default": {"shape": (48, 512, 1024), "chunks": (4, 512, 512), "variables": 4,
                "region_mb": None, "sweep_mb": [256], "repeats": 3, "processes": True,
                "predict_steps": 8},
    "large": {"shape": (64, 1024, 2048), "chunks": (8, 512, 512), "variables": 4,
              "region_mb": None, "sweep_mb": [256, 1024], "repeats": 3, "processes": True,
              "predict_steps": 16},
}
MiB, GiB = 2**20, 2**30
TILE, OVERLAP = 64, 0.5
#: the archive the graph figures are projected to: time x lat x lon, float32, per variable
ARCHIVE = (900, 2160, 4320)


# ------------------------------------------------------------------- graph accounting


def _pickled_size(graph: dict) -> int:
    try:
        return len(pickle.dumps(graph, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # functions defined in __main__, lambdas: distributed uses cloudpickle
        import cloudpickle

        return len(cloudpickle.dumps(graph, protocol=pickle.HIGHEST_PROTOCOL))


class _LocalGraphs(Callback):
    """Every graph a local (threaded or sync) scheduler is handed while active, in any
    thread: the engine's region pool computes one graph per region."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.tasks = 0
        self.nbytes = 0
        self.submissions = 0

    def _start(self, dsk: Any) -> None:
        graph = dict(dsk)
        size = _pickled_size(graph)
        with self._lock:
            self.tasks += len(graph)
            self.nbytes += size
            self.submissions += 1


class _TaskCounter(SchedulerPlugin):
    """Scheduler plugin: keys of every graph the scheduler receives (in-process scheduler
    of a LocalCluster, so the counts are read directly)."""

    name = "bench-write-task-counter"

    def __init__(self) -> None:
        super().__init__()
        self.tasks = 0
        self.submissions = 0

    def update_graph(self, scheduler: Any, *, tasks: Any = (), **kwargs: Any) -> None:
        self.tasks += len(tasks)
        self.submissions += 1


@contextlib.contextmanager
def _sent_graph_bytes(client: Any) -> Iterator[list[int]]:
    """Serialised size of every ``update-graph`` message the client sends (its frames)."""
    from distributed.utils import nbytes

    sizes: list[int] = []
    send = client._send_to_scheduler

    def spy(msg: Any) -> Any:
        if isinstance(msg, dict) and msg.get("op") == "update-graph":
            ser = msg.get("expr_ser")
            frames = getattr(ser, "frames", None)
            sizes.append(-1 if frames is None else sum(nbytes(f) for f in frames))
        return send(msg)

    client._send_to_scheduler = spy
    try:
        yield sizes
    finally:
        del client._send_to_scheduler  # the class's method again


def _graph_row(method: str, scheduler: str, tasks: int, nbytes: int | None, submissions: int,
               out_bytes: int, unit: str, unit_bytes: float, n_units: int,
               seconds: float) -> dict[str, Any]:
    gb = out_bytes / GiB
    return {
        "method": method, "scheduler": scheduler, "submissions": submissions,
        "tasks": tasks, "graph_mb": None if nbytes is None else nbytes / MiB,
        "output_gb": gb, "tasks_per_gb": tasks / gb,
        "graph_mb_per_gb": None if nbytes is None else nbytes / MiB / gb,
        "work_unit": unit, "unit_mb": unit_bytes / MiB, "units": n_units,
        "tasks_per_unit": tasks / n_units, "seconds": seconds,
    }


# ------------------------------------------------------------------------ helpers


def _assert_same(a: str | xr.Dataset, b: str | xr.Dataset, names: list[str]) -> int:
    """Identical values (NaN positions included), dims and coordinates; returns #NaN."""
    def load(x: str | xr.Dataset) -> xr.Dataset:
        return xr.open_zarr(x, chunks=None) if isinstance(x, str) else x

    x, y = load(a), load(b)
    n_nan = 0
    for n in names:
        u, v = np.asarray(x[n].values), np.asarray(y[n].values)
        if x[n].dims != y[n].dims or u.dtype != v.dtype or u.shape != v.shape or \
                not np.array_equal(u, v, equal_nan=True):
            raise AssertionError(f"variable {n!r} differs between {a} and {b}")
        n_nan += int(np.isnan(u).sum())
    for c in set(x.coords) | set(y.coords):
        if not np.array_equal(x[c].values, y[c].values):
            raise AssertionError(f"coordinate {c!r} differs between {a} and {b}")
    return n_nan


class _Target:
    """Fresh store paths under one folder, and the peak memory of each call."""

    def __init__(self, root: str, name: str) -> None:
        self.root, self.name = root, name
        self._n = itertools.count()
        self.paths: list[str] = []
        self.peaks: list[tuple[float, float]] = []
        self.results: list[Any] = []

    def fresh(self) -> str:
        path = os.path.join(self.root, f"{self.name}-{next(self._n)}.zarr")
        self.paths.append(path)
        return path

    def measured(self, fn: Callable[[str], Any]) -> Callable[[], Any]:
        def call() -> Any:
            path = self.fresh()
            with PeakRSS(interval=0.05) as peak:
                out = fn(path)
            self.peaks.append((peak.peak_mb, peak.delta_mb))
            self.results.append(out)
            return out

        return call

    def peak_mb(self) -> float:
        return max(p for p, _ in self.peaks)

    def delta_mb(self) -> float:
        return max(d for _, d in self.peaks)

    def clean(self, keep: int = 1) -> None:
        for path in self.paths[:-keep] if keep else self.paths:
            shutil.rmtree(path, ignore_errors=True)


def _write_graph_row(method: str, scheduler: str, res: WriteResult, tasks: int, subs: int,
                     nbytes: int | None, seconds: float) -> dict[str, Any]:
    """A graph row of an engine write: its work unit is the region."""
    return _graph_row(method, scheduler, tasks, nbytes, subs, res.bytes_written, "region",
                      res.bytes_written / res.n_written, res.n_written, seconds)


def _row(name: str, seconds: float, out_bytes: int, peak: float, delta: float,
         note: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "seconds": seconds, "mb_per_s": out_bytes / MiB / seconds,
            "peak_mb": peak, "delta_mb": delta, "note": note, **extra}


def _engine(ds: xr.Dataset, client: Any = None) -> Callable[[str], WriteResult]:
    def fn(path: str) -> WriteResult:
        res = write(ds, path, client=client)
        assert res.n_written == res.n_regions and res.n_skipped == 0, res
        return res

    return fn


def _to_zarr(ds: xr.Dataset) -> Callable[[str], None]:
    def fn(path: str) -> None:
        ds.to_zarr(path, mode="w", consolidated=True, zarr_format=3)

    return fn


def _region_mb(res: WriteResult) -> float:
    return res.bytes_written / max(1, res.n_written) / MiB


def _chunk_units(ds: xr.Dataset) -> tuple[int, float]:
    """Chunks over every data variable and the mean bytes of one."""
    n = sum(math.prod(len(c) for c in v.chunks or ()) for v in ds.data_vars.values())
    return n, _data_bytes(ds) / n


def _data_bytes(ds: xr.Dataset) -> int:
    return int(sum(v.nbytes for v in ds.data_vars.values()))


def _predict_input(src: xr.Dataset, steps: int) -> tuple[xr.Dataset, Any]:
    import torch

    from engine.ml.predict import predict
    from engine.ml.registry import build_architecture

    torch.manual_seed(0)
    model = build_architecture("conv_net", in_channels=len(src.data_vars), hidden=8, layers=2,
                               kernel_size=3).eval()
    sub = src.isel(time=slice(0, steps))
    out = predict(sub, model, tile={"lat": TILE, "lon": TILE}, overlap=OVERLAP)
    return out.to_dataset(), model


# ------------------------------------------------------------------------ sections


def _race(data: xr.Dataset, eng: _Target, plain: _Target, reps: int, warm_steps: int,
          labels: tuple[str, str], notes: tuple[str, str], client: Any = None
          ) -> tuple[float, list[dict[str, Any]]]:
    """Warm both methods up, time them interleaved, check the stores are equal; returns
    the ratio ``to_zarr / engine`` and the two table rows."""
    warm = data.isel(time=slice(0, warm_steps))  # imports, codecs, thread pools
    eng.measured(_engine(warm, client))()
    plain.measured(_to_zarr(warm))()
    eng.peaks.clear()
    plain.peaks.clear()
    t_eng, t_plain, ratio = paired(eng.measured(_engine(data, client)),
                                   plain.measured(_to_zarr(data)), reps)
    _assert_same(eng.paths[-1], plain.paths[-1], [str(n) for n in data.data_vars])
    last: WriteResult = eng.results[-1]
    out_bytes = _data_bytes(data)
    return ratio, [
        _row(labels[0], t_eng, out_bytes, eng.peak_mb(), eng.delta_mb(),
             notes[0].format(n=last.n_regions, mb=_region_mb(last)),
             regions=last.n_regions, region_mb=_region_mb(last)),
        _row(labels[1], t_plain, out_bytes, plain.peak_mb(), plain.delta_mb(), notes[1]),
    ]


def _threaded(cfg: dict, mem: xr.Dataset, src: xr.Dataset, root: str) -> dict[str, Any]:
    names = [str(n) for n in mem.data_vars]
    out_bytes = _data_bytes(mem)
    reps = cfg["repeats"]
    eng, plain = _Target(root, "engine"), _Target(root, "to_zarr")
    with dask.config.set(scheduler="threads"):
        ratio, rows = _race(mem, eng, plain, reps, cfg["chunks"][0],
                            ("engine write", "to_zarr"),
                            ("{n} regions of {mb:.1f} MB, thread pool",
                             "one store graph, threaded scheduler"))
        n_nan = _assert_same(plain.paths[-1], mem, names)
        finished = eng.paths[-1]

        def resume() -> WriteResult:
            res = write(mem, finished)
            assert res.n_written == 0 and res.n_skipped == res.n_regions, res
            return res

        with PeakRSS(interval=0.05) as peak:
            t_res, _, _ = timed(resume, reps)
        rows.append(_row("engine write, resume", t_res, out_bytes, peak.peak_mb, peak.delta_mb,
                         "re-run on the finished store: every region skipped"))
        eng.clean()
        plain.clean()
        for mb in cfg["sweep_mb"]:
            sweep = _Target(root, f"engine-{mb}")
            with dask.config.set({"engine.write.region-mb": mb}):
                t_mb, _, _ = timed(sweep.measured(_engine(mem)), reps)
            _assert_same(sweep.paths[-1], plain.paths[-1], names)
            res = sweep.results[-1]
            rows.append(_row(f"engine write, region-mb={mb}", t_mb, out_bytes, sweep.peak_mb(),
                             sweep.delta_mb(), f"{res.n_regions} regions of "
                             f"{_region_mb(res):.1f} MB, median of {reps}",
                             regions=res.n_regions, region_mb=_region_mb(res)))
            sweep.clean(keep=0)

    # Graph accounting on the lazy input. dask's local scheduler hands the global callbacks
    # to the first of several concurrent computes only, so the regions run one at a time
    # here (num_workers=1); each region's graph is the same as with the thread pool.
    with dask.config.set(scheduler="threads", num_workers=1):
        graphs = []

        def account(fn: Callable[[], Any]) -> tuple[Any, int, int, int | None, float]:
            rec, t0 = _LocalGraphs(), time.perf_counter()
            with rec:
                out = fn()
            return out, rec.tasks, rec.submissions, rec.nbytes, time.perf_counter() - t0

        path = os.path.join(root, "acc-engine.zarr")
        graphs.append(_write_graph_row("engine write", "threads",
                                       *account(lambda: write(src, path))))
        path2 = os.path.join(root, "acc-to_zarr.zarr")
        _, tasks, subs, nb, secs = account(lambda: _to_zarr(src)(path2))
        n_chunks, chunk_bytes = _chunk_units(src)
        graphs.append(_graph_row("to_zarr", "threads", tasks, nb, subs, out_bytes, "chunk",
                                 chunk_bytes, n_chunks, secs))
        _assert_same(path, path2, names)
        pred, model = _predict_input(src, cfg["predict_steps"])
        path3 = os.path.join(root, "acc-predict.zarr")
        graphs.append(_write_graph_row("predict -> write", "threads",
                                       *account(lambda: write(pred, path3))))
        for p in (path, path2):
            shutil.rmtree(p, ignore_errors=True)
    plain.clean(keep=0)
    return {"rows": rows, "graphs": graphs, "ratio": ratio, "nan_cells": n_nan,
            "pred_store": path3, "chunks": n_chunks, "pred_chunks": _chunk_units(pred)[0],
            "model_kb": len(serialize_model(model).data) / 2**10}


def _processes(cfg: dict, src: xr.Dataset, root: str, pred_ref: str) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    names = [str(n) for n in src.data_vars]
    out_bytes = _data_bytes(src)
    reps = cfg["repeats"]
    eng, plain = _Target(root, "engine-p"), _Target(root, "to_zarr-p")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        # both read the input store, as a job does (persisted data would make chunks
        # travel to the worker that writes them)
        ratio, rows = _race(src, eng, plain, reps, cfg["chunks"][0],
                            ("engine write [2 procs]", "to_zarr [2 procs]"),
                            ("{n} regions, one task each", "one store graph on the cluster"),
                            client=client)
        ref = plain.paths[-1]
        eng.clean(keep=0)

        client.register_plugin(_TaskCounter())
        counter = cluster.scheduler.plugins[_TaskCounter.name]
        graphs = []

        def account(method: str, fn: Callable[[], Any]) -> Any:
            counter.tasks = counter.submissions = 0
            t0 = time.perf_counter()
            with _sent_graph_bytes(client) as sizes:
                out = fn()
            nbytes = None if any(s < 0 for s in sizes) else sum(sizes)
            return out, counter.tasks, counter.submissions, nbytes, time.perf_counter() - t0

        path = os.path.join(root, "acc-engine-p.zarr")
        graphs.append(_write_graph_row("engine write", "2 procs",
                                       *account("engine", lambda: write(src, path,
                                                                        client=client))))
        path2 = os.path.join(root, "acc-to_zarr-p.zarr")
        _, tasks, subs, nb, secs = account("to_zarr", lambda: _to_zarr(src)(path2))
        n_chunks, chunk_bytes = _chunk_units(src)
        graphs.append(_graph_row("to_zarr", "2 procs", tasks, nb, subs, out_bytes, "chunk",
                                 chunk_bytes, n_chunks, secs))
        _assert_same(path, ref, names)
        _assert_same(path2, ref, names)
        pred, _ = _predict_input(src, cfg["predict_steps"])
        path3 = os.path.join(root, "acc-predict-p.zarr")
        graphs.append(_write_graph_row("predict -> write", "2 procs",
                                       *account("predict", lambda: write(pred, path3,
                                                                         client=client))))
        # same model, same input: the cluster's prediction equals the threaded one
        a = xr.open_zarr(path3, chunks=None)["prediction"].values
        b = xr.open_zarr(pred_ref, chunks=None)["prediction"].values
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    plain.clean(keep=0)
    return {"rows": rows, "graphs": graphs, "ratio": ratio}


# ------------------------------------------------------------------------------ run


def run(size: str = "default") -> dict[str, Any]:
    """Run the benchmark at ``size`` (tiny, default, large); returns the result dict."""
    from zarr.errors import ZarrUserWarning

    cfg = SIZES[size]
    t, h, w = cfg["shape"]
    ct, ch, cw = cfg["chunks"]
    root = tempfile.mkdtemp(prefix="bench-write-")
    overrides = {} if cfg["region_mb"] is None else {"engine.write.region-mb": cfg["region_mb"]}
    try:
        with warnings.catch_warnings(), dask.config.set(overrides):
            # zarr v3 consolidated metadata is flagged experimental on every to_zarr call
            warnings.filterwarnings("ignore", message="Consolidated metadata",
                                    category=ZarrUserWarning)
            lazy = synthetic_cube({"time": t, "lat": h, "lon": w},
                                  chunks={"time": ct, "lat": ch, "lon": cw},
                                  variables=cfg["variables"], nan_fraction=0.02)
            src_path = os.path.join(root, "input.zarr")
            with dask.config.set(scheduler="threads"):
                lazy.to_zarr(src_path, zarr_format=3, consolidated=True)
                src = xr.open_zarr(src_path)
                for var in src.variables.values():  # same default encoding for both methods
                    var.encoding = {}
                mem = src.persist()
            threaded = _threaded(cfg, mem, src, root)
            del mem
            procs = _processes(cfg, src, root, threaded["pred_store"]) \
                if cfg["processes"] else None
            region_mb = dask.config.get("engine.write.region-mb")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = threaded["rows"] + (procs["rows"] if procs else [])
    graphs = threaded["graphs"] + (procs["graphs"] if procs else [])
    archive_gb = math.prod(ARCHIVE) * 4 / GiB
    for g in graphs:
        g["output_chunks"] = threaded["pred_chunks" if g["method"].startswith("predict")
                                      else "chunks"]
        g["tasks_per_chunk"] = g["tasks"] / g["output_chunks"]
        g["archive_tasks_per_variable"] = g["tasks_per_gb"] * archive_gb
    ratios = {"vs_to_zarr": threaded["ratio"]}
    if procs:
        ratios["vs_to_zarr_2procs"] = procs["ratio"]
    return {
        "benchmark": "write",
        "size": size,
        "machine": machine(),
        "cube": {"shape": [t, h, w], "chunks": [ct, ch, cw], "variables": cfg["variables"],
                 "dtype": "float32", "nan_fraction": 0.02, "bytes": _data_bytes(lazy),
                 "nan_cells": threaded["nan_cells"]},
        "region_mb_config": region_mb,
        "predict": {"model": "conv_net hidden=8 layers=2 kernel=3",
                    "model_kb": threaded["model_kb"], "tile": TILE,
                    "overlap": OVERLAP, "time_steps": cfg["predict_steps"]},
        "archive": {"shape": list(ARCHIVE), "gb_per_variable": archive_gb},
        "rows": rows,
        "graphs": graphs,
        "ratios": ratios,
        "targets": {"vs_to_zarr": 0.8},
        "note": ("timed threaded writes read a cube persisted in memory, 2-process writes "
                 "the input store; graph figures come from a "
                 "lazy read of the input store (threads: pickled materialised graphs; "
                 "2 procs: scheduler task count and the serialised update-graph message)"),
    }


def _print(res: dict[str, Any]) -> None:
    c = res["cube"]
    print(f"write benchmark ({res['size']}): cube {c['shape']} x {c['variables']} vars "
          f"float32, chunks {c['chunks']}, {c['bytes'] / MiB:.0f} MB, "
          f"{res['machine']['cpus']} cores, engine.write.region-mb={res['region_mb_config']}")
    print(f"{'method':32s} {'seconds':>9s} {'MB/s':>8s} {'peak MB':>9s} {'+MB':>7s}  note")
    for r in res["rows"]:
        print(f"{r['name']:32s} {r['seconds']:9.3f} {r['mb_per_s']:8.0f} {r['peak_mb']:9.0f} "
              f"{r['delta_mb']:7.0f}  {r['note']}")
    print(f"graphs per GB of output ({res['predict']['model']} "
          f"({res['predict']['model_kb']:.0f} kB) for predict, tiles "
          f"{res['predict']['tile']}, overlap {res['predict']['overlap']}); "
          f"archive = {'x'.join(map(str, res['archive']['shape']))} float32 "
          f"({res['archive']['gb_per_variable']:.1f} GB) per variable")
    print(f"{'method':18s} {'sched':8s} {'subm':>5s} {'tasks':>7s} {'graph MB':>9s} "
          f"{'tasks/GB':>9s} {'MB/GB':>7s} {'unit':>6s} {'unit MB':>8s} {'units':>6s} "
          f"{'tasks/unit':>10s} {'tasks/chunk':>11s} {'archive tasks/var':>17s}")
    for g in res["graphs"]:
        mb = "n/a" if g["graph_mb"] is None else f"{g['graph_mb']:.2f}"
        mbgb = "n/a" if g["graph_mb_per_gb"] is None else f"{g['graph_mb_per_gb']:.1f}"
        print(f"{g['method']:18s} {g['scheduler']:8s} {g['submissions']:5d} {g['tasks']:7d} "
              f"{mb:>9s} {g['tasks_per_gb']:9.0f} {mbgb:>7s} {g['work_unit']:>6s} "
              f"{g['unit_mb']:8.2f} {g['units']:6d} {g['tasks_per_unit']:10.1f} "
              f"{g['tasks_per_chunk']:11.2f} {g['archive_tasks_per_variable']:17.3g}")
    print_ratios(res, lambda k: f"to_zarr seconds / engine write seconds ({k})")


main = cli("write", run, _print)

if __name__ == "__main__":
    main(None)
