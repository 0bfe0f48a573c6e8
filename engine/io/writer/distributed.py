"""Regions written on a dask.distributed cluster: one task per region, in a rolling window.

Each region's culled graph runs inside its write task, on one worker: no chunk travels
between workers, the scheduler sees one task per region, and large literals in the graph
(model weights) are scattered once per write and shared by every region task.
"""

from __future__ import annotations

import functools
import itertools
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import xarray as xr

from engine import config
from engine.io.writer.tasks import Failures, RegionTask, pack, region_data, write_region
from engine.redact import redact_options, redact_url


def lift_bytes() -> int:
    """Literal graph values at least this big are scattered once per write
    (``engine.io.writer._LIFT_BYTES``, read when a write runs)."""
    from engine.io import writer

    return writer._LIFT_BYTES


def gpu_regions() -> int:
    """Regions in flight per GPU worker (config ``write.gpu-regions-per-gpu``, a power of
    two, so the resource fractions add up exactly)."""
    n = int(config.get("write.gpu-regions-per-gpu"))
    if n < 1 or n & (n - 1):
        raise ValueError(f"engine.write.gpu-regions-per-gpu={n}: use a power of two")
    return n


def _literal_nbytes(value: Any) -> int:
    for attr in ("nbytes", "data"):
        v = getattr(value, attr, None)
        if isinstance(v, int):
            return v
        if isinstance(v, bytes | bytearray | memoryview):
            return len(v)
    return len(value) if isinstance(value, bytes | bytearray) else 0


@dataclass
class FusedRegion:
    """One region's culled graph, computed inside its write task (see :func:`fused`)."""

    graph: dict
    arrays: dict[str, tuple[tuple[str, ...], str, tuple, Any]]  # name: dims, key, chunks, meta
    lifted: dict[Any, Any]  # graph key: large literal value, shipped once as a future
    resources: dict


def fused(packed: dict[str, tuple[tuple[str, ...], Any]]) -> FusedRegion | None:
    """The region's graph culled (not fused: blockwise fusion would give each sliced
    consumer of a shared block, e.g. a prediction feeding two variables, its own copy of
    the model call), the worker resources any layer asks for (``{"GPU": 1}`` from
    predict), and its large literals (model weights) lifted out; None when the graph
    holds persisted data (futures), whose chunks live on the cluster already.

    Reading and computing a region inside its write task means its chunks never travel
    between workers, and the scheduler sees one task per region instead of its graph.
    """
    from dask._task_spec import DataNode
    from dask.highlevelgraph import HighLevelGraph
    from distributed import Future

    resources: dict = {}
    for _, a in packed.values():
        for layer in a.__dask_graph__().layers.values():
            resources.update((layer.annotations or {}).get("resources", {}))
    if "GPU" in resources:
        # A region task reads, predicts, encodes and stores: it needs the device only
        # for part of its time. It asks for a smaller share of a GPU worker than an
        # inference task does, so more regions are in flight than blocks on the device
        # (bounded in the worker by engine.ml.device.gpu_semaphore): reading the next
        # region and encoding the last one overlap the forward passes.
        resources["GPU"] = min(float(resources["GPU"]), 1 / gpu_regions())
    arrays = [a for _, a in packed.values()]
    keys = {k for a in arrays for k in da.core.flatten(a.__dask_keys__())}
    graph = dict(HighLevelGraph.merge(*[a.__dask_graph__() for a in arrays]).cull(keys))
    if any(isinstance(v, Future) for v in graph.values()):
        return None
    threshold = lift_bytes()
    lifted = {k: v.value for k, v in graph.items()
              if isinstance(v, DataNode) and _literal_nbytes(v.value) >= threshold}
    for k in lifted:
        del graph[k]
    meta = {n: (dims, a.name, a.chunks, a._meta)
            for (n, (dims, _)), a in zip(packed.items(), arrays, strict=True)}
    return FusedRegion(graph, meta, lifted, resources)


def write_region_fused(task: RegionTask, region: FusedRegion, lifted_keys: list,
                       *lifted_values: Any) -> dict:
    """Compute a region's graph here, on this worker thread, then write it."""
    graph = {**region.graph, **dict(zip(lifted_keys, lifted_values, strict=True))}
    arrays = [da.Array(graph, key, chunks, meta=meta)
              for _, key, chunks, meta in region.arrays.values()]
    values = dask.compute(*arrays, scheduler="sync", optimize_graph=False)
    data = xr.Dataset({n: (spec[0], v) for (n, spec), v in
                       zip(region.arrays.items(), values, strict=True)})
    return write_region(task, data)


