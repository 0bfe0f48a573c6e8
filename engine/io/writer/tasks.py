"""One region task: the region's data, and the function that writes it on a worker."""

from __future__ import annotations

import hashlib
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
    """Everything a worker needs to write one region; storage options travel in here."""

    url: str
    storage_options: dict[str, Any]
    region: Region
    fingerprint: str

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
        "finished_at": now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    fs, root = stores.filesystem(task.url, task.storage_options)
    stores.put_json(fs, f"{root}/{MANIFEST}/{task.id}.json", record)
    meter.record("write", items=1, pixels=math.prod(b - a for a, b in task.slices.values()),
                 bytes_written=int(data.nbytes), seconds=time.perf_counter() - t0)
    return record


Failures = list[tuple[RegionTask, BaseException]]
