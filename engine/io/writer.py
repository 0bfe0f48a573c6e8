"""Resumable, chunk-aligned Zarr writer.

:func:`write` stores a lazy :class:`xarray.Dataset` at any fsspec URL in four steps:

1. **Plan.** The Zarr chunk (and shard) of every dask-backed data variable comes from
   ``encoding`` or from the first dask chunk. Every dask chunk boundary must fall on a
   chunk (shard) boundary, otherwise two tasks write the same object and one silently
   loses the other's data (xarray #8371, zarr-python #3682): such plans are refused
   before anything is written. The output is cut into *regions*, a regular grid of
   whole chunks (shards), ragged only at the array end.
2. **Template.** Metadata, coordinates (one object each) and in-memory variables are
   written once; lazy variables get ``compute=False`` placeholders.
3. **Regions.** One task per region computes its slice, writes it with
   ``to_zarr(region=..., mode="r+")`` and then records it in the manifest, one JSON
   object per region. On a cluster the region's culled graph runs inside that task, on
   one worker (no chunk travels, the scheduler sees one task per region, model weights
   are scattered once), and regions are submitted in a rolling window. The manifest,
   never the presence of chunk objects (all-fill chunks are not stored), says what is
   finished: a re-run skips recorded regions and redoes the others in full, which is
   idempotent because regions are aligned.
4. **Consolidate** the metadata once, after every region succeeded.

Records the engine keeps inside the store::

    <url>/.engine/fingerprint.json         the job: user fingerprint, code version, layout
    <url>/.engine/template.json            stored layout and region grid, once written
    <url>/.engine/manifest/<i.j.k>.json    one record per finished region
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import itertools
import json
import math
import os
import socket
import time
import warnings
import zlib
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import as_completed as _as_completed
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from engine import config, meter
from engine._version import code_version
from engine.errors import RegionFailedError, ResumeError, SpecError, StoreError, StoreExistsError
from engine.io import stores

__all__ = ["write", "read_manifest", "verify", "WriteResult", "ENGINE_PREFIX"]

#: Reserved prefix inside every output store for the engine's own records.
ENGINE_PREFIX = ".engine"
_FINGERPRINT = f"{ENGINE_PREFIX}/fingerprint.json"
_TEMPLATE = f"{ENGINE_PREFIX}/template.json"
_MANIFEST = f"{ENGINE_PREFIX}/manifest"
_LAYOUT_KEYS = ("chunks", "shards", "preferred_chunks")
_RESTART = "pass restart=True (CLI --restart) to recompute from scratch"
_REPLACE = "pass --overwrite to replace it or choose another --output"

Layout = dict[str, dict[str, Any]]  # variable -> dims, shape, dtype, chunks, shards


@dataclass(frozen=True)
class WriteResult:
    """What one call of :func:`write` did; ``regions`` are the indices written now."""

    url: str
    n_regions: int
    n_written: int
    n_skipped: int
    bytes_written: int
    seconds: float
    regions: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class _RegionTask:
    """Everything a worker needs to write one region; storage options travel in here."""

    url: str
    storage_options: dict[str, Any]
    index: tuple[int, ...]
    slices: dict[str, tuple[int, int]]
    variables: tuple[str, ...]
    fingerprint: str

    @property
    def id(self) -> str:
        return ".".join(map(str, self.index))

    def describe(self) -> str:
        where = ", ".join(f"{d}={a}:{b}" for d, (a, b) in self.slices.items())
        return f"region {self.id} ({where})"


# ---------------------------------------------------------------------------- plan


def _sizes(value: Any, ndim: int, key: str, name: Hashable) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int | np.integer):
        return (int(value),) * ndim
    if isinstance(value, list | tuple) and len(value) == ndim:
        if all(isinstance(v, int | np.integer) for v in value):
            return tuple(int(v) for v in value)
    raise SpecError(f"encoding[{name!r}][{key!r}]={value!r} must be an int or {ndim} ints")


def _layout(ds: xr.Dataset, encoding: Mapping[Hashable, Mapping]) -> Layout:
    """Zarr layout of the lazily written (dask-backed, n-d) data variables."""
    layout: Layout = {}
    for name, var in ds.data_vars.items():
        if var.chunks is None or var.ndim == 0:
            continue  # in memory: written with the template
        enc = encoding.get(name, {})
        chunks = _sizes(enc.get("chunks"), var.ndim, "chunks", name)
        chunks = chunks or tuple(int(c[0]) for c in var.chunks)
        shards = _sizes(enc.get("shards"), var.ndim, "shards", name)
        if shards and any(s % c for s, c in zip(shards, chunks, strict=True)):
            raise SpecError(
                f"encoding[{name!r}]: shards {shards} are not whole multiples of chunks {chunks}"
            )
        layout[str(name)] = {
            "dims": [str(d) for d in var.dims],
            "shape": [int(n) for n in var.shape],
            "dtype": var.dtype.str,
            "chunks": list(chunks),
            "shards": list(shards) if shards else None,
        }
    return layout


def _check_alignment(ds: xr.Dataset, layout: Layout) -> None:
    """Refuse dask chunks that would make two tasks write one Zarr chunk or shard."""
    for name, lay in layout.items():
        kind = "shard" if lay["shards"] else "Zarr chunk"
        dask_chunks = ds[name].chunks or ()  # in the layout: dask-backed
        for dim, sizes, unit in zip(
            lay["dims"], dask_chunks, lay["shards"] or lay["chunks"], strict=True
        ):
            bounds = np.cumsum(sizes)[:-1]  # the array end may be ragged
            bad = bounds[bounds % unit != 0]
            if bad.size:
                raise StoreError(
                    f"variable {name!r}: dask chunks {tuple(sizes)} along {dim!r} are not whole "
                    f"multiples of the {kind} size {unit} (boundary at {bad[0]}): two tasks "
                    f"would write one object and lose data; rechunk with "
                    f"ds.chunk({{{dim!r}: {unit}}}) (or a multiple) or change the encoding"
                )


def _region_mb(ds: xr.Dataset, layout: Layout, client: Any) -> float:
    """``engine.write.region-mb``, capped so that every thread gets about two regions: a
    region is computed and written by one task, so fewer regions than threads idle them."""
    if client is not None:
        threads = sum(client.nthreads().values()) or 1
    else:
        threads = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    total_mb = sum(ds[name].nbytes for name in layout) / 2**20
    return min(float(config.get("write.region-mb")), total_mb / (2 * threads))


def _region_grid(
    ds: xr.Dataset, layout: Layout, region_chunks: Mapping[str, int] | None, region_mb: float
) -> dict[str, list[int]]:
    """Region boundaries per dimension, multiples of every variable's chunk (shard)."""
    dims = list(dict.fromkeys(d for lay in layout.values() for d in lay["dims"]))
    size = {d: int(ds.sizes[d]) for d in dims}
    unit, base = dict.fromkeys(dims, 1), dict.fromkeys(dims, 1)
    for name, lay in layout.items():
        for ax, d in enumerate(lay["dims"]):
            unit[d] = math.lcm(unit[d], (lay["shards"] or lay["chunks"])[ax])
            base[d] = math.lcm(base[d], int((ds[name].chunks or ())[ax][0]))
    steps = {d: max(1, min(base[d], size[d])) for d in dims}  # one dask chunk
    if region_chunks:
        for d, n in region_chunks.items():
            if d not in size:
                raise SpecError(f"region_chunks names {d!r}, which no lazy variable has")
            if not isinstance(n, int | np.integer) or n <= 0:
                raise SpecError(f"region_chunks[{d!r}]={n!r} must be a positive int")
            if n % unit[d] and n < size[d]:
                raise StoreError(
                    f"region_chunks[{d!r}]={n} is not a whole multiple of the Zarr chunk/shard "
                    f"size {unit[d]} along {d!r}: regions would share objects and lose data"
                )
            steps[d] = max(1, min(int(n), size[d]))
    else:  # grow by whole dask chunks, leading dimensions first, up to region_mb
        itemsize = {n: np.dtype(lay["dtype"]).itemsize for n, lay in layout.items()}

        def nbytes(s: dict[str, int]) -> int:
            return sum(
                math.prod(min(s[d], size[d]) for d in lay["dims"]) * itemsize[n]
                for n, lay in layout.items()
            )

        for d in dims:
            while (
                steps[d] < size[d] and nbytes({**steps, d: steps[d] + base[d]}) <= region_mb * 2**20
            ):
                steps[d] += base[d]
    return {d: [*range(0, size[d], steps[d]), size[d]] if size[d] else [0, 0] for d in dims}


