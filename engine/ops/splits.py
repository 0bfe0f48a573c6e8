"""Train/test splits as lazy int8 variables: 1 train, 0 test, -1 buffer.

Every split here is a pure function of (global index, seed): the same on every compute,
every scheduler, every chunking and every worker count. That is what ml4xcube's
``assign_block_split`` promises and does not do (it draws from Python's global RNG at
compute time; see shared/research/peers_ml4xcube_xbatcher.md section 1.2).

Dimensions are the cube's own: keys of ``blocks``/``buffer`` and ``dims``/``dim`` take the
cube's names or the aliases of its horizontal dims (``lat``, ``latitude``, ``y`` and
``lon``, ``longitude``, ``x``), found by CF attributes or name (:mod:`engine.dims`).
Every dask key is a token of what the labels depend on -- sizes, chunks and every
parameter -- not of the data values, which no split reads: two splits of one cube with
other parameters or chunkings compose in one graph, and a split built twice is the same
graph.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from engine.dims import cube_dims, resolve_dim, resolve_keys
from engine.errors import SpecError
from engine.kernels.hashing import uniform_from_index
from engine.kernels.splits import (
    BUFFER,
    TEST,
    TRAIN,
    block_extents,
    block_labels,
    choose_test_blocks_by_cells,
    fold_labels,
    label_counts,
)

__all__ = ["block_split", "random_split", "geo_kfold", "TRAIN", "TEST", "BUFFER"]

#: Bumped when the values a split gives for the same inputs change (part of every key).
_VERSION = 2


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


def _dim_chunks(
    ds: xr.Dataset | xr.DataArray, dims: Sequence[str], fallback: Mapping[str, int]
) -> tuple[tuple[int, ...], ...]:
    """Chunks of ``ds`` along ``dims`` so the split aligns with the data it masks."""
    chunks: Mapping[Hashable, tuple[int, ...]] = (
        ds.chunksizes if hasattr(ds, "chunksizes") else {}
    )
    out = []
    for d in dims:
        if d in chunks and chunks[d]:
            out.append(tuple(int(c) for c in chunks[d]))
        else:
            n = int(ds.sizes[d])
            step = max(1, min(n, fallback.get(d, n)))
            out.append(tuple([step] * (n // step) + ([n % step] if n % step else [])))
    return tuple(out)


def _int_option(value: object, what: str, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        kind = "a positive" if minimum > 0 else "a non-negative"
        raise SpecError(f"{what} must be {kind} integer, got {value!r}")
    return int(value)


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
        Block size per dimension, e.g. ``{"time": 3, "lat": 10, "lon": 10}``. Keys are the
        cube's dim names or the aliases ``lat``/``latitude``/``y`` and ``lon``/
        ``longitude``/``x`` of its horizontal dims (found by :func:`engine.dims.cube_dims`).
        Dimensions left out form one block along their whole length.
    test_fraction
        Target share of the *cells* assigned to test, in (0, 1). Blocks are taken in a
        seeded order until their cells come closest to ``test_fraction`` of all cells
        (keeping at least one test and one train block), so the test share in cells is
        within one block's cells of the target -- within half of the largest block's
        cells unless a single test (or train) block is already further off -- also when
        edge blocks are ragged. Masked or missing cells are not
        known here: the share is over the cells of the grid. The achieved counts are
        in the attrs ``split_test_cells``, ``split_train_cells``, ``split_buffer_cells``,
        ``split_total_cells`` and ``split_test_share_cells`` (cells of the returned
        array, i.e. of the blocked dims).
    seed
        Seed of the assignment; the split is a pure function of (block index, seed).
    buffer
        Cells of train blocks within ``buffer[dim]`` cells of a test block (along every
        buffered dimension at once) are labelled -1, so no training patch of that
        half-width touches test data. Keys as for ``blocks``.

    Returns
    -------
    xarray.DataArray
        Lazy int8 labels over the blocked dimensions, chunked like ``ds``. Its dask keys
        are a token of everything the labels depend on (sizes, chunks, blocks, buffer,
        fraction, seed): two different splits compose in one graph, the same split built
        twice has the same keys.

    Examples
    --------
    >>> import xarray as xr, numpy as np
    >>> ds = xr.Dataset({"t": (("lat", "lon"), np.zeros((20, 20)))}).chunk(10)
    >>> split = block_split(ds, {"lat": 5, "lon": 5}, test_fraction=0.25, seed=1)
    >>> int((split.compute() == 0).sum()) // 25  # four of the sixteen blocks
    4
    >>> split.attrs["split_test_share_cells"]
    0.25
    """
    if not blocks:
        raise SpecError("split.blocks must name at least one dimension, e.g. {lat: 10, lon: 10}")
    blocks = resolve_keys(ds, blocks, "split.blocks")
    buffer = resolve_keys(ds, dict(buffer or {}), "split.buffer")
    f = _check_fraction(test_fraction)
    seed = int(seed)

    dims = [str(d) for d in ds.dims if d in blocks or buffer.get(str(d))]
    sizes = [int(ds.sizes[d]) for d in dims]
    bsizes = []
    for d, n in zip(dims, sizes, strict=True):
        b = _int_option(blocks.get(d, n), f"split.blocks.{d}", 1)
        if b > n:
            raise SpecError(
                f"split.blocks.{d} = {b} is larger than the cube ({d} has {n} cells); "
                "use a smaller block"
            )
        bsizes.append(b)
    widths = [_int_option(buffer.get(d, 0), f"split.buffer.{d}", 0) for d in dims]

    grid = [math.ceil(n / b) for n, b in zip(sizes, bsizes, strict=True)]
    n_blocks = int(np.prod(grid))
    if n_blocks < 2:
        raise SpecError(
            f"split: the blocks {dict(zip(dims, bsizes, strict=True))} make {n_blocks} "
            "block, which cannot hold test and train blocks; use smaller blocks"
        )
    test_grid = choose_test_blocks_by_cells(block_extents(sizes, bsizes), f, seed)
    n_test = int(test_grid.sum())
    counts = label_counts(bsizes, test_grid, widths, sizes)
    total = int(np.prod(sizes))

    def _block(block_info=None):
        loc = block_info[None]["array-location"]
        starts = [lo for lo, _ in loc]
        shape = [hi - lo for lo, hi in loc]
        return block_labels(starts, shape, bsizes, test_grid, widths, sizes)

    chunks = _dim_chunks(ds, dims, dict(zip(dims, bsizes, strict=True)))
    token = tokenize(_VERSION, dims, sizes, chunks, bsizes, widths, f, seed)
    data = da.map_blocks(
        _block,
        chunks=chunks,
        dtype=np.int8,
        meta=np.empty((0,) * len(dims), np.int8),
        name=f"block-split-{token}",
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
            # JSON, so provenance and metrics carry values, not Python reprs
            "split_blocks": json.dumps(dict(zip(dims, bsizes, strict=True))),
            "split_buffer": json.dumps(dict(zip(dims, widths, strict=True))),
            "split_seed": seed,
            "split_test_fraction": f,
            "split_n_blocks": n_blocks,
            "split_n_test_blocks": n_test,
            "split_total_cells": total,
            "split_test_cells": counts["test"],
            "split_train_cells": counts["train"],
            "split_buffer_cells": counts["buffer"],
            "split_test_share_cells": counts["test"] / total,
        },
    )


