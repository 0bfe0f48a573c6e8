"""Train/test splits as lazy int8 variables: 1 train, 0 test, -1 buffer.

Every split here is a pure function of (global index, seed): the same on every compute,
every scheduler, every chunking and every worker count. That is what ml4xcube's
``assign_block_split`` promises and does not do (it draws from Python's global RNG at
compute time; see shared/research/peers_ml4xcube_xbatcher.md section 1.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import dask.array as da
import numpy as np
import xarray as xr

from engine.errors import CubeError, SpecError
from engine.kernels.hashing import uniform_from_index
from engine.kernels.splits import BUFFER, TEST, TRAIN, block_labels, choose_test_blocks

__all__ = ["block_split", "random_split", "geo_kfold", "TRAIN", "TEST", "BUFFER"]


def _check_dims(ds: xr.Dataset | xr.DataArray, names, what: str) -> None:
    for name in names:
        if name not in ds.dims:
            raise CubeError(
                f"{what}: dimension {name!r} is not in the cube; its dimensions are "
                f"{', '.join(map(str, ds.dims))}"
            )


def _check_fraction(test_fraction: float) -> float:
    try:
        f = float(test_fraction)
    except (TypeError, ValueError):
        raise SpecError(
            f"test_fraction must be a number in (0, 1), got {test_fraction!r}"
        ) from None
    if not 0.0 < f < 1.0:
        raise SpecError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return f


def _dim_chunks(ds: xr.Dataset | xr.DataArray, dims, fallback: Mapping[str, int]):
    """Chunks of ``ds`` along ``dims`` so the split aligns with the data it masks."""
    chunks = ds.chunksizes if hasattr(ds, "chunksizes") else {}
    out = []
    for d in dims:
        if d in chunks and chunks[d]:
            out.append(tuple(chunks[d]))
        else:
            n = ds.sizes[d]
            step = max(1, min(n, fallback.get(d, n)))
            out.append(tuple([step] * (n // step) + ([n % step] if n % step else [])))
    return tuple(out)


def block_split(
    ds: xr.Dataset | xr.DataArray,
    blocks: Mapping[str, int],
    test_fraction: float = 0.2,
    seed: int = 0,
    buffer: Mapping[str, int] | None = None,
) -> xr.DataArray:
    """Assign whole blocks of the cube to train (1) or test (0), with a buffer (-1).

    Parameters
    ----------
    ds
        The cube. Only its dimension sizes and chunks are used; nothing is computed.
    blocks
        Block size per dimension name, e.g. ``{"time": 3, "lat": 10, "lon": 10}``.
        Dimensions left out form one block along their whole length.
    test_fraction
        Share of blocks assigned to test, in (0, 1). The number of test blocks is
        ``round(test_fraction * n_blocks)``: the realised share is exact to one block.
    seed
        Seed of the assignment; the split is a pure function of (block index, seed).
    buffer
        Cells of train blocks within ``buffer[dim]`` cells of a test block (along every
        buffered dimension at once) are labelled -1, so no training patch of that
        half-width touches test data.

    Returns
    -------
    xarray.DataArray
        Lazy int8 labels over the blocked dimensions, chunked like ``ds``.

    Examples
    --------
    >>> import xarray as xr, numpy as np
    >>> ds = xr.Dataset({"t": (("lat", "lon"), np.zeros((20, 20)))}).chunk(10)
    >>> split = block_split(ds, {"lat": 5, "lon": 5}, test_fraction=0.25, seed=1)
    >>> int((split.compute() == 0).sum()) // 25  # four of the sixteen blocks
    4
    """
    if not blocks:
        raise SpecError("split.blocks must name at least one dimension, e.g. {lat: 10, lon: 10}")
    _check_dims(ds, blocks, "split.blocks")
    buffer = dict(buffer or {})
    _check_dims(ds, buffer, "split.buffer")
    f = _check_fraction(test_fraction)

    dims = [d for d in ds.dims if d in blocks or buffer.get(d)]
    sizes = [int(ds.sizes[d]) for d in dims]
    bsizes = []
    for d, n in zip(dims, sizes, strict=True):
        b = blocks.get(d, n)
        if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 1:
            raise SpecError(f"split.blocks.{d} must be a positive integer, got {b!r}")
        if b > n:
            raise SpecError(
                f"split.blocks.{d} = {b} is larger than the cube ({d} has {n} cells); "
                "use a smaller block"
            )
        bsizes.append(int(b))
    widths = []
    for d in dims:
        w = buffer.get(d, 0)
        if not isinstance(w, (int, np.integer)) or isinstance(w, bool) or w < 0:
            raise SpecError(f"split.buffer.{d} must be a non-negative integer, got {w!r}")
        widths.append(int(w))

    grid = [math.ceil(n / b) for n, b in zip(sizes, bsizes, strict=True)]
    n_blocks = int(np.prod(grid))
    n_test = int(round(f * n_blocks))
    if n_test < 1 or n_test >= n_blocks:
        raise SpecError(
            f"split: {n_blocks} blocks with test_fraction={f} gives {n_test} test blocks; "
            "use smaller blocks or another test_fraction"
        )
    test_grid = choose_test_blocks(grid, n_test, seed)

    def _block(block_info=None):
        loc = block_info[None]["array-location"]
        starts = [lo for lo, _ in loc]
        shape = [hi - lo for lo, hi in loc]
        return block_labels(starts, shape, bsizes, test_grid, widths, sizes)

    chunks = _dim_chunks(ds, dims, dict(zip(dims, bsizes, strict=True)))
    data = da.map_blocks(
        _block,
        chunks=chunks,
        dtype=np.int8,
        meta=np.empty((0,) * len(dims), np.int8),
        name=f"block-split-{seed}-"
             f"{abs(hash((tuple(bsizes), tuple(widths), f, n_test, tuple(sizes)))):x}",
    )
    coords = {d: ds[d] for d in dims if d in ds.coords}
    return xr.DataArray(
        data,
        dims=dims,
        coords=coords,
        name="split",
        attrs={
            "long_name": "train/test split",
            "flag_values": [int(TRAIN), int(TEST), int(BUFFER)],
            "flag_meanings": "train test buffer",
            "split_method": "block",
            "split_blocks": str(dict(zip(dims, bsizes, strict=True))),
            "split_buffer": str(dict(zip(dims, widths, strict=True))),
            "split_seed": int(seed),
            "split_test_fraction": f,
            "split_n_blocks": n_blocks,
            "split_n_test_blocks": n_test,
        },
    )


def random_split(
    ds: xr.Dataset | xr.DataArray,
    test_fraction: float = 0.2,
    seed: int = 0,
    dims: list[str] | None = None,
) -> xr.DataArray:
    """Assign each cell to train (1) or test (0) independently, as a pure function of its index.

    A cell-wise split leaks spatially autocorrelated neighbours between train and test;
    prefer :func:`block_split` for evaluation. Provided as the baseline of document 001.
    """
    f = _check_fraction(test_fraction)
    dims = list(dims) if dims is not None else [str(d) for d in ds.dims]
    _check_dims(ds, dims, "random_split.dims")
    sizes = [int(ds.sizes[d]) for d in dims]

    def _block(block_info=None):
        loc = block_info[None]["array-location"]
        idx = np.meshgrid(*[np.arange(lo, hi) for lo, hi in loc], indexing="ij", sparse=True)
        u = uniform_from_index(seed, *idx)
        return np.where(u < f, TEST, TRAIN).astype(np.int8)

    chunks = _dim_chunks(ds, dims, {d: n for d, n in zip(dims, sizes, strict=True)})
    data = da.map_blocks(_block, chunks=chunks, dtype=np.int8,
                         meta=np.empty((0,) * len(dims), np.int8))
    coords = {d: ds[d] for d in dims if d in ds.coords}
    return xr.DataArray(
        data, dims=dims, coords=coords, name="split",
        attrs={"long_name": "train/test split", "split_method": "random",
               "split_seed": int(seed), "split_test_fraction": f},
    )


def geo_kfold(
    ds: xr.Dataset | xr.DataArray,
    k: int = 5,
    dim: str = "lon",
    buffer: int = 0,
    periodic: bool = False,
) -> xr.DataArray:
    """Contiguous geographic folds along one dimension (document 003's longitude folds).

    Returns an int8 DataArray with dims ``("fold", dim)``: for fold ``i`` the cells of
    the ``i``-th contiguous range are test (0), cells within ``buffer`` of it are -1,
    the rest train (1). Fold sizes differ by at most one cell. With ``periodic=True``
    (global longitude) the buffer wraps around the dateline.
    """
    _check_dims(ds, [dim], "geo_kfold.dim")
    n = int(ds.sizes[dim])
    if not isinstance(k, (int, np.integer)) or k < 2 or k > n:
        raise SpecError(f"geo_kfold: k must be an integer in [2, {n}], got {k!r}")
    if buffer < 0:
        raise SpecError(f"geo_kfold: buffer must be >= 0, got {buffer}")
    edges = np.linspace(0, n, k + 1).round().astype(int)
    labels = np.full((k, n), TRAIN, dtype=np.int8)
    pos = np.arange(n)
    for i in range(k):
        lo, hi = edges[i], edges[i + 1]
        if buffer:
            if periodic:
                dist = np.minimum((lo - pos) % n, (pos - (hi - 1)) % n)
            else:
                dist = np.where(pos < lo, lo - pos, pos - (hi - 1))
            labels[i, (dist > 0) & (dist <= buffer)] = BUFFER
        labels[i, lo:hi] = TEST
    coords = {"fold": np.arange(k)}
    if dim in ds.coords:
        coords[dim] = ds[dim].values
    return xr.DataArray(
        labels, dims=("fold", dim), coords=coords, name="split",
        attrs={"long_name": "geographic k-fold split", "split_method": "geo_kfold",
               "split_k": int(k), "split_dim": dim, "split_buffer": int(buffer)},
    )