def _region_tasks(
    url: str, so: dict, layout: Layout, grid: dict[str, list[int]], fingerprint: str
) -> list[_RegionTask]:
    """One task per region. A variable lacking a dimension is written only by the regions
    at index 0 along it, so no two regions write the same object."""
    dims, tasks = list(grid), []
    for index in itertools.product(*(range(len(grid[d]) - 1) for d in dims)):
        at = dict(zip(dims, index, strict=True))
        names = tuple(
            n for n, lay in layout.items() if all(at[d] == 0 for d in dims if d not in lay["dims"])
        )
        if names:
            slices = {d: (grid[d][i], grid[d][i + 1]) for d, i in at.items()}
            tasks.append(_RegionTask(url, so, index, slices, names, fingerprint))
    return tasks


# ------------------------------------------------------------------------ identity


def _canonical_nans(a: np.ndarray, nan: np.ndarray) -> bool:
    """True when every NaN of a real float array has the bit pattern of ``np.nan``."""
    if a.dtype.kind != "f":
        return False
    as_int = np.dtype(f"u{a.dtype.itemsize}")
    canon = np.array(np.nan, a.dtype).view(as_int)
    return bool((a[nan].view(as_int) == canon).all())


def _hashable(values: Any) -> tuple[bytes, Any]:
    """``(header, data)`` to hash: dtype and shape, then the values with every NaN the
    canonical one (copied only when some NaN has another payload)."""
    a = np.ascontiguousarray(values)
    header = f"{a.dtype.str}{a.shape}".encode()
    if a.dtype.kind == "O":
        return header, repr(a.tolist()).encode()
    if a.dtype.kind in "fc":
        nan = np.isnan(a)
        if nan.any() and not _canonical_nans(a, nan):
            a = a.copy()
            a[nan] = np.nan
    return header, a.reshape(-1).view(np.uint8).data


