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
from collections.abc import Callable
from dataclasses import dataclass

import dask
import xarray as xr

from engine import config
from engine.errors import RegionFailedError, SpecError, StoreError
from engine.io import stores
from engine.io.manifest import (
    ENGINE_PREFIX,
    fingerprint_hash,
    quiet_zarr,
    read_manifest,
)
from engine.io.manifest import fingerprint as make_fingerprint
from engine.io.verify import verify
from engine.io.writer.distributed import current_client, run_distributed
from engine.io.writer.local import run_local
from engine.io.writer.tasks import Failures, RegionTask
from engine.io.writer.template import build_template, consolidate, existing, write_template
from engine.ops.regions import check_alignment, plan_layout, plan_regions, region_grid, region_mb

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
    fp = make_fingerprint(ds, layout, encoding, fingerprint)
    fp_hash = fingerprint_hash(fp)
    tmpl, enc = build_template(ds, encoding, layout)

    fs, root = stores.filesystem(url, so)
    replace = overwrite or restart
    template = existing(url, fs, root, so, fp, fp_hash, layout, resume=resume, replace=replace)
    if template is None:
        template = write_template(tmpl, enc, url, fs, root, so, layout, grid, fp, fp_hash)
    tasks = [RegionTask(url, so, r, fp_hash) for r in plan_regions(layout, template["regions"])]
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
        failures = run_distributed(client, ds, todo, retries, on_done)
    elif todo:
        failures = run_local(ds, todo, retries, on_done)
    if failures:
        task, err = min(failures, key=lambda f: f[0].index)
        more = f" ({len(failures) - 1} more regions failed)" if len(failures) > 1 else ""
        raise RegionFailedError(
            f"{task.describe()} of {url} failed {retries + 1} time(s): {type(err).__name__}: "
            f"{err}{more}; {len(written)} other regions were written and recorded, fix the "
            "cause and re-run to resume"
        ) from err
    consolidate(url, so)
    return WriteResult(
        url=url,
        n_regions=len(tasks),
        n_written=len(written),
        n_skipped=n_skipped,
        bytes_written=sum(r["nbytes"] for r in written),
        seconds=time.perf_counter() - start,
        regions=tuple(sorted(tuple(r["region"]) for r in written)),
    )
