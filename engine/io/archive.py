"""Archive stores: one Zarr store that grows along time, partition by partition.

Reprocessing a multi-year archive writes one store whose time axis is cut into
*partitions* (a year by default; a month, a day or a decade). :func:`write_archive` writes
the partitions of a lazy dataset in time order, each through the resumable writer's region
tasks (:mod:`engine.io.writer`: chunk-aligned regions, one manifest record per finished
region, retries, a rolling window on a cluster):

1. **Claim or check the store.** ``.engine/fingerprint.json`` holds the archive's
   identity (model, job without its time range, layout without the time length); another
   identity is refused unless ``restart`` (one line naming what changed).
2. **Grow the time axis.** The store's arrays are resized along time and the time
   coordinate rewritten whole (idempotent: a run killed while growing grows it again).
   A run starts at the store's first step, at a partition boundary inside the store,
   or after its last step (the caller starts it at the next step of its input, as
   :mod:`engine.pipelines.apply` does); it never prepends.
3. **Write each partition** that is not finished: its record
   ``.engine/partitions/<label>.json`` is written first (``running``, with the partition's
   input identity), then the regions the manifest does not hold, then the record again
   (``done``, with the code version, model hash, regions and seconds). A finished
   partition whose input identity is unchanged is skipped without a single write; one
   whose input changed is refused (one line) unless ``restart``.
4. **Consolidate** the metadata and record every partition's provenance in the store's
   attributes (``engine_partitions``, JSON).

Store layout beyond the writer's (:mod:`engine.io.manifest`)::

    <url>/.engine/archive.json               time dim, partition rule, unit, created_at
    <url>/.engine/partitions/<label>.json    one record per partition (provenance)

Examples
--------
>>> times = np.array(["2001-06-01", "2001-12-01", "2002-06-01"], dtype="datetime64[ns]")
>>> [(p.label, p.start, p.stop) for p in plan_partitions(times, "year")]
[('2001', 0, 2), ('2002', 2, 3)]
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import numpy as np
import xarray as xr

from engine import config
from engine._version import code_version
from engine.errors import RegionFailedError, ResumeError, SpecError, StoreError, StoreExistsError
from engine.io import stores
from engine.io.destination import check_destination
from engine.io.manifest import (
    ENGINE_PREFIX,
    FINGERPRINT,
    canonical,
    diff,
    now,
    quiet_zarr,
    read_manifest,
)
from engine.io.writer import WriteResult, run_regions
from engine.io.writer.distributed import current_client
from engine.io.writer.template import build_template, consolidate, damaged_regions
from engine.ops.regions import Region, check_alignment, plan_layout, region_grid, region_mb
from engine.redact import redact, redact_text, redact_url

__all__ = ["Every", "Partition", "ArchiveResult", "plan_partitions", "write_archive",
           "read_partitions", "stored_times", "input_identity", "ARCHIVE", "PARTITIONS",
           "TIME_UNITS"]

Every = Literal["year", "month", "day", "decade"]
ARCHIVE = f"{ENGINE_PREFIX}/archive.json"
PARTITIONS = f"{ENGINE_PREFIX}/partitions"
#: Encoding of the time coordinate of every archive store (exact for any datetime64 step
#: of a second or more, so a grown axis encodes like the first one).
TIME_UNITS = "seconds since 1970-01-01"
_UNIT = {"year": "Y", "month": "M", "day": "D"}


@dataclass(frozen=True)
class Partition:
    """One partition of the time axis: ``label`` and ``[start, stop)`` time indices."""

    label: str
    start: int
    stop: int
    first: str = ""
    last: str = ""

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ArchiveResult(WriteResult):
    """What :func:`write_archive` did: the writer's counts over every partition of the run,
    and per partition its label, status (``written``, ``resumed``, ``skipped``), regions
    written and skipped, and seconds."""

    partitions: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def _labels(times: np.ndarray, every: Every) -> list[str]:
    if every == "decade":
        years = times.astype("datetime64[Y]").astype(int) + 1970
        return [f"{y // 10 * 10}s" for y in years]
    return [str(t) for t in times.astype(f"datetime64[{_UNIT[every]}]")]


def plan_partitions(times: np.ndarray, every: Every, offset: int = 0) -> list[Partition]:
    """Cut increasing datetimes into partitions (``[start, stop)`` from ``offset``).

    Raises
    ------
    SpecError
        ``every`` is not a partition rule.
    CubeError
        The times are not datetimes or not strictly increasing.
    """
    from engine.errors import CubeError

    if every not in ("year", "month", "day", "decade"):
        raise SpecError(f"partition must be year, month, day or decade, got {every!r}")
    times = np.asarray(times)
    if times.dtype.kind != "M":
        raise CubeError(f"the time coordinate holds {times.dtype}, not datetimes: decode it "
                        "(a 360-day or other non-standard calendar needs a conversion, see "
                        "engine.io.archive_sample)")
    if times.size > 1 and not (np.diff(times) > np.timedelta64(0)).all():
        raise CubeError("the time coordinate is not strictly increasing: sort the archive by "
                        "time (ds.sortby('time')) and drop duplicate steps")
    labels = _labels(times, every)
    out: list[Partition] = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            out.append(Partition(labels[start], offset + start, offset + i,
                                 str(times[start])[:19], str(times[i - 1])[:19]))
            start = i
    return out


def _fs(url: str, so: dict) -> tuple[Any, str]:
    return stores.filesystem(url, so)


def read_partitions(url: str, storage_options: dict | None = None) -> dict[str, dict]:
    """The partition records of an archive store: label -> record (``{}`` when none)."""
    fs, root = _fs(url, dict(storage_options or {}))
    folder = f"{root}/{PARTITIONS}"
    fs.invalidate_cache(folder)
    try:
        paths = [p for p in fs.find(folder) if p.endswith(".json")]
    except FileNotFoundError:
        return {}
    out = {}
    for p in paths:
        rec = stores.get_json(fs, p)
        if isinstance(rec, dict) and "label" in rec:
            out[str(rec["label"])] = rec
    return out


def stored_times(url: str, storage_options: dict | None = None,
                 time_dim: str | None = None) -> np.ndarray | None:
    """The time coordinate of an existing archive store (datetime64[ns]), None if there is
    no archive store at ``url``."""
    import zarr

    so = dict(storage_options or {})
    fs, root = _fs(url, so)
    rec = stores.get_json(fs, f"{root}/{ARCHIVE}")
    if rec is None:
        return None
    dim = time_dim or rec["time_dim"]
    group = zarr.open_group(stores.zarr_store(url, so, read_only=True), mode="r",
                            use_consolidated=False)
    arr = _array(group, dim)
    if arr.attrs.get("units") != TIME_UNITS:
        raise StoreError(f"{redact_url(url)}: time coordinate {dim!r} is not encoded as "
                         f"{TIME_UNITS!r}; it was not written by write_archive")
    values = np.asarray(arr[:], dtype="int64")
    return (np.datetime64("1970-01-01", "ns") + values.astype("timedelta64[s]")).astype(
        "datetime64[ns]")


def _hash(obj: Any) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()


def _archive_fingerprint(ds: xr.Dataset, layout: dict, encoding: dict, identity: Mapping,
                         time_dim: str, every: str) -> dict:
    """What every partition of one archive store shares: the job's identity (model,
    inputs' entry, spec without the time range), the layout without the time length, the
    partition rule. Not the code version: each partition records its own."""
    variables = {}
    for name, lay in layout.items():
        shape = [n if d != time_dim else None for d, n in zip(lay["dims"], lay["shape"],
                                                               strict=True)]
        variables[name] = {**lay, "shape": shape}
    return {"user": redact(dict(identity)), "variables": variables, "time_dim": time_dim,
            "partition": every,
            "encoding": {str(k): {kk: str(vv) for kk, vv in v.items()}
                         for k, v in encoding.items()}}


def _time_values(times: np.ndarray) -> np.ndarray:
    secs = (times.astype("datetime64[s]") - np.datetime64("1970-01-01", "s"))
    if not (times.astype("datetime64[s]") == times).all():
        raise SpecError("time steps finer than a second cannot be archived exactly; round "
                        "the time coordinate to seconds")
    return secs.astype("int64")


def _check_time_axis(ds: xr.Dataset, time_dim: str, layout: dict) -> None:
    if time_dim not in ds.dims:
        raise SpecError(f"time dim {time_dim!r} is not a dim of the dataset "
                        f"({', '.join(map(str, ds.dims))})")
    if time_dim not in ds.coords:
        raise SpecError(f"the dataset has no {time_dim!r} coordinate: an archive store needs "
                        "the times of its steps")
    for name, var in ds.variables.items():
        if time_dim in var.dims and str(name) != time_dim and str(name) not in layout:
            raise SpecError(f"variable {name!r} has the time dim but is not dask-backed: "
                            "chunk it (ds.chunk()) or drop it; an archive grows lazy "
                            "variables only")
    for name, lay in layout.items():
        if time_dim not in lay["dims"]:
            raise SpecError(f"variable {name!r} has no {time_dim!r} dim: every lazy variable "
                            "of an archive grows along time")


def _create(ds: xr.Dataset, url: str, fs: Any, root: str, so: dict, layout: dict,
            encoding: dict, afp: dict, ahash: str, every: str, time_dim: str,
            unit: int) -> None:
    """Claim the store, write metadata and coordinates for ``ds``'s time steps."""
    enc = {**encoding, time_dim: {**encoding.get(time_dim, {}), "units": TIME_UNITS,
                                  "calendar": "proleptic_gregorian", "dtype": "int64",
                                  "chunks": (max(4096, ds.sizes[time_dim]),)}}
    tmpl, enc = build_template(ds, enc, layout)
    stores.put_json(fs, f"{root}/{FINGERPRINT}", {"hash": ahash, "fingerprint": afp,
                                                   "created_at": now(), "archive": True})
    tmpl.to_zarr(stores.zarr_store(url, so), mode="a", compute=False, consolidated=False,
                 zarr_format=3, encoding=enc)
    stores.put_json(fs, f"{root}/{ARCHIVE}", {"time_dim": time_dim, "partition": every,
                                              "unit": unit, "created_at": now()})


