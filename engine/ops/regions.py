"""Region planning for the writer: Zarr layouts, chunk alignment and the region grid.

Pure functions of a dataset's shape, dask chunks and encoding; nothing here touches a
store. A *region* is a block of whole Zarr chunks (shards) that one task computes and
writes; regions never share a chunk object, so concurrent writes cannot lose data
(xarray #8371, zarr-python #3682).

>>> import dask.array as da, xarray as xr
>>> ds = xr.Dataset({"t": (("y", "x"), da.zeros((4, 6), chunks=(2, 3)))})
>>> layout = plan_layout(ds, {})
>>> layout["t"]["chunks"]
[2, 3]
>>> grid = region_grid(ds, layout, {"y": 2, "x": 6}, region_mb=64)
>>> grid
{'y': [0, 2, 4], 'x': [0, 6]}
>>> [r.id for r in plan_regions(layout, grid)]
['0.0', '1.0']
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from engine import config
from engine.errors import SpecError, StoreError

__all__ = ["Layout", "Region", "plan_layout", "check_alignment", "region_mb", "region_grid",
           "plan_regions"]

Layout = dict[str, dict[str, Any]]  # variable -> dims, shape, dtype, chunks, shards


@dataclass(frozen=True)
class Region:
    """One region of the output: its grid index, its slice per dimension, and the
    variables it writes."""

    index: tuple[int, ...]
    slices: dict[str, tuple[int, int]]
    variables: tuple[str, ...]

    @property
    def id(self) -> str:
        return ".".join(map(str, self.index))

    def describe(self) -> str:
        where = ", ".join(f"{d}={a}:{b}" for d, (a, b) in self.slices.items())
        return f"region {self.id} ({where})"


def _sizes(value: Any, ndim: int, key: str, name: Hashable) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int | np.integer):
        return (int(value),) * ndim
    if isinstance(value, list | tuple) and len(value) == ndim:
        if all(isinstance(v, int | np.integer) for v in value):
            return tuple(int(v) for v in value)
    raise SpecError(f"encoding[{name!r}][{key!r}]={value!r} must be an int or {ndim} ints")


def plan_layout(ds: xr.Dataset, encoding: Mapping[Hashable, Mapping]) -> Layout:
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


def check_alignment(ds: xr.Dataset, layout: Layout) -> None:
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


def region_mb(ds: xr.Dataset, layout: Layout, threads: int) -> float:
    """``engine.write.region-mb``, capped so that every thread gets about two regions: a
    region is computed and written by one task, so fewer regions than threads idle them."""
    total_mb = sum(ds[name].nbytes for name in layout) / 2**20
    return min(float(config.get("write.region-mb")), total_mb / (2 * max(1, threads)))


def region_grid(
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


def plan_regions(layout: Layout, grid: Mapping[str, list[int]]) -> list[Region]:
    """One region per grid cell. A variable lacking a dimension is written only by the
    regions at index 0 along it, so no two regions write the same object."""
    dims, regions = list(grid), []
    for index in itertools.product(*(range(len(grid[d]) - 1) for d in dims)):
        at = dict(zip(dims, index, strict=True))
        names = tuple(
            n for n, lay in layout.items() if all(at[d] == 0 for d in dims if d not in lay["dims"])
        )
        if names:
            slices = {d: (grid[d][i], grid[d][i + 1]) for d, i in at.items()}
            regions.append(Region(index, slices, names))
    return regions