def _digest(values: Any) -> str:
    """sha1 of an array's dtype, shape and values; every NaN hashes the same (identity
    of in-memory inputs in the fingerprint)."""
    header, data = _hashable(values)
    h = hashlib.sha1(header)
    h.update(data)
    return h.hexdigest()


def _checksum(values: Any) -> str:
    """CRC-32 of an array's dtype, shape and values, every NaN the same: the integrity
    check of a written region (detects torn or overwritten chunks), about twice as fast
    as sha1 on the write path."""
    header, data = _hashable(values)
    return f"crc32:{zlib.crc32(data, zlib.crc32(header)):08x}"


def _fingerprint(ds: xr.Dataset, layout: Layout, encoding: Mapping, user: dict | None) -> dict:
    """What makes two runs interchangeable: job, code, lazy layout, in-memory values."""
    return {
        "user": user or {},
        "code_version": code_version(),
        "variables": layout,
        "in_memory": {
            str(k): {"dims": [str(d) for d in v.dims], "sha1": _digest(v.values)}
            for k, v in ds.variables.items()
            if str(k) not in layout
        },
        "encoding": {str(k): {kk: str(vv) for kk, vv in v.items()} for k, v in encoding.items()},
    }


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _diff(a: Any, b: Any, prefix: str = "", depth: int = 2) -> list[str]:
    """Dotted keys (two levels deep) where two JSON-like objects differ."""
    if depth == 0 or not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if _canonical(a) == _canonical(b) else [prefix.rstrip(".") or "<root>"]
    keys = sorted(set(a) | set(b))
    return [x for k in keys for x in _diff(a.get(k), b.get(k), f"{prefix}{k}.", depth - 1)]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------- store state


def _quiet_zarr() -> None:
    """Silence zarr's notice that our reserved prefix is not a zarr node.

    A narrow, idempotent filter rather than ``catch_warnings``, which is not thread-safe
    (region tasks run in threads).
    """
    from zarr.errors import ZarrUserWarning

    warnings.filterwarnings(
        "ignore", message=rf"Object at {ENGINE_PREFIX} is not recognized", category=ZarrUserWarning
    )