def random_split(
    ds: xr.Dataset | xr.DataArray,
    test_fraction: float = 0.2,
    seed: int = 0,
    dims: Sequence[str] | None = None,
) -> xr.DataArray:
    """Assign each cell to train (1) or test (0) independently, as a pure function of its index.

    A cell-wise split leaks spatially autocorrelated neighbours between train and test;
    prefer :func:`block_split` for evaluation. Provided as the baseline of document 001.
    ``dims`` (default: all of the cube's) accepts the cube's names and the horizontal
    aliases. The dask keys are a token of the sizes, chunks, fraction and seed.

    Examples
    --------
    >>> import xarray as xr, numpy as np
    >>> ds = xr.Dataset({"t": (("y", "x"), np.zeros((100, 100)))}).chunk(30)
    >>> split = random_split(ds, test_fraction=0.3, seed=0)
    >>> round(float((split == 0).mean()), 1)
    0.3
    """
    f = _check_fraction(test_fraction)
    seed = int(seed)
    names = list(dims) if dims is not None else [str(d) for d in ds.dims]
    resolved = list(resolve_keys(ds, dict.fromkeys(names), "random_split.dims"))
    # the hash runs over the index in the cube's dim order, whatever order dims= gives
    order = [str(d) for d in ds.dims if d in resolved]
    sizes = [int(ds.sizes[d]) for d in order]

    def _block(block_info=None):
        loc = block_info[None]["array-location"]
        idx = np.meshgrid(*[np.arange(lo, hi) for lo, hi in loc], indexing="ij", sparse=True)
        u = uniform_from_index(seed, *idx)
        return np.where(u < f, TEST, TRAIN).astype(np.int8)

    chunks = _dim_chunks(ds, order, dict(zip(order, sizes, strict=True)))
    token = tokenize(_VERSION, order, sizes, chunks, f, seed)
    data = da.map_blocks(_block, chunks=chunks, dtype=np.int8,
                         meta=np.empty((0,) * len(order), np.int8),
                         name=f"random-split-{token}")
    coords = {d: ds[d] for d in order if d in ds.coords}
    return xr.DataArray(
        data, dims=order, coords=coords, name="split",
        attrs={"long_name": "train/test split", "split_method": "random",
               "split_seed": seed, "split_test_fraction": f},
    )


