"""Patch sampling for training: label-centred patches inside a region, chunk by chunk.

Document 003 trains its glacier UNet on 256 x 256 patches *centred on a glacier* (which
balances the classes) and evaluates on geographic folds. :func:`sample_patches` gives that
sampling on any dask-backed cube, through :func:`engine.ops.patches.iter_patches`: one task
per chunk, the whole cube never in one process.

A window is kept when

* every pixel of it lies in ``region`` (e.g. the training longitudes of a fold, with the
  validation sector and the buffer around the test sector removed), so no kept patch
  touches a pixel outside the region -- the no-leakage guarantee does not depend on the
  buffer width; and
* its centre pixel is labelled (``centre`` is 1 there), or, for a share ``random_share``
  of the other windows, a seeded hash of the centre's global index says so. The hash is a
  pure function of (index, seed) (:func:`engine.kernels.hashing.uniform_from_index`): the
  same windows are kept on every chunking, worker count and run.

Standardisation statistics come from the region only (:func:`region_statistics`): one
distributed pass of sums, never the test data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from engine.dims import cube_dims, resolve_keys
from engine.errors import CubeError, SpecError
from engine.kernels.hashing import uniform_from_index
from engine.ops.patches import PatchBatch, PatchIterator, iter_patches

__all__ = ["SampledPatches", "sample_patches", "region_statistics", "hash_field"]

_REGION = "__sampling_region"
_CENTRE = "__sampling_centre"
_HASH = "__sampling_hash"


class _Keep:
    """``where=`` rule of :func:`sample_patches` (picklable: it runs in the chunk tasks)."""

    def __init__(self, region: int, centre: int | None, hash_: int | None,
                 random_share: float) -> None:
        self.region, self.centre, self.hash, self.random_share = region, centre, hash_, \
            random_share

    def __call__(self, data: np.ndarray) -> np.ndarray:
        spatial = tuple(range(1, data.ndim - 1))
        keep = (data[:, self.region] == 1).all(axis=spatial)
        if self.centre is None:
            return keep
        mid = (slice(None),) + tuple(s // 2 for s in data.shape[2:])
        labelled = data[:, self.centre][mid] == 1
        assert self.hash is not None
        chosen = data[:, self.hash][mid] < self.random_share
        return keep & (labelled | chosen)


def hash_field(like: xr.DataArray, seed: int) -> xr.DataArray:
    """Uniform [0, 1) float32 per pixel, a pure function of (global index, seed), lazy and
    chunked like ``like`` (2-D).

    >>> import xarray as xr, numpy as np
    >>> a = xr.DataArray(np.zeros((4, 6)), dims=("y", "x")).chunk(2)
    >>> h = hash_field(a, 1).values
    >>> bool(((h >= 0) & (h < 1)).all()), np.array_equal(h, hash_field(a.chunk(3), 1).values)
    (True, True)
    """
    if like.ndim != 2:
        raise SpecError(f"hash_field needs a 2-D array, got dims {like.dims}")
    data = like.data if isinstance(like.data, da.Array) else da.from_array(like.data)

    def _block(block_info: Any = None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        yy, xx = np.meshgrid(np.arange(y0, y1), np.arange(x0, x1), indexing="ij", sparse=True)
        return uniform_from_index(int(seed), yy, xx).astype(np.float32)

    token = tokenize("sampling-hash", like.shape, data.chunks, int(seed))
    out = da.map_blocks(_block, chunks=data.chunks, dtype=np.float32,
                        meta=np.empty((0, 0), np.float32), name=f"sampling-hash-{token}")
    return xr.DataArray(out, dims=like.dims, coords=like.coords)


@dataclass
class SampledPatches:
    """Iterable of :class:`~engine.ops.patches.PatchBatch` holding only ``variables`` (the
    region, centre and hash channels used for the filter are dropped); ``iterator`` is the
    underlying :class:`~engine.ops.patches.PatchIterator`."""

    iterator: PatchIterator
    n_channels: int

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order of the next pass."""
        self.iterator.set_epoch(epoch)

    def release(self) -> None:
        """Free cached chunk results (``cache=True``)."""
        self.iterator.release()

    @property
    def n_windows(self) -> int:
        """Windows on the grid before filtering."""
        return self.iterator.n_windows

    def __iter__(self) -> Iterator[PatchBatch]:
        for batch in self.iterator:
            yield PatchBatch(np.ascontiguousarray(batch.data[:, :self.n_channels]),
                             batch.positions)