def read_manifest(url: str, storage_options: dict | None = None) -> dict[tuple[int, ...], dict]:
    """Return the manifest of an output store: region index -> record.

    A record is written after its region's chunks, so it proves the region finished.
    Unreadable records (cut short by a kill) are left out: that region is unfinished.
    """
    fs, root = stores.filesystem(url, storage_options)
    folder = f"{root}/{_MANIFEST}"
    fs.invalidate_cache(folder)
    try:
        paths = [p for p in fs.find(folder) if p.endswith(".json")]
    except FileNotFoundError:
        return {}
    records = {}
    for blob in (fs.cat(paths, on_error="return") if paths else {}).values():
        try:
            rec = json.loads(blob)
            records[tuple(int(i) for i in rec["region"])] = rec
        except (TypeError, ValueError, KeyError):
            continue
    return records


def _stored_layout(url: str, so: dict, names) -> dict[str, dict[str, Any]]:
    """Shape, chunks, shards and dtype of arrays as stored (not as planned)."""
    import zarr

    store = stores.zarr_store(url, so, read_only=True)
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    out = {}
    for name in names:
        arr = group[name]
        if not isinstance(arr, zarr.Array):
            raise KeyError(f"{name} is a group, not an array")
        out[name] = {
            "shape": list(arr.shape),
            "chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None,
            "dtype": np.dtype(str(arr.dtype)).str,
        }
    return out


def _existing(url, fs, root, so, fp, fp_hash, layout, *, resume, replace) -> dict | None:
    """Decide what to do with what is already at ``url``.

    Returns the stored template record to resume from, or None once nothing is there.
    Only called after the plan was validated, so a bad plan never removes anything.
    """
    if not stores.store_exists(fs, root):
        return None
    if replace:
        stores.remove_store(fs, root)
        return None
    stored = stores.get_json(fs, f"{root}/{_FINGERPRINT}")
    if stored is None:
        raise StoreExistsError(
            f"output store already exists with different content: {url}; {_REPLACE}"
        )
    if stored.get("hash") != fp_hash:
        fields = ", ".join(_diff(stored.get("fingerprint"), fp)[:6])
        if not resume:
            raise StoreExistsError(
                f"output store already exists with different content: {url} (fingerprint "
                f"differs in {fields}); {_REPLACE}"
            )
        raise ResumeError(f"cannot resume {url}: its fingerprint differs ({fields}); {_RESTART}")
    if not resume:
        raise StoreExistsError(
            f"output store already exists: {url}; pass resume=True to finish it, or {_REPLACE}"
        )
    template = stores.get_json(fs, f"{root}/{_TEMPLATE}")
    if template is None:  # killed while writing the template
        if read_manifest(url, so):
            raise ResumeError(f"cannot resume {url}: its template record is missing; {_RESTART}")
        stores.remove_store(fs, root)
        return None
    try:
        actual = _stored_layout(url, so, layout)
    except (KeyError, FileNotFoundError, ValueError) as err:
        raise ResumeError(
            f"cannot resume {url}: its template is unreadable ({err}); {_RESTART}"
        ) from err
    if actual != template["layout"]:
        fields = ", ".join(_diff(template["layout"], actual)[:6])
        raise ResumeError(
            f"cannot resume {url}: its arrays differ from their template ({fields}); {_RESTART}"
        )
    return template