def region_token(url: str, storage_options: dict | None, layout: dict, fp_hash: str) -> str:
    """Token of what every region task of one write shares: the store (URL and redacted
    options: endpoint yes, credentials no), its layout and the job's fingerprint."""
    return dask.base.tokenize(redact_url(str(url)), redact_options(storage_options),
                              layout, fp_hash)


def region_key(token: str, task: RegionTask, packed: dict) -> str:
    """Key of one region's task: a token of all its inputs -- the write's ``token``
    (:func:`region_token`), the region, and the dask token of the region's data -- so two
    writes in one session or one graph never share a key, and no secret is hashed."""
    data = {n: (dims, a.name) for n, (dims, a) in sorted(packed.items())}
    return f"write-region-{task.id}-{dask.base.tokenize(token, task.region, data)}"


def run_distributed(client, ds, tasks, retries, on_done, in_flight: int | None = None,
                    *, key_token: str = "") -> Failures:
    """Submit regions in a rolling window of ``in_flight`` and collect them as they finish,
    so one failure loses nothing else and the scheduler never holds the graph of the whole
    store: an archive of 10^5 regions costs the scheduler a few hundred regions at a time.

    Keys are new for every call (the write's token and a nonce): a failed region's
    future, still known to the client, is never handed back to the next attempt. When the
    call stops early (an error, Ctrl-C) the regions not started are cancelled, and it
    returns only once those already running on workers have stopped: a started task
    cannot be interrupted, and would otherwise still write its region -- into a store
    that a later write may have replaced.
    """
    from distributed import as_completed

    key_token = f"{key_token}-{uuid.uuid4().hex}"
    threads = sum(client.nthreads().values()) or 1
    limit = int(config.get("write.regions-in-flight", in_flight) or 0) or max(8, 2 * threads)

    shared: dict[Any, Any] = {}  # lifted literal (model weights) -> its future, scattered once

    def submit(t: RegionTask) -> Any:
        packed = pack(region_data(ds, t))
        key = region_key(key_token, t, packed)
        region = fused(packed)
        if region is None:  # persisted inputs: their chunks live on the cluster already
            with dask.annotate(region=t.id):
                graph = dask.delayed(write_region, pure=False)(t, packed, dask_key_name=key)
            return client.compute(graph, retries=retries)
        names = list(region.lifted)
        for k in names:
            if k not in shared:
                shared[k] = client.scatter(region.lifted[k], hash=False)
        region.lifted = {}
        # the partial keeps the region's graph opaque: one task per region, whose only
        # dependencies are the scattered literals
        return client.submit(functools.partial(write_region_fused, t, region, names),
                             *[shared[k] for k in names], key=key, retries=retries,
                             resources=region.resources or None, pure=False)

    todo = iter(tasks)
    pending: dict[str, tuple[Any, RegionTask]] = {}
    for t in itertools.islice(todo, limit):
        fut = submit(t)
        pending[fut.key] = (fut, t)
    failures: Failures = []
    running = as_completed([f for f, _ in pending.values()])
    try:
        for fut in running:
            _, task = pending.pop(fut.key)
            try:
                record = fut.result()
            except Exception as err:
                # no traceback: its frames (this one) would keep the futures alive
                failures.append((task, err.with_traceback(None)))
            else:
                on_done(record)
            del fut
            nxt = next(todo, None)
            if nxt is not None:
                new = submit(nxt)
                pending[new.key] = (new, nxt)
                running.add(new)
    finally:
        left = [f for f, _ in pending.values()]
        client.cancel(left)
        for fut in shared.values():
            fut.release()
        if left:
            wait_stopped(client, {str(f.key) for f in left})
    return failures


def _executing(dask_worker) -> list[str]:
    return [str(ts.key) for ts in dask_worker.state.executing]


def wait_stopped(client, keys: set[str], poll: float = 0.1, tell_after: float = 5.0) -> None:
    """Wait until no task of ``keys`` is running on any worker (a cancelled task that had
    started runs on in its thread until it returns); says so on stderr after
    ``tell_after`` seconds. A cluster that cannot be reached runs nothing any more."""
    t0, told = time.monotonic(), False
    while True:
        try:
            running = {k for ks in client.run(_executing).values() for k in ks} & keys
        except Exception:
            return
        if not running:
            return
        if not told and time.monotonic() - t0 > tell_after:
            sys.stderr.write(f"waiting for {len(running)} region task(s) already running on "
                             "the workers to finish (a started task cannot be interrupted; "
                             "stopping now could let it write after this write ends)\n")
            told = True
        time.sleep(poll)


def current_client(client):
    """The distributed client to use, or None for the local scheduler."""
    if client is not None:
        return client
    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None  # an explicitly chosen local scheduler wins over a default client
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None