def sample_patches(
    ds: xr.Dataset,
    variables: Sequence[str],
    region: xr.DataArray,
    *,
    size: Mapping[str, int],
    stride: Mapping[str, int] | int | None = None,
    centre: xr.DataArray | None = None,
    random_share: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    shuffle: bool = True,
    epoch: int = 0,
    cache: bool = False,
    client: Any = None,
    prefetch: int | None = None,
) -> SampledPatches:
    """Patches of ``variables`` lying wholly inside ``region``, optionally label-centred.

    Parameters
    ----------
    ds
        Dask-backed cube with 2-D (y, x) variables.
    variables
        Variables stacked as the patch channels, in this order (e.g. features, then label).
    region
        Boolean or 0/1 array on the cube's (y, x) dims (or broadcastable to them): only
        windows whose every pixel is in the region are produced.
    size, stride
        Patch size and window step per dim (keys: the cube's dims or ``lat``/``lon``
        aliases); default stride = size.
    centre
        0/1 array on (y, x): keep windows whose centre pixel is 1 (document 003's
        glacier-centred patches) plus ``random_share`` of the others. None: every window
        in the region.
    random_share
        Share in [0, 1] of the not-centred windows kept, chosen by a hash of the centre
        pixel's global index and ``seed``.
    seed, shuffle, epoch, batch_size, cache, client, prefetch
        As :func:`~engine.ops.patches.iter_patches` (``seed`` also seeds the hash).

    Returns
    -------
    SampledPatches
        Iterable of batches ``(n, len(variables), *size)`` float32 with their positions.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> lab = np.zeros((8, 8), np.float32); lab[2, 2] = 1
    >>> ds = xr.Dataset({"label": (("y", "x"), lab)}).chunk(4)
    >>> inside = xr.DataArray(np.ones((8, 8), bool), dims=("y", "x"))
    >>> s = sample_patches(ds, ["label"], inside, size={"y": 4, "x": 4}, stride=2,
    ...                    centre=ds["label"], shuffle=False)
    >>> [b.positions.tolist() for b in s]   # the one window centred on (2, 2)
    [[[0, 0]]]
    """
    names = list(variables)
    missing = [v for v in names if v not in ds.data_vars]
    if missing or not names:
        raise CubeError(f"variables {missing or names} are not in the cube (it has "
                        f"{list(map(str, ds.data_vars))}); name variables that exist")
    if not 0.0 <= float(random_share) <= 1.0:
        raise SpecError(f"random_share must be in [0, 1], got {random_share}")
    y, x = cube_dims(ds[names[0]]).horizontal
    like = ds[names[0]]
    if set(like.dims) != {y, x}:
        raise CubeError(f"sample_patches needs 2-D (y, x) variables; {names[0]!r} has dims "
                        f"{like.dims}: select one time step first")
    resolve_keys(ds, dict(size), "size")

    def _on_grid(a: xr.DataArray, what: str) -> xr.DataArray:
        extra = [d for d in a.dims if d not in (y, x)]
        if extra:
            raise CubeError(f"{what} has dims {extra} that the cube's (y, x) = ({y}, {x}) "
                            "do not have")
        a = a.astype(np.float32).broadcast_like(like).transpose(*like.dims)
        return a.chunk(dict(zip(like.dims, like.chunks or (), strict=False)))

    work = {v: ds[v] for v in names}
    work[_REGION] = _on_grid(region, "region")
    chans = [*names, _REGION]
    centre_i = hash_i = None
    if centre is not None:
        work[_CENTRE] = _on_grid(centre, "centre")
        work[_HASH] = _on_grid(hash_field(like, seed), "hash")
        chans += [_CENTRE, _HASH]
        centre_i, hash_i = chans.index(_CENTRE), chans.index(_HASH)
    rule = _Keep(chans.index(_REGION), centre_i, hash_i, float(random_share))
    it = iter_patches(xr.Dataset(work), size=size, stride=stride, variables=chans,
                      batch_size=batch_size, where=rule, shuffle=shuffle, seed=seed,
                      epoch=epoch, cache=cache, client=client, prefetch=prefetch)
    return SampledPatches(it, len(names))


def region_statistics(ds: xr.Dataset, variables: Sequence[str],
                      region: xr.DataArray) -> tuple[list[float], list[float], int]:
    """Per-variable mean and standard deviation over the pixels of ``region`` (finite values
    only), in one dask pass; and the number of region pixels.

    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"a": (("y", "x"), np.arange(6.).reshape(2, 3))}).chunk(1)
    >>> region_statistics(ds, ["a"], ds["a"] < 3)
    ([1.0], [0.816496580927726], 3)
    """
    mask = region.astype(bool)
    sums = []
    for v in variables:
        val = ds[v].astype(np.float64)
        ok = mask & np.isfinite(val)
        sums.append((val.where(ok).sum(), (val.where(ok) ** 2).sum(), ok.sum()))
    n_region = mask.broadcast_like(ds[variables[0]]).sum()
    computed, n_px = dask.compute(sums, n_region)
    means, stds = [], []
    for s1, s2, n in computed:
        n = int(n)
        if n == 0:
            raise CubeError("the training region holds no finite pixel: check the split and "
                            "the variables")
        mean = float(s1) / n
        means.append(mean)
        stds.append(float(np.sqrt(max(float(s2) / n - mean * mean, 0.0))))
    return means, stds, int(n_px)
