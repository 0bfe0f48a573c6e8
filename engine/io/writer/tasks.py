"""One region task: the region's data, and the function that writes it on a worker."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from engine import meter
from engine.io import stores
from engine.io.manifest import MANIFEST, checksum, now, quiet_zarr
from engine.ops.regions import Region


@dataclass(frozen=True)
class RegionTask:
    """Everything a worker needs to write one region.

    The storage options (credentials) are not in here: ``options`` is a reference to
    them in the per-process registry of :func:`engine.io.stores.share_options`.
    """

    url: str
    options: str | None
    region: Region
    fingerprint: str

    @property
    def storage_options(self) -> dict[str, Any]:
        return stores.resolve_options(self.options)

    @property
    def index(self) -> tuple[int, ...]:
        return self.region.index

    @property
    def slices(self) -> dict[str, tuple[int, int]]:
        return self.region.slices

    @property
    def variables(self) -> tuple[str, ...]:
        return self.region.variables

    @property
    def id(self) -> str:
        return self.region.id

    def describe(self) -> str:
        return self.region.describe()


def region_data(ds: xr.Dataset, task: RegionTask) -> xr.Dataset:
    sub = ds[list(task.variables)]
    sub = sub.isel({d: slice(*task.slices[str(d)]) for d in sub.dims})
    return sub.drop_vars(list(sub.coords))  # coordinates were written with the template


def pack(sub: xr.Dataset) -> dict[str, tuple[tuple[str, ...], Any]]:
    """A region as ``{name: (dims, dask array)}`` for a delayed task argument.

    Passing the ``xarray.Dataset`` itself to ``dask.delayed`` loses dependencies on the
    distributed scheduler when two variables share graph keys (a mask variable that is
    also an input of another variable): the task is cancelled with "lost dependencies".
    Plain dask arrays in a dict are merged correctly.
    """
    return {str(n): (tuple(str(d) for d in v.dims), v.data) for n, v in sub.data_vars.items()}


def unpack(packed: dict[str, tuple[tuple[str, ...], Any]]) -> xr.Dataset:
    return xr.Dataset({n: (dims, np.asarray(a)) for n, (dims, a) in packed.items()})


def write_region(task: RegionTask, data: xr.Dataset | dict) -> dict:
    """Write one computed region, then its manifest record (runs on a worker)."""
    t0 = time.perf_counter()
    quiet_zarr()
    if isinstance(data, dict):
        data = unpack(data)
    sums = {n: checksum(data[n].values) for n in sorted(task.variables)}
    region = {str(d): slice(*task.slices[str(d)]) for d in data.dims}
    so = task.storage_options
    store = stores.zarr_store(task.url, so)
    data.to_zarr(store, region=region, mode="r+", consolidated=False, zarr_format=3)
    fs, root = stores.filesystem(task.url, so)
    objects = object_sizes(fs, root, region_objects(store, task, data))
    record = {
        "region": list(task.index),
        "id": task.id,
        "slices": {d: list(s) for d, s in task.slices.items()},
        "variables": list(task.variables),
        "fingerprint": task.fingerprint,
        "nbytes": int(data.nbytes),
        "checksums": sums,
        "checksum": hashlib.sha1("".join(sums.values()).encode()).hexdigest(),
        "objects": objects,
        "finished_at": now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    stores.put_json(fs, f"{root}/{MANIFEST}/{task.id}.json", record)
    meter.record("write", items=1, pixels=math.prod(b - a for a, b in task.slices.values()),
                 bytes_written=int(data.nbytes), seconds=time.perf_counter() - t0)
    return record


def region_objects(store, task: RegionTask, data: xr.Dataset) -> list[str]:
    """Store keys of every chunk (shard) object the region's variables cover."""
    import zarr

    keys = []
    for name in task.variables:
        arr = zarr.open_array(store, path=name, mode="r")
        unit = arr.shards or arr.chunks
        ranges = []
        for dim, u in zip(data[name].dims, unit, strict=True):
            a, b = task.slices[str(dim)]
            ranges.append(range(a // u, -(-b // u)))
        keys += [f"{name}/{arr.metadata.encode_chunk_key(c)}" for c in itertools.product(*ranges)]
    return keys


def object_sizes(fs, root: str, keys: list[str]) -> dict[str, int | None]:
    """Size of each object, None where there is none (an all-fill chunk is not stored)."""
    out: dict[str, int | None] = {}
    fs.invalidate_cache(root)
    for key in keys:
        try:
            out[key] = int(fs.info(f"{root}/{key}")["size"])
        except FileNotFoundError:
            out[key] = None
    return out


Failures = list[tuple[RegionTask, BaseException]]