def _template(ds: xr.Dataset, encoding: Mapping, layout: Layout) -> tuple[xr.Dataset, dict]:
    """The dataset and encoding that create the store: lazy variables as placeholders.

    The encoding is checked on a throw-away in-memory store, so a bad entry fails here,
    before an existing store is removed.
    """
    import zarr

    tmpl = ds.copy(deep=False)
    for name, var in list(tmpl.variables.items()):
        if var.chunks is None:
            continue
        if str(name) in layout:  # never computed: the regions write the values
            new = var.copy(deep=False, data=da.empty(var.shape, dtype=var.dtype, chunks=-1))
        else:
            new = var.compute()
        if name in tmpl.coords:
            tmpl.coords[name] = new
        else:
            tmpl[name] = new
    # An explicit `encoding` entry replaces a variable's own encoding (xarray semantics);
    # the others keep theirs, minus chunk layouts inherited from an input store.
    enc = {}
    for name, var in tmpl.variables.items():
        user, lay = encoding.get(name), layout.get(str(name))
        chunks: dict[str, Any] = {}
        if lay:
            chunks["chunks"] = tuple(lay["chunks"])
            if lay["shards"]:
                chunks["shards"] = tuple(lay["shards"])
        elif var.ndim and "chunks" not in (user or {}):
            chunks["chunks"] = var.shape  # coordinates, in-memory variables: one object each
        if user is not None:
            enc[name] = {**user, **chunks}
        else:
            kept = {k: v for k, v in var.encoding.items() if k not in _LAYOUT_KEYS}
            var.encoding = {**kept, **chunks}
    try:
        dry_run = zarr.storage.MemoryStore()
        tmpl.to_zarr(dry_run, compute=False, consolidated=False, zarr_format=3, encoding=enc)
    except (ValueError, TypeError) as err:
        raise SpecError(f"the output encoding is invalid: {err}") from err
    return tmpl, enc


def _write_template(tmpl, enc, url, fs, root, so, layout, grid, fp, fp_hash) -> dict:
    """Claim the store, write metadata and in-memory variables, then record the layout."""
    claim = {"hash": fp_hash, "fingerprint": fp, "created_at": _now()}
    stores.put_json(fs, f"{root}/{_FINGERPRINT}", claim)
    # mode "a", not "w-": the store already holds our fingerprint (and nothing else)
    store = stores.zarr_store(url, so)
    tmpl.to_zarr(store, mode="a", compute=False, consolidated=False, zarr_format=3, encoding=enc)
    template = {"layout": _stored_layout(url, so, layout), "regions": grid, "created_at": _now()}
    stores.put_json(fs, f"{root}/{_TEMPLATE}", template)
    return template


def _consolidate(url: str, so: dict) -> None:
    import zarr
    from zarr.errors import ZarrUserWarning

    with warnings.catch_warnings():  # v3 consolidated metadata is flagged experimental
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=ZarrUserWarning)
        zarr.consolidate_metadata(stores.zarr_store(url, so), zarr_format=3)


# ----------------------------------------------------------------------- execution


def _pack(sub: xr.Dataset) -> dict[str, tuple[tuple[str, ...], Any]]:
    """A region as ``{name: (dims, dask array)}`` for a delayed task argument.

    Passing the ``xarray.Dataset`` itself to ``dask.delayed`` loses dependencies on the
    distributed scheduler when two variables share graph keys (a mask variable that is
    also an input of another variable): the task is cancelled with "lost dependencies".
    Plain dask arrays in a dict are merged correctly.
    """
    return {str(n): (tuple(str(d) for d in v.dims), v.data) for n, v in sub.data_vars.items()}


def _unpack(packed: dict[str, tuple[tuple[str, ...], Any]]) -> xr.Dataset:
    return xr.Dataset({n: (dims, np.asarray(a)) for n, (dims, a) in packed.items()})