def _grow(url: str, so: dict, layout: dict, time_dim: str, times: np.ndarray) -> None:
    """Resize every time-dim array to ``len(times)`` and write the whole time coordinate:
    idempotent, so a run killed half-way grows the store again."""
    import zarr

    group = zarr.open_group(stores.zarr_store(url, so), mode="r+", use_consolidated=False)
    n = len(times)
    for name, lay in layout.items():
        arr = _array(group, name)
        ax = lay["dims"].index(time_dim)
        if arr.shape[ax] != n:
            arr.resize(tuple(n if i == ax else s for i, s in enumerate(arr.shape)))
    tarr = _array(group, time_dim)
    if tarr.shape[0] != n:
        tarr.resize((n,))
    tarr[:] = _time_values(times)


def _array(group: Any, name: str) -> Any:
    """The array ``name`` of a zarr group (a group there is a store we did not write)."""
    import zarr

    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise StoreError(f"{name} is a group, not an array: not an archive store")
    return arr


def _regions(part: Partition, steps: int, spatial: dict[str, list[int]], dims: list[str],
             time_dim: str, unit: int, names: tuple[str, ...]) -> list[Region]:
    """The partition's regions: time cut every ``steps`` from its start, times the spatial
    grid; the time index of a region is its start in time chunks (unique in the store)."""
    cuts = [*range(part.start, part.stop, steps), part.stop]
    axes = []
    for d in dims:
        if d == time_dim:
            axes.append([(a // unit, (a, b)) for a, b in itertools.pairwise(cuts)])
        else:
            g = spatial[d]
            axes.append([(i, (g[i], g[i + 1])) for i in range(len(g) - 1)])
    out = []
    for combo in itertools.product(*axes):
        index = tuple(i for i, _ in combo)
        slices = {d: s for d, (_, s) in zip(dims, combo, strict=True)}
        out.append(Region(index, slices, names))
    return out


def _shifted(ds: xr.Dataset, time_dim: str, offset: int) -> xr.Dataset:
    """``ds`` at store indices: ``offset`` lazy zero steps in front, never computed (the
    steps before ``offset`` belong to partitions this run does not write)."""
    if offset == 0:
        return ds
    head = xr.zeros_like(ds.isel({time_dim: np.zeros(offset, dtype=int)}))
    return xr.concat([head, ds], dim=time_dim, coords="minimal", compat="override",
                     join="override", data_vars="all")


def _set_attrs(url: str, so: dict, attrs: Mapping[str, Any], partitions: dict) -> None:
    """The store's global attributes: this run's provenance (history appended to the
    store's) and every partition's record as JSON."""
    import zarr

    group = zarr.open_group(stores.zarr_store(url, so), mode="r+", use_consolidated=False)
    old = dict(group.attrs)
    new = {k: v for k, v in attrs.items() if k != "history"}
    hist = [h for h in str(old.get("history", "")).split("\n") if h]
    for line in str(attrs.get("history", "")).split("\n"):
        if line and line not in hist:
            hist.append(line)
    if hist:
        new["history"] = "\n".join(hist)
    keys = ("label", "start", "stop", "first", "last", "status", "input_identity",
            "model_hash", "code_version", "code_versions", "finished_at")
    new["engine_partitions"] = json.dumps(
        [{k: partitions[lab].get(k) for k in keys if k in partitions[lab]}
         for lab in sorted(partitions, key=lambda lab: partitions[lab]["start"])])
    group.attrs.update(new)


def write_archive(
    ds: xr.Dataset,
    url: str,
    *,
    time_dim: str,
    every: Every = "year",
    identity: Mapping[str, Any],
    input_identity: Callable[[int, int], str] | None = None,
    model_hash: str = "",
    storage_options: dict | None = None,
    restart: bool = False,
    overwrite: bool = False,
    inputs: Sequence[str] = (),
    region_chunks: dict | None = None,
    encoding: dict | None = None,
    client: Any = None,
    retries: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_partition: Callable[[Partition, str], None] | None = None,
) -> ArchiveResult:
    """Append ``ds`` to the archive store at ``url``, partition by partition, resumably.

    Parameters
    ----------
    ds
        Lazy data variables, every one with ``time_dim``; a datetime64 time coordinate.
        Its first step is the store's first step, a step inside the store that starts a
        partition, or the step right after the store's last one.
    url, storage_options
        The store (any fsspec URL).
    time_dim, every
        The time dim and the partition rule (``year``, ``month``, ``day``, ``decade``).
    identity
        What the archive's values depend on besides the input data of each partition
        (model hash, job spec without the time range, catalog entry): a store of another
        identity is refused unless ``restart``. Stored redacted.
    input_identity
        ``input_identity(start, stop)`` for steps ``[start, stop)`` of ``ds``: the content
        identity of the input data a partition is computed from (recorded per partition;
        a finished partition whose input changed is refused unless ``restart``).
    model_hash
        Recorded in each partition's provenance.
    restart, overwrite
        Recompute the store from scratch (``restart``: a store cube-engine wrote;
        ``overwrite``: any Zarr store).
    inputs
        The input stores' URLs: the output may not overlap one.
    region_chunks, encoding, client, retries
        As for :func:`engine.io.writer.write`; ``region_chunks`` along time must divide
        into the partitions (default: regions of about ``engine.write.region-mb``).
    progress
        ``progress(done, total)`` over the regions of every partition of this run.
    on_partition
        ``on_partition(partition, status)`` when a partition is skipped, starts or ends.

    Raises
    ------
    ResumeError
        The store holds another archive (identity, layout), or a finished partition was
        computed from other input data.
    StoreError, StoreExistsError
        As for :func:`engine.io.writer.write`; also a run that would prepend to the store
        or leave a gap in its time axis.
    RegionFailedError
        A region failed every try; finished regions and partitions stay recorded.

    Examples
    --------
    >>> import dask.array as da
    >>> t = np.array(["2001-01-01", "2001-07-01", "2002-01-01"], dtype="datetime64[ns]")
    >>> ds = xr.Dataset({"v": (("time", "x"), da.ones((3, 4), chunks=(1, 4)))},
    ...                 coords={"time": t})
    >>> res = write_archive(ds.isel(time=slice(0, 2)), "memory://doc-archive/a.zarr",
    ...                     time_dim="time", identity={"model": "m1"}, overwrite=True)
    >>> [p["label"] for p in res.partitions], res.n_written
    (['2001'], 2)
    >>> res = write_archive(ds, "memory://doc-archive/a.zarr", time_dim="time",
    ...                     identity={"model": "m1"})
    >>> [(p["label"], p["status"]) for p in res.partitions]
    [('2001', 'skipped'), ('2002', 'written')]
    >>> xr.open_zarr("memory://doc-archive/a.zarr").sizes["time"]
    3
    """
    start_s = time.perf_counter()
    quiet_zarr()
    if not isinstance(ds, xr.Dataset):
        raise SpecError(f"write_archive() takes an xarray.Dataset, not {type(ds).__name__}")
    url, so = str(url), dict(storage_options or {})
    encoding = {k: dict(v) for k, v in (encoding or {}).items()}
    layout = plan_layout(ds, encoding)
    if not layout:
        raise SpecError("the dataset has no dask-backed data variable to archive")
    _check_time_axis(ds, time_dim, layout)
    check_alignment(ds, layout)
    times = np.asarray(ds[time_dim].values)
    plan_partitions(times, every)  # datetimes, increasing
    unit = 1
    for lay in layout.values():
        ax = lay["dims"].index(time_dim)
        unit = math.lcm(unit, (lay["shards"] or lay["chunks"])[ax])
    afp = _archive_fingerprint(ds, layout, encoding, identity, time_dim, every)
    ahash = _hash(afp)
    client = current_client(client)
    retries = int(config.get("write.retries", retries))

    check_destination(url, so, overwrite=overwrite, restart=restart, inputs=inputs)
    fs, root = _fs(url, so)
    if stores.store_exists(fs, root) and (restart or overwrite):
        stores.remove_store(fs, root)
    old = _existing(url, fs, root, so, afp, ahash)
    offset = 0
    if old is not None:
        offset = _offset(url, old, times)
        combined = np.concatenate([old[:offset], times])
    else:
        combined = times
    parts = [p for p in plan_partitions(combined, every) if p.stop > offset]
    if parts and parts[0].start != offset:
        raise SpecError(f"the run starts at {str(times[0])[:19]}, inside partition "
                        f"{parts[0].label} of {redact_url(url)}: start at the partition's "
                        f"first step {str(combined[parts[0].start])[:19]}")
    bad = [p.label for p in parts if p.start % unit or (p.stop % unit and p.stop != len(combined))]
    if bad:
        raise StoreError(f"partitions {', '.join(bad[:3])} do not start on a time chunk "
                         f"boundary (time chunk {unit}): regions of two partitions would "
                         "share chunks; use a time chunk that divides every partition "
                         "(output.time_chunk: 1)")

    records = read_partitions(url, so) if old is not None else {}
    idents = {p.label: (input_identity(p.start - offset, p.stop - offset)
                        if input_identity else "") for p in parts}
    for p in parts:  # refuse before anything is written
        rec = records.get(p.label)
        if rec and rec.get("status") == "done" and rec.get("start") == p.start \
                and rec.get("stop") == p.stop and rec.get("input_identity") != idents[p.label]:
            raise ResumeError(f"partition {p.label} of {redact_url(url)} was computed from "
                              "different input data (its input identity changed): pass "
                              "restart=True (CLI --restart) to recompute the archive")
        if rec and rec.get("status") != "done" and rec.get("input_identity") not in (
                None, idents[p.label]):
            raise ResumeError(f"unfinished partition {p.label} of {redact_url(url)} was "
                              "started from different input data: pass restart=True (CLI "
                              "--restart) to recompute the archive")

    if old is None:
        _create(ds, url, fs, root, so, layout, encoding, afp, ahash, every, time_dim, unit)
    elif len(combined) != len(old) or not np.array_equal(combined[:len(old)], old):
        _grow(url, so, layout, time_dim, combined)

    # regions: the spatial grid and the time step of one partition-sized piece
    longest = max((p.size for p in parts), default=1)
    probe = ds.isel({time_dim: slice(0, min(longest, ds.sizes[time_dim]))})
    threads = sum(client.nthreads().values()) if client is not None else \
        int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    grid = region_grid(probe, layout, region_chunks, region_mb(probe, layout, max(1, threads)))
    steps = max(unit, grid[time_dim][1] - grid[time_dim][0]) if len(grid[time_dim]) > 1 \
        else unit
    dims = list(grid)
    names = tuple(layout)
    plans = {p.label: _regions(p, steps, grid, dims, time_dim, unit, names) for p in parts}
    rhash = _hash({"archive": ahash, "steps": steps, "grid": {d: grid[d] for d in dims
                                                               if d != time_dim}})
    manifest = {i: r for i, r in read_manifest(url, so).items()
                if r.get("fingerprint") == rhash} if old is not None else {}
    done_regions = set(manifest) - damaged_regions(fs, root, manifest)

    n_total = sum(len(v) for v in plans.values())
    data = _shifted(ds, time_dim, offset)
    results: dict[str, dict[str, Any]] = {}
    left: dict[str, int] = {}
    owner: dict[tuple[int, ...], str] = {}
    running: dict[str, dict[str, Any]] = {}
    todo: list[Region] = []
    clock = {"last": time.perf_counter()}

    def finish(p: Partition, n_written: int) -> None:
        """Record a partition whose regions are all written (``done``, provenance)."""
        t = time.perf_counter()
        rec = records.get(p.label) or {}
        records[p.label] = {**running[p.label], "status": "done", "finished_at": now(),
                            "regions": len(plans[p.label]), "regions_written": n_written,
                            "seconds": round(t - clock["last"] + rec.get("seconds", 0.0), 3)}
        stores.put_json(fs, f"{root}/{PARTITIONS}/{p.label}.json", records[p.label])
        results[p.label]["seconds"] = t - clock["last"]
        clock["last"] = t
        if on_partition:
            on_partition(p, "done")

    by_label = {p.label: p for p in parts}
    for p in parts:
        regions = plans[p.label]
        rec = records.get(p.label) or {}
        if (rec.get("status") == "done" and rec.get("start") == p.start
                and rec.get("stop") == p.stop):  # finished: not touched
            results[p.label] = {"label": p.label, "status": "skipped", "regions_written": 0,
                                "regions_skipped": len(regions), "seconds": 0.0}
            if on_partition:
                on_partition(p, "skipped")
            continue
        mine = [r for r in regions if r.index not in done_regions]
        versions = [v for v in rec.get("code_versions", []) if v != code_version()]
        running[p.label] = {
            "label": p.label, "start": p.start, "stop": p.stop, "first": p.first,
            "last": p.last, "status": "running", "input_identity": idents[p.label],
            "model_hash": model_hash, "code_version": code_version(),
            "code_versions": [*versions, code_version()], "archive": ahash,
            "started_at": rec.get("started_at") or now()}
        stores.put_json(fs, f"{root}/{PARTITIONS}/{p.label}.json", running[p.label])
        results[p.label] = {"label": p.label,
                            "status": "resumed" if len(mine) < len(regions) else "written",
                            "regions_written": 0, "regions_skipped": len(regions) - len(mine),
                            "seconds": 0.0}
        left[p.label] = len(mine)
        owner.update({r.index: p.label for r in mine})
        todo += mine
    state = {"done": n_total - len(todo)}
    written: list[dict] = []
    if progress is not None:
        progress(state["done"], n_total)
    for label, n in left.items():
        if n == 0:  # every region recorded by a killed run: only the record is missing
            finish(by_label[label], 0)

    def on_done(record: dict) -> None:
        written.append(record)
        label = owner[tuple(record["region"])]
        results[label]["regions_written"] += 1
        left[label] -= 1
        state["done"] += 1
        if left[label] == 0:
            finish(by_label[label], results[label]["regions_written"])
        if progress is not None:
            progress(state["done"], n_total)

    # one rolling window over every partition's regions, in time order: partitions
    # overlap (a year of annual data is one region) and each is recorded as it completes
    failures = run_regions(data, url, so, todo, rhash, layout, client, retries, on_done)
    if failures:
        task, err = min(failures, key=lambda f: f[0].index)
        more = f" ({len(failures) - 1} more regions failed)" if len(failures) > 1 else ""
        raise RegionFailedError(
            f"partition {owner[task.index]}: {task.describe()} of {redact_url(url)} failed "
            f"{retries + 1} time(s): {type(err).__name__}: {redact_text(str(err))}{more}; "
            f"{len(written)} other regions and their finished partitions are recorded, fix "
            "the cause and re-run to resume") from err
    _set_attrs(url, so, ds.attrs, records)
    consolidate(url, so)
    return ArchiveResult(
        url=url, n_regions=n_total, n_written=len(written),
        n_skipped=n_total - len(written), bytes_written=sum(r["nbytes"] for r in written),
        seconds=time.perf_counter() - start_s,
        regions=tuple(sorted(tuple(r["region"]) for r in written)),
        partitions=tuple(results[p.label] for p in parts))


def _existing(url: str, fs: Any, root: str, so: dict, afp: dict,
              ahash: str) -> np.ndarray | None:
    """The stored times of the archive at ``url``; None when nothing is there. Another
    archive (identity, layout, partition rule) is one line."""
    if not stores.store_exists(fs, root):
        return None
    stored = stores.get_json(fs, f"{root}/{FINGERPRINT}")
    if stored is None:
        raise StoreExistsError(f"output store already exists and was not written by "
                               f"cube-engine: {redact_url(url)}; pass --overwrite to replace "
                               "it or choose another --output")
    if stored.get("hash") != ahash:
        fields = []
        for f in diff(stored.get("fingerprint") or {}, afp):
            name = f.removeprefix("user.")
            if name not in fields:
                fields.append(name)
        what = ", ".join(fields[:6]) or "<root>"
        raise ResumeError(f"output store {redact_url(url)} was written by a different job "
                          f"({what}): pass restart=True (CLI --restart) to recompute it, or "
                          "choose another --output")
    if stores.get_json(fs, f"{root}/{ARCHIVE}") is None:  # killed while creating it
        if read_manifest(url, so) or read_partitions(url, so):
            raise ResumeError(f"cannot resume {redact_url(url)}: its archive record is "
                              "missing; pass restart=True (CLI --restart) to recompute it")
        stores.remove_store(fs, root)
        return None
    return stored_times(url, so)


def _offset(url: str, old: np.ndarray, times: np.ndarray) -> int:
    """Where ``times`` start in the stored time axis ``old``; one line when the run would
    prepend, leave a gap or disagree with the stored steps."""
    first = times[0]
    if first < old[0]:
        raise StoreError(f"the run starts at {str(first)[:19]}, before the first step "
                         f"{str(old[0])[:19]} of {redact_url(url)}: an archive store grows "
                         "only at its end; start at or after it, or pass --restart")
    offset = int(np.searchsorted(old, first))
    if offset == len(old):
        return offset
    overlap = min(len(old) - offset, len(times))
    if not np.array_equal(old[offset:offset + overlap], times[:overlap]):
        raise StoreError(f"the input's time steps from {str(first)[:19]} differ from those "
                         f"stored in {redact_url(url)}: the archive's time axis changed; pass "
                         "--restart to recompute the store")
    return offset


def _chunk_coords(key: str) -> tuple[int, ...] | None:
    """Chunk grid coordinates of a chunk object's key below its array (zarr v3 ``c/0/1``,
    v2 ``0.1`` or ``0/1``); None for metadata objects."""
    parts = key.split("/")
    if parts and parts[0] == "c":
        parts = parts[1:]
    elif len(parts) == 1:
        parts = parts[0].split(".")
    try:
        return tuple(int(v) for v in parts)
    except ValueError:
        return None


def input_identity(ds: xr.Dataset, names: Sequence[str], time_dim: str, *,
                   url: str | None = None,
                   storage_options: dict | None = None) -> Callable[[int, int], str]:
    """``identity(start, stop)``: the content identity of the input data of time steps
    ``[start, stop)`` of ``ds``.

    For a Zarr input store (``url``): a hash of the time values and, per variable, of its
    metadata objects and of every chunk object holding one of those steps (key, size,
    ETag / checksum / modification time; no object is read), listed once per variable.
    Rewriting a year's chunks changes that year's identity only; a year appended to the
    archive changes none of the others. Without a store: a dask token of the steps' data.

    >>> import dask.array as da
    >>> t = np.array(["2001-01-01", "2002-01-01"], dtype="datetime64[ns]")
    >>> ds = xr.Dataset({"v": (("time",), da.ones(2, chunks=1))}, coords={"time": t})
    >>> ident = input_identity(ds, ["v"], "time")
    >>> ident(0, 1) == ident(0, 1), ident(0, 1) == ident(1, 2)
    (True, False)
    """
    from dask.base import tokenize

    times = np.asarray(ds[time_dim].values)
    if url is None:
        return lambda a, b: "dask:" + tokenize([ds[n].isel({time_dim: slice(a, b)}).data
                                                for n in names], times[a:b])
    import zarr

    so = dict(storage_options or {})
    fs, root = _fs(url, so)
    group = zarr.open_group(stores.zarr_store(url, so, read_only=True), mode="r")
    listings: dict[str, tuple[list[tuple[str, str]], list[tuple[tuple[int, ...], str]],
                              int, int]] = {}
    fields = ("ETag", "etag", "md5Hash", "crc32c", "checksum", "mtime", "LastModified",
              "last_modified", "updated", "created")
    for name in names:
        arr = _array(group, name)
        dims = [str(d) for d in getattr(arr.metadata, "dimension_names", None) or []]
        if not dims:
            dims = [str(d) for d in arr.attrs.get("_ARRAY_DIMENSIONS", None) or []]
        opened = [str(d) for d in ds[name].dims]
        if time_dim in dims:
            ax = dims.index(time_dim)
        elif len(dims) == len(opened) and time_dim in opened:  # renamed by the catalog
            ax = opened.index(time_dim)
        else:
            raise SpecError(f"input variable {name!r} has no {time_dim!r} dim in its store")
        found = fs.find(f"{root}/{name}", detail=True)
        meta, chunks = [], []
        for path, info in found.items():
            rel = path[len(f"{root}/{name}"):].lstrip("/")
            version = next((str(info[k]) for k in fields if info.get(k) is not None), "")
            entry = f"{rel}\0{info.get('size')}\0{version}"
            coords = _chunk_coords(rel)
            if coords is None:
                meta.append((rel, entry))
            else:
                chunks.append((coords, entry))
        listings[name] = (sorted(meta), sorted(chunks), ax, int(arr.chunks[ax]))

    def identity(a: int, b: int) -> str:
        h = hashlib.sha256(_time_values(times[a:b]).tobytes())
        for name in names:
            meta, chunks, ax, size = listings[name]
            lo, hi = a // size, (b - 1) // size
            h.update(name.encode())
            for _, entry in meta:
                h.update(entry.encode())
            for coords, entry in chunks:
                if lo <= coords[ax] <= hi:
                    h.update(entry.encode())
        return f"sha256:{h.hexdigest()}"

    return identity
