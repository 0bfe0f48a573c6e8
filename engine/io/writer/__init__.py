"""Resumable, chunk-aligned Zarr writer.

:func:`write` stores a lazy :class:`xarray.Dataset` at any fsspec URL in four steps:

1. **Plan** (:mod:`engine.ops.regions`). The Zarr chunk (and shard) of every dask-backed
   data variable comes from ``encoding`` or from the first dask chunk. Every dask chunk
   boundary must fall on a chunk (shard) boundary, otherwise two tasks write the same
   object and one silently loses the other's data (xarray #8371, zarr-python #3682):
   such plans are refused before anything is written. The output is cut into *regions*,
   a regular grid of whole chunks (shards), ragged only at the array end.
2. **Template** (:mod:`.template`). Metadata, coordinates (one object each) and in-memory
   variables are written once; lazy variables get ``compute=False`` placeholders.
3. **Regions** (:mod:`.tasks`, :mod:`.local`, :mod:`.distributed`). One task per region
   computes its slice, writes it with ``to_zarr(region=..., mode="r+")`` and then records
   it in the manifest (:mod:`engine.io.manifest`), one JSON object per region. On a
   cluster the region's culled graph runs inside that task, on one worker (no chunk
   travels, the scheduler sees one task per region, model weights are scattered once),
   and regions are submitted in a rolling window. The manifest, never the presence of
   chunk objects (all-fill chunks are not stored), says what is finished: a re-run skips
   recorded regions and redoes the others in full, which is idempotent because regions
   are aligned.
4. **Consolidate** the metadata once, after every region succeeded.

:func:`verify` (:mod:`engine.io.verify`) checks a finished store against its manifest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import xarray as xr

from engine import config
from engine.errors import RegionFailedError, SpecError, StoreError
from engine.io import stores
from engine.io.destination import check_destination
from engine.io.manifest import (
    ENGINE_PREFIX,
    fingerprint_hash,
    quiet_zarr,
    read_manifest,
)
from engine.io.manifest import fingerprint as make_fingerprint
from engine.io.verify import verify
from engine.io.writer.distributed import current_client, region_token, run_distributed
from engine.io.writer.local import run_local
from engine.io.writer.tasks import Failures, RegionTask
from engine.io.writer.template import (
    build_template,
    consolidate,
    damaged_regions,
    data_token,
    existing,
    write_template,
)
from engine.ops.regions import (
    Layout,
    Region,
    check_alignment,
    plan_layout,
    plan_regions,
    region_grid,
    region_mb,
)
from engine.redact import redact, redact_text, redact_url

__all__ = ["write", "read_manifest", "verify", "WriteResult", "ENGINE_PREFIX"]

#: Literal graph values at least this big (a model's weights) are scattered to the
#: cluster once per write instead of travelling inside every region's task.
_LIFT_BYTES = 1 << 20


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


def _threads(client) -> int:
    if client is not None:
        return sum(client.nthreads().values()) or 1
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def run_regions(data: xr.Dataset, url: str, so: dict, regions: Sequence[Region], fp_hash: str,
                layout: Layout, client: Any, retries: int,
                on_done: Callable[[dict], None]) -> Failures:
    """Write ``regions`` of ``data`` into the store at ``url`` and record each one.

    On ``client``'s workers (task keys named from :func:`.distributed.region_token`) or,
    without a client, in a thread pool here; the storage options ``so`` travel by
    reference (:func:`engine.io.stores.share_options`). ``on_done`` gets each region's
    manifest record as it lands. Returns the regions that failed ``retries + 1`` times,
    with their last error. Shared by :func:`write` and
    :func:`engine.io.archive.write_archive`.
    """
    failures: Failures = []
    with stores.share_options(so, client) as ref:
        tasks = [RegionTask(url, ref, r, fp_hash) for r in regions]
        if tasks and client is not None:
            failures = run_distributed(client, data, tasks, retries, on_done,
                                       key_token=region_token(url, so, layout, fp_hash))
        elif tasks:
            failures = run_local(data, tasks, retries, on_done)
    return failures


def write(
    ds: xr.Dataset,
    url: str,
    *,
    resume: bool = True,
    overwrite: bool = False,
    restart: bool = False,
    storage_options: dict | None = None,
    fingerprint: dict | None = None,
    identity: Mapping[str, str] | None = None,
    inputs: Sequence[str] = (),
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
        manifest does not record, or whose chunk objects are missing or have another size
        than recorded, are computed, on the grid stored with the template.
    overwrite
        Replace the Zarr store at ``url``, whoever wrote it. Never replaces a file or a
        folder that is not a Zarr store.
    restart
        Recompute a store that cube-engine wrote, whatever job wrote it.
    storage_options
        fsspec options (credentials, endpoint). They never travel inside a task: a cluster's
        workers get them through a worker plugin for the duration of the write.
    fingerprint
        JSON-able identity of the job (spec, seed...), stored redacted. With ``identity``,
        the code version and the output layout it decides whether a store may be resumed.
    identity
        What the values depend on beyond the dask graph: input store identities
        (:func:`engine.io.stores.store_identity`), model hash, job spec hash, code version.
        The default identity ``"data"`` is a dask token of every lazy variable's graph
        (its key names); a caller that knows the data's identity better (e.g. a graph
        with random key names) may give its own ``"data"`` entry. Values are redacted.
    inputs
        URLs of the input stores: the output may not be, contain or lie inside one.
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
        Misaligned chunks or regions, ``memory://`` with a multi-process cluster, an
        output overlapping an input, a destination that cannot be written or reached.
    StoreExistsError
        Something else is at ``url`` and may not be replaced as asked.
    ResumeError
        The store was written from other inputs or by another job (fingerprint), or its
        arrays were changed.
    RegionFailedError
        A region failed every try; the finished regions stay written and recorded.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"t2m": (("time", "lat"), np.zeros((4, 6)))}).chunk({"time": 2})
    >>> res = write(ds, "memory://doc/out.zarr", overwrite=True, region_chunks={"time": 2})
    >>> res.n_regions, res.n_written
    (2, 2)
    >>> write(ds, "memory://doc/out.zarr", region_chunks={"time": 2}).n_skipped
    2
    >>> from engine.errors import ResumeError
    >>> try:  # other values: the graph's token differs from the one recorded
    ...     write(ds + 1, "memory://doc/out.zarr")
    ... except ResumeError as err:
    ...     print(err)  # doctest: +NORMALIZE_WHITESPACE
    output store memory://doc/out.zarr was written from different inputs (data: the input
    values, or a model or a parameter that computes them): pass restart=True (CLI
    --restart) to recompute
    """
    start = time.perf_counter()
    quiet_zarr()
    if not isinstance(ds, xr.Dataset):
        raise SpecError(
            f"write() takes an xarray.Dataset, not {type(ds).__name__}; use .to_dataset()"
        )
    url, so = str(url), dict(storage_options or {})
    encoding = {k: dict(v) for k, v in (encoding or {}).items()}
    unknown = sorted(str(k) for k in encoding if k not in ds.variables)
    if unknown:
        raise SpecError(f"encoding names variables not in the dataset: {unknown}")
    if identity is not None and not isinstance(identity, Mapping):
        raise SpecError(f"identity must be a mapping of names to strings, not "
                        f"{type(identity).__name__}")
    retries = int(config.get("write.retries", retries))
    client = current_client(client)
    if client is not None and stores.is_memory(url):
        if any(pid != os.getpid() for pid in client.run(os.getpid).values()):
            raise StoreError(
                f"cannot write {url} with a multi-process cluster: memory:// lives in one "
                "process only; write to a local path or s3:// instead"
            )

    layout = plan_layout(ds, encoding)
    check_alignment(ds, layout)
    grid = region_grid(ds, layout, region_chunks, region_mb(ds, layout, _threads(client)))
    ident = {"data": data_token(ds, layout)}
    ident.update({str(k): str(v) for k, v in (identity or {}).items()})
    fp = make_fingerprint(ds, layout, encoding, redact(fingerprint or {}), redact(ident))
    fp_hash = fingerprint_hash(fp)
    tmpl, enc = build_template(ds, encoding, layout)

    check_destination(url, so, overwrite=overwrite, restart=restart, inputs=inputs)
    fs, root = stores.filesystem(url, so)
    replace = overwrite or restart
    template = existing(url, fs, root, so, fp, fp_hash, layout, resume=resume, replace=replace)
    if template is None:
        template = write_template(tmpl, enc, url, fs, root, so, layout, grid, fp, fp_hash)
    regions = plan_regions(layout, template["regions"])
    records = {i: r for i, r in read_manifest(url, so).items() if r.get("fingerprint") == fp_hash}
    damaged = damaged_regions(fs, root, records)
    done = set(records) - damaged

    written: list[dict] = []
    n_total = len(regions)
    n_skipped = sum(r.index in done for r in regions)

    def on_done(record: dict) -> None:
        written.append(record)
        if progress is not None:
            progress(n_skipped + len(written), n_total)

    if progress is not None:
        progress(n_skipped, n_total)
    failures = run_regions(ds, url, so, [r for r in regions if r.index not in done], fp_hash,
                           layout, client, retries, on_done)
    if failures:
        task, err = min(failures, key=lambda f: f[0].index)
        more = f" ({len(failures) - 1} more regions failed)" if len(failures) > 1 else ""
        raise RegionFailedError(
            f"{task.describe()} of {redact_url(url)} failed {retries + 1} time(s): "
            f"{type(err).__name__}: {redact_text(str(err))}{more}; {len(written)} other regions "
            "were written and recorded, fix the cause and re-run to resume"
        ) from err
    consolidate(url, so)
    return WriteResult(
        url=url,
        n_regions=n_total,
        n_written=len(written),
        n_skipped=n_skipped,
        bytes_written=sum(r["nbytes"] for r in written),
        seconds=time.perf_counter() - start,
        regions=tuple(sorted(tuple(r["region"]) for r in written)),
    )