def _write_region(task: _RegionTask, data: xr.Dataset | dict) -> dict:
    """Write one computed region, then its manifest record (runs on a worker)."""
    t0 = time.perf_counter()
    _quiet_zarr()
    if isinstance(data, dict):
        data = _unpack(data)
    sums = {n: _checksum(data[n].values) for n in sorted(task.variables)}
    region = {str(d): slice(*task.slices[str(d)]) for d in data.dims}
    store = stores.zarr_store(task.url, task.storage_options)
    data.to_zarr(store, region=region, mode="r+", consolidated=False, zarr_format=3)
    record = {
        "region": list(task.index),
        "id": task.id,
        "slices": {d: list(s) for d, s in task.slices.items()},
        "variables": list(task.variables),
        "fingerprint": task.fingerprint,
        "nbytes": int(data.nbytes),
        "checksums": sums,
        "checksum": hashlib.sha1("".join(sums.values()).encode()).hexdigest(),
        "finished_at": _now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    fs, root = stores.filesystem(task.url, task.storage_options)
    stores.put_json(fs, f"{root}/{_MANIFEST}/{task.id}.json", record)
    meter.record("write", items=1, pixels=math.prod(b - a for a, b in task.slices.values()),
                 bytes_written=int(data.nbytes), seconds=time.perf_counter() - t0)
    return record


#: Literal graph values at least this big (a model's weights) are scattered to the
#: cluster once per write instead of travelling inside every region's task.
_LIFT_BYTES = 1 << 20


def _literal_nbytes(value: Any) -> int:
    for attr in ("nbytes", "data"):
        v = getattr(value, attr, None)
        if isinstance(v, int):
            return v
        if isinstance(v, bytes | bytearray | memoryview):
            return len(v)
    return len(value) if isinstance(value, bytes | bytearray) else 0


@dataclass
class _FusedRegion:
    """One region's culled graph, computed inside its write task (see :func:`_fused`)."""

    graph: dict
    arrays: dict[str, tuple[tuple[str, ...], str, tuple, Any]]  # name: dims, key, chunks, meta
    lifted: dict[Any, Any]  # graph key: large literal value, shipped once as a future
    resources: dict


def _fused(packed: dict[str, tuple[tuple[str, ...], Any]]) -> _FusedRegion | None:
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
    arrays = [a for _, a in packed.values()]
    keys = {k for a in arrays for k in da.core.flatten(a.__dask_keys__())}
    graph = dict(HighLevelGraph.merge(*[a.__dask_graph__() for a in arrays]).cull(keys))
    if any(isinstance(v, Future) for v in graph.values()):
        return None
    lifted = {k: v.value for k, v in graph.items()
              if isinstance(v, DataNode) and _literal_nbytes(v.value) >= _LIFT_BYTES}
    for k in lifted:
        del graph[k]
    meta = {n: (dims, a.name, a.chunks, a._meta)
            for (n, (dims, _)), a in zip(packed.items(), arrays, strict=True)}
    return _FusedRegion(graph, meta, lifted, resources)


def _write_region_fused(task: _RegionTask, region: _FusedRegion, lifted_keys: list,
                        *lifted_values: Any) -> dict:
    """Compute a region's graph here, on this worker thread, then write it."""
    graph = {**region.graph, **dict(zip(lifted_keys, lifted_values, strict=True))}
    arrays = [da.Array(graph, key, chunks, meta=meta)
              for _, key, chunks, meta in region.arrays.values()]
    values = dask.compute(*arrays, scheduler="sync", optimize_graph=False)
    data = xr.Dataset({n: (spec[0], v) for (n, spec), v in
                       zip(region.arrays.items(), values, strict=True)})
    return _write_region(task, data)


def _region_data(ds: xr.Dataset, task: _RegionTask) -> xr.Dataset:
    sub = ds[list(task.variables)]
    sub = sub.isel({d: slice(*task.slices[str(d)]) for d in sub.dims})
    return sub.drop_vars(list(sub.coords))  # coordinates were written with the template


Failures = list[tuple[_RegionTask, BaseException]]


def _run_distributed(client, ds, tasks, retries, on_done, in_flight: int | None = None) -> Failures:
    """Submit regions in a rolling window of ``in_flight`` and collect them as they finish,
    so one failure loses nothing else and the scheduler never holds the graph of the whole
    store: an archive of 10^5 regions costs the scheduler a few hundred regions at a time.
    """
    from distributed import as_completed

    threads = sum(client.nthreads().values()) or 1
    limit = int(config.get("write.regions-in-flight", in_flight) or 0) or max(8, 2 * threads)
    token = dask.base.tokenize(ds, tasks)

    shared: dict[Any, Any] = {}  # lifted literal (model weights) -> its future, scattered once

    def submit(t: _RegionTask) -> Any:
        key = f"write-region-{t.id}-{token}"
        packed = _pack(_region_data(ds, t))
        fused = _fused(packed)
        if fused is None:  # persisted inputs: their chunks live on the cluster already
            with dask.annotate(region=t.id):
                graph = dask.delayed(_write_region, pure=False)(t, packed, dask_key_name=key)
            return client.compute(graph, retries=retries)
        names = list(fused.lifted)
        for k in names:
            if k not in shared:
                shared[k] = client.scatter(fused.lifted[k], hash=False)
        fused.lifted = {}
        # the partial keeps the region's graph opaque: one task per region, whose only
        # dependencies are the scattered literals
        return client.submit(functools.partial(_write_region_fused, t, fused, names),
                             *[shared[k] for k in names], key=key, retries=retries,
                             resources=fused.resources or None, pure=False)

    todo = iter(tasks)
    pending: dict[str, tuple[Any, _RegionTask]] = {}
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
                failures.append((task, err))
            else:
                on_done(record)
            del fut
            nxt = next(todo, None)
            if nxt is not None:
                new = submit(nxt)
                pending[new.key] = (new, nxt)
                running.add(new)
    finally:
        client.cancel([f for f, _ in pending.values()])
        for fut in shared.values():
            fut.release()
    return failures


def _run_local(ds, tasks, retries, on_done) -> Failures:
    """Regions in a thread pool, each computed, written and retried on its own."""
    n = max(1, min(int(dask.config.get("num_workers", None) or os.cpu_count() or 1), len(tasks)))
    # fewer regions than threads: let each region use the threaded scheduler itself
    scheduler = "sync" if len(tasks) >= n > 1 else "threads"

    def attempt(task: _RegionTask) -> dict:
        for i in range(retries + 1):
            try:
                return _write_region(task, _region_data(ds, task).compute(scheduler=scheduler))
            except Exception:
                if i == retries:
                    raise
        raise AssertionError("unreachable")

    failures: Failures = []
    with ThreadPoolExecutor(n, thread_name_prefix="engine-write") as pool:
        futures = {pool.submit(attempt, t): t for t in tasks}
        try:
            for fut in _as_completed(futures):
                err = fut.exception()
                if err is None:
                    on_done(fut.result())
                else:
                    failures.append((futures[fut], err))
        finally:
            for fut in futures:
                fut.cancel()
    return failures


def _client(client):
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


# ---------------------------------------------------------------------- public API


def write(
    ds: xr.Dataset,
    url: str,
    *,
    resume: bool = True,
    overwrite: bool = False,
    restart: bool = False,
    storage_options: dict | None = None,
    fingerprint: dict | None = None,
    region_chunks: dict | None = None,
    encoding: dict | None = None,
    client=None,
    retries: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> WriteResult:
    """Write ``ds`` to a Zarr v3 store at ``url``, resuming a previous run of the same job.

    Parameters
    ----------
    ds
        Dask-backed data variables are written region by region; coordinates and
        in-memory variables once, with the template.
    url
        Any fsspec URL: local path, ``file://``, ``s3://``, ``gs://``, ``memory://``
        (``memory://`` only when every worker lives in this process).
    resume
        Finish an existing store of the same job (same fingerprint): only regions the
        manifest does not record are computed, on the grid stored with the template.
    overwrite, restart
        Remove whatever is at ``url`` (after the plan was validated) and start fresh.
    storage_options
        fsspec options (credentials, endpoint); serialised into every task.
    fingerprint
        JSON-able identity of the job (spec, input identity, seed...). With the code
        version and the output layout it decides whether a store may be resumed.
    region_chunks
        Elements per region along each dimension, multiples of the Zarr chunk (shard);
        left-out dimensions get one dask chunk. Default: regions grown to about
        ``engine.write.region-mb``, and to at most half a thread's share of the data
        (every thread gets regions to write; a region is one task).
    encoding
        Per-variable encoding as for :meth:`xarray.Dataset.to_zarr` (``chunks``,
        ``shards``, ``compressors``...); ``chunks`` defaults to the first dask chunk.
    client
        ``distributed.Client``; default the current default client, else a local pool.
    retries
        Retries of a failing region task (default ``engine.write.retries``).
    progress
        Called as ``progress(n_done, n_total)`` once at the start and per finished region.

    Raises
    ------
    StoreError
        Misaligned chunks or regions, or ``memory://`` with a multi-process cluster.
    StoreExistsError
        Something else is at ``url`` and neither ``overwrite`` nor ``restart`` was given.
    ResumeError
        The store belongs to another job (fingerprint) or its arrays were changed.
    RegionFailedError
        A region failed every try; the finished regions stay written and recorded.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"t2m": (("time", "lat"), np.zeros((4, 6)))}).chunk({"time": 2})
    >>> res = write(ds, "memory://doc/out.zarr", overwrite=True)
    >>> res.n_regions, res.n_written
    (1, 1)
    """
    start = time.perf_counter()
    _quiet_zarr()
    if not isinstance(ds, xr.Dataset):
        raise SpecError(
            f"write() takes an xarray.Dataset, not {type(ds).__name__}; use .to_dataset()"
        )
    url, so = str(url), dict(storage_options or {})
    encoding = {k: dict(v) for k, v in (encoding or {}).items()}
    unknown = sorted(str(k) for k in encoding if k not in ds.variables)
    if unknown:
        raise SpecError(f"encoding names variables not in the dataset: {unknown}")
    retries = int(config.get("write.retries", retries))
    client = _client(client)
    if client is not None and stores.is_memory(url):
        if any(pid != os.getpid() for pid in client.run(os.getpid).values()):
            raise StoreError(
                f"cannot write {url} with a multi-process cluster: memory:// lives in one "
                "process only; write to a local path or s3:// instead"
            )

    layout = _layout(ds, encoding)
    _check_alignment(ds, layout)
    grid = _region_grid(ds, layout, region_chunks, _region_mb(ds, layout, client))
    fp = _fingerprint(ds, layout, encoding, fingerprint)
    fp_hash = hashlib.sha256(_canonical(fp).encode()).hexdigest()
    tmpl, enc = _template(ds, encoding, layout)

    fs, root = stores.filesystem(url, so)
    replace = overwrite or restart
    template = _existing(url, fs, root, so, fp, fp_hash, layout, resume=resume, replace=replace)
    if template is None:
        template = _write_template(tmpl, enc, url, fs, root, so, layout, grid, fp, fp_hash)
    tasks = _region_tasks(url, so, layout, template["regions"], fp_hash)
    done = {i for i, r in read_manifest(url, so).items() if r.get("fingerprint") == fp_hash}
    todo = [t for t in tasks if t.index not in done]
    n_skipped = len(tasks) - len(todo)

    written: list[dict] = []

    def on_done(record: dict) -> None:
        written.append(record)
        if progress is not None:
            progress(n_skipped + len(written), len(tasks))

    if progress is not None:
        progress(n_skipped, len(tasks))
    failures: Failures = []
    if todo and client is not None:
        failures = _run_distributed(client, ds, todo, retries, on_done)
    elif todo:
        failures = _run_local(ds, todo, retries, on_done)
    if failures:
        task, err = min(failures, key=lambda f: f[0].index)
        more = f" ({len(failures) - 1} more regions failed)" if len(failures) > 1 else ""
        raise RegionFailedError(
            f"{task.describe()} of {url} failed {retries + 1} time(s): {type(err).__name__}: "
            f"{err}{more}; {len(written)} other regions were written and recorded, fix the "
            "cause and re-run to resume"
        ) from err
    _consolidate(url, so)
    return WriteResult(
        url=url,
        n_regions=len(tasks),
        n_written=len(written),
        n_skipped=n_skipped,
        bytes_written=sum(r["nbytes"] for r in written),
        seconds=time.perf_counter() - start,
        regions=tuple(sorted(tuple(r["region"]) for r in written)),
    )


def verify(url: str, *, storage_options: dict | None = None) -> list[tuple[int, ...]]:
    """Recompute every recorded region's checksums from the store; return the bad ones.

    A region is bad when its values no longer match its record (a torn or overwritten
    chunk) or cannot be read. Checksums cover the decoded values, so lossy encodings
    (``scale_factor`` packing, a narrower ``dtype``) make every region look bad.
    """
    _quiet_zarr()
    so = dict(storage_options or {})
    store = stores.zarr_store(url, so, read_only=True)
    stored = xr.open_zarr(store, consolidated=False, chunks=None)
    bad = []
    for index, rec in sorted(read_manifest(url, so).items()):
        try:
            sel = {d: slice(*s) for d, s in rec["slices"].items()}
            for name in rec["variables"]:
                var = stored[name]
                values = var.isel({d: sel[d] for d in var.dims if d in sel}).values
                recorded = rec["checksums"][name]
                # records before the CRC-32 checksums hold a bare sha1 hex digest
                now = _checksum(values) if recorded.startswith("crc32:") else _digest(values)
                if now != recorded:
                    bad.append(index)
                    break
        except Exception:  # unreadable, e.g. a torn chunk, counts as bad
            bad.append(index)
    return bad