def geo_kfold(
    ds: xr.Dataset | xr.DataArray,
    k: int = 5,
    dim: str | None = None,
    buffer: int = 0,
    periodic: bool = False,
) -> xr.DataArray:
    """Contiguous geographic folds along one dimension (document 003's longitude folds).

    Returns a lazy int8 DataArray with dims ``("fold", dim)``, chunked like ``ds`` along
    ``dim``: for fold ``i`` the cells of the ``i``-th contiguous range are test (0), cells
    within ``buffer`` of it are -1, the rest train (1). Fold sizes differ by at most one
    cell. With ``periodic=True`` (global longitude) the buffer wraps around the dateline.
    ``dim`` defaults to the cube's x (longitude) dim (:func:`engine.dims.cube_dims`) and
    accepts the cube's names and the horizontal aliases.

    Examples
    --------
    >>> import xarray as xr, numpy as np
    >>> ds = xr.Dataset({"t": (("COADSY", "COADSX"), np.zeros((2, 6)))})
    >>> folds = geo_kfold(ds, k=3)  # COADSX is the x dim by name
    >>> folds.dims, folds.values[1].tolist()
    (('fold', 'COADSX'), [1, 1, 0, 0, 1, 1])
    """
    if dim is None:
        x = cube_dims(ds).x
        if x is None:
            raise SpecError("geo_kfold: cannot tell which dim is x (longitude); pass dim= one "
                            f"of the cube's dims: {', '.join(map(str, ds.dims))}")
        dim = x
    else:
        dim = resolve_dim(ds, dim, "geo_kfold.dim")
    n = int(ds.sizes[dim])
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2 or k > n:
        raise SpecError(f"geo_kfold: k must be an integer in [2, {n}], got {k!r}")
    if not isinstance(buffer, (int, np.integer)) or isinstance(buffer, bool) or buffer < 0:
        raise SpecError(f"geo_kfold: buffer must be an integer >= 0, got {buffer!r}")
    k, buffer, periodic = int(k), int(buffer), bool(periodic)
    (chunks,) = _dim_chunks(ds, [dim], {dim: n})

    def _block(block_info=None):
        (_, (lo, hi)) = block_info[None]["array-location"]
        return fold_labels(k, n, buffer, periodic, lo, hi)

    token = tokenize(_VERSION, dim, n, chunks, k, buffer, periodic)
    data = da.map_blocks(_block, chunks=((k,), chunks), dtype=np.int8,
                         meta=np.empty((0, 0), np.int8), name=f"geo-kfold-{token}")
    coords: dict[str, object] = {"fold": np.arange(k)}
    if dim in ds.coords:
        coords[dim] = ds[dim]
    return xr.DataArray(
        data, dims=("fold", dim), coords=coords, name="split",
        attrs={"long_name": "geographic k-fold split", "split_method": "geo_kfold",
               "split_k": k, "split_dim": dim, "split_buffer": buffer,
               "split_periodic": int(periodic)},
    )
