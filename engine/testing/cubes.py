"""Synthetic dask-backed cubes for tests and benchmarks.

Every value is a pure function of its *global* index (and the seed): the same cube
computed with any chunking is bit-for-bit identical, which is what the
chunking-invariance tests of patches and predict rely on. Nothing is materialised until
a chunk is computed, so a test can build a cube far larger than memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from engine.dims import LAT, LON, TIME
from engine.kernels.hashing import uniform_from_index

__all__ = ["synthetic_cube", "DEFAULT_VARIABLES"]

DEFAULT_VARIABLES = ("t2m", "lst", "ndvi")


def _block(shape: tuple[int, ...], var: int, seed: int, nan_fraction: float,
           dims: tuple[str, ...], full: tuple[int, ...], block_info=None) -> np.ndarray:
    loc = block_info[None]["array-location"]
    idx = np.meshgrid(*[np.arange(a, b, dtype=np.int64) for a, b in loc], indexing="ij",
                      sparse=True)
    # A smooth, variable-specific field plus small hashed noise: smooth enough for
    # models to learn, noisy enough that a wrong patch offset shows up in a comparison.
    field = np.zeros(tuple(b - a for a, b in loc), np.float64)
    phase = 0.7 * var + 0.1 * seed
    for d, (name, ix) in enumerate(zip(dims, idx, strict=True)):
        n = max(full[d], 1)
        if name == TIME:
            field = field + 0.5 * np.sin(2 * np.pi * ix / 12.0 + phase)
        else:
            field = field + np.cos(2 * np.pi * (var + 1) * ix / n + phase * (d + 1))
    flat = np.asarray(sum(ix * int(np.prod(full[d + 1:], dtype=np.int64))
                          for d, ix in enumerate(idx)))
    key = np.asarray(var, np.int64)
    noise = uniform_from_index(seed, key, flat)
    field = field + 0.3 * (noise - 0.5) + 10.0 * var
    out = field.astype(np.float32)
    if nan_fraction > 0:
        gap = uniform_from_index(seed + 7919, key, flat) < nan_fraction
        out[np.broadcast_to(gap, out.shape)] = np.nan
    return out


def synthetic_cube(
    shape: Mapping[str, int] | None = None,
    chunks: Mapping[str, int] | None = None,
    variables: Sequence[str] | int = DEFAULT_VARIABLES,
    seed: int = 0,
    nan_fraction: float = 0.0,
) -> xr.Dataset:
    """A lazy float32 cube with coordinates, chunked as asked.

    Parameters
    ----------
    shape
        Dimension lengths in order, e.g. ``{"time": 8, "lat": 64, "lon": 128}`` (the default).
    chunks
        Chunk length per dimension; dimensions left out are one chunk. Default: one
        chunk per time step.
    variables
        Variable names, or a count (names ``v0, v1, ...``).
    seed
        Changes every value.
    nan_fraction
        Share of cells (independently per variable) set to NaN.

    Examples
    --------
    >>> ds = synthetic_cube({"time": 2, "lat": 8, "lon": 16}, chunks={"lat": 4})
    >>> ds["t2m"].data.chunks
    ((2,), (4, 4), (16,))
    """
    shape = dict(shape or {TIME: 8, LAT: 64, LON: 128})
    if chunks is None:
        chunks = {TIME: 1} if TIME in shape else {}
    names = [f"v{i}" for i in range(variables)] if isinstance(variables, int) else list(variables)
    dims = tuple(shape)
    full = tuple(int(shape[d]) for d in dims)
    norm = tuple(int(chunks.get(d, full[i]) or full[i]) for i, d in enumerate(dims))
    coords: dict[str, np.ndarray | pd.DatetimeIndex] = {}
    for d, n in shape.items():
        if d == LAT:
            step = 180.0 / n
            coords[d] = (90.0 - step / 2 - step * np.arange(n)).astype(np.float64)
        elif d == LON:
            step = 360.0 / n
            coords[d] = (-180.0 + step / 2 + step * np.arange(n)).astype(np.float64)
        elif d == TIME:
            coords[d] = pd.date_range("2000-01-01", periods=n, freq="D")
        else:
            coords[d] = np.arange(n)
    data_vars = {}
    for i, name in enumerate(names):
        arr = da.map_blocks(
            _block, full, i, seed, float(nan_fraction), dims, full,
            chunks=da.core.normalize_chunks(norm, full), dtype=np.float32,
            meta=np.empty((0,) * len(dims), np.float32),
            name=f"synthetic-{name}-{seed}-{nan_fraction}-" + "-".join(map(str, full + norm)),
        )
        data_vars[name] = (dims, arr, {"long_name": f"synthetic {name}"})
    return xr.Dataset(data_vars, coords=coords, attrs={"title": "cube-engine synthetic cube",
                                                       "seed": seed})
