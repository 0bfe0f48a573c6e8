"""Pure numpy kernels for train/test split assignment (no dask, no xarray)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from engine.kernels.hashing import uniform_from_index

__all__ = [
    "choose_test_blocks",
    "choose_test_blocks_by_cells",
    "block_extents",
    "block_labels",
    "label_counts",
    "fold_labels",
    "TRAIN",
    "TEST",
    "BUFFER",
]

TRAIN = np.int8(1)
TEST = np.int8(0)
BUFFER = np.int8(-1)


def _block_order(grid: tuple[int, ...], seed: int) -> np.ndarray:
    """Flat block numbers in the order of their score, a pure function of (index, seed)."""
    idx = np.indices(grid, dtype=np.int64).reshape(len(grid), -1)
    score = uniform_from_index(seed, *idx)
    return np.lexsort((np.arange(score.size), score))  # ties broken by flat index


def choose_test_blocks(grid: Sequence[int], n_test: int, seed: int) -> np.ndarray:
    """Boolean array of shape ``grid``: True for the ``n_test`` blocks chosen as test.

    Each block gets a score that is a pure function of (its multi-index, seed); the
    ``n_test`` lowest scores are test blocks. The count is exact, unlike one coin flip
    per block, and the choice does not depend on chunking or execution order.

    Examples
    --------
    >>> choose_test_blocks((2, 3), 2, seed=0).sum()
    np.int64(2)
    """
    grid = tuple(int(g) for g in grid)
    order = _block_order(grid, seed)
    test = np.zeros(order.size, dtype=bool)
    test[order[:n_test]] = True
    return test.reshape(grid)


def block_extents(sizes: Sequence[int], blocks: Sequence[int]) -> list[np.ndarray]:
    """Cells of each block along each dimension (the last block of a dim may be short).

    Examples
    --------
    >>> [e.tolist() for e in block_extents([23, 17], [10, 10])]
    [[10, 10, 3], [10, 7]]
    """
    out = []
    for n, b in zip(sizes, blocks, strict=True):
        starts = np.arange(0, n, b, dtype=np.int64)
        out.append(np.minimum(starts + b, n) - starts)
    return out


def _cells(extents: Sequence[np.ndarray]) -> np.ndarray:
    """Cells of every block: the outer product of the per-dimension extents."""
    cells = np.ones((), np.int64)
    for e in extents:
        cells = np.multiply.outer(cells, np.asarray(e, np.int64))
    return cells


def choose_test_blocks_by_cells(
    extents: Sequence[np.ndarray], fraction: float, seed: int
) -> np.ndarray:
    """Boolean block grid whose test blocks hold the share ``fraction`` of the cells.

    Blocks are taken in the order of their score (as :func:`choose_test_blocks`); of the
    prefixes that leave at least one test and one train block, the one whose cells come
    closest to ``fraction`` of all cells is the test set (ties: the shorter). Each block
    moves the running total by its cells, so the test share in cells is within half of
    the largest block's cells of the target, and within one block's cells when the
    closest prefix would have left no test (or no train) block. When all blocks have the
    same cells this is ``round(fraction * n_blocks)`` blocks, clipped to
    ``[1, n_blocks - 1]``. With fewer than two blocks there is no split: all False.

    Examples
    --------
    >>> ext = block_extents([25], [10])  # blocks of 10, 10 and 5 cells
    >>> choose_test_blocks_by_cells(ext, 0.2, seed=1).astype(int).tolist()  # 5 of 25 cells
    [0, 0, 1]
    """
    cells = _cells(extents)
    grid = cells.shape
    order = _block_order(grid, seed)
    if order.size < 2:
        return np.zeros(grid, dtype=bool)
    running = np.cumsum(cells.reshape(-1)[order])[:-1]  # prefixes of 1 .. n - 1 blocks
    k = 1 + int(np.argmin(np.abs(running - fraction * int(cells.sum()))))
    test = np.zeros(order.size, dtype=bool)
    test[order[:k]] = True
    return test.reshape(grid)


def _labels_for_box(
    starts: Sequence[int],
    shape: Sequence[int],
    blocks: Sequence[int],
    test_grid: np.ndarray,
) -> np.ndarray:
    """Test-membership (bool) of every cell in a box given its global start index.

    Indices may fall outside the array; they are clipped to the nearest block so the
    caller can pad a box without special cases (padding cells are discarded later).
    """
    block_idx = []
    for start, n, b, nb in zip(starts, shape, blocks, test_grid.shape, strict=True):
        i = np.arange(start, start + n, dtype=np.int64) // b
        block_idx.append(np.clip(i, 0, nb - 1))
    return test_grid[np.ix_(*block_idx)]


def block_labels(
    starts: Sequence[int],
    shape: Sequence[int],
    blocks: Sequence[int],
    test_grid: np.ndarray,
    buffer: Sequence[int],
    sizes: Sequence[int],
) -> np.ndarray:
    """Split labels (int8: 1 train, 0 test, -1 buffer) for one box of the cube.

    Parameters
    ----------
    starts, shape
        Global start index and shape of the box along each split dimension.
    blocks
        Block size along each dimension (the whole dimension for unsplit ones).
    test_grid
        Boolean block grid from :func:`choose_test_blocks`.
    buffer
        Cells of train blocks within ``buffer[d]`` cells of a test cell along every
        dimension (a box neighbourhood) become buffer.
    sizes
        Full size of each dimension; neighbours outside the cube never count.
    """
    is_test = _labels_for_box(starts, shape, blocks, test_grid)
    labels = np.where(is_test, TEST, TRAIN).astype(np.int8)
    if not any(buffer):
        return labels
    # Test membership on the box grown by the buffer, then a box max-filter.
    ext_starts = [s - w for s, w in zip(starts, buffer, strict=True)]
    ext_shape = [n + 2 * w for n, w in zip(shape, buffer, strict=True)]
    ext = _labels_for_box(ext_starts, ext_shape, blocks, test_grid)
    # Cells outside the cube are not test cells.
    for axis, (s, n, size) in enumerate(zip(ext_starts, ext_shape, sizes, strict=True)):
        g = np.arange(s, s + n)
        outside = (g < 0) | (g >= size)
        if outside.any():
            sl: list[slice | np.ndarray] = [slice(None)] * ext.ndim
            sl[axis] = outside
            ext[tuple(sl)] = False
    near = ext
    for axis, w in enumerate(buffer):
        if w:
            near = _max_filter_1d(near, axis, w)
    return np.where(is_test, TEST, np.where(near, BUFFER, TRAIN)).astype(np.int8)


def _max_filter_1d(a: np.ndarray, axis: int, w: int) -> np.ndarray:
    """Logical OR over a window of ``2w+1`` along ``axis``, output shrunk by ``w`` per side."""
    n = a.shape[axis] - 2 * w
    out = np.zeros(a.shape[:axis] + (n,) + a.shape[axis + 1 :], dtype=bool)
    for k in range(2 * w + 1):
        out |= np.take(a, np.arange(k, k + n), axis=axis)
    return out


def _segments(n: int, b: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the runs of cells along one dim that share one label pattern:
    the same block, and the same blocks within ``w`` cells (cuts at ``s``, ``s - w`` and
    ``s + w`` for each interior block boundary ``s``)."""
    cuts = {0, n, *range(b, n, b)}
    if w:
        for s in range(b, n, b):
            cuts.update((s - w, s + w))
    edges = np.array(sorted(c for c in cuts if 0 <= c <= n), np.int64)
    return edges[:-1], np.diff(edges)


def label_counts(
    blocks: Sequence[int], test_grid: np.ndarray, buffer: Sequence[int], sizes: Sequence[int],
    max_elements: int = 1 << 22,
) -> dict[str, int]:
    """Cells labelled train, test and buffer by :func:`block_labels` over the whole array.

    Computed on runs of cells with one label (at most three per block and buffered
    dim) instead of on every cell, so the cost is that of the block grid, not the cube;
    runs are visited in slabs along the first dim of at most ``max_elements`` each.

    Examples
    --------
    >>> grid = np.array([[True, False], [False, False]])
    >>> label_counts([2, 2], grid, [1, 0], [4, 4])
    {'train': 10, 'test': 4, 'buffer': 2}
    """
    ndim = len(sizes)
    segs = [_segments(int(n), int(b), int(w)) for n, b, w in zip(sizes, blocks, buffer,
                                                                   strict=True)]
    own, lo, hi = [], [], []
    for (starts, _), n, b, w in zip(segs, sizes, blocks, buffer, strict=True):
        own.append(starts // b)
        lo.append(np.maximum(starts - w, 0) // b)
        hi.append(np.minimum(starts + w, n - 1) // b)
    # any test block in the box [lo, hi] per dim: a summed-area table, inclusion-exclusion
    sat = np.pad(test_grid.astype(np.int64), [(1, 0)] * ndim)
    for axis in range(ndim):
        sat = np.cumsum(sat, axis=axis)
    inner = math.prod(len(o) for o in own[1:])
    step = max(1, max_elements // max(inner, 1))
    test = buffer_cells = total = 0
    for a in range(0, len(own[0]), step):
        sl = slice(a, a + step)
        o, lo_, hi_ = [own[0][sl], *own[1:]], [lo[0][sl], *lo[1:]], [hi[0][sl], *hi[1:]]
        is_test = test_grid[np.ix_(*o)]
        near = np.zeros(is_test.shape, np.int64)
        for corner in np.ndindex(*([2] * ndim)):
            idx = [h + 1 if c else l_ for c, l_, h in zip(corner, lo_, hi_, strict=True)]
            sign = -1 if (ndim - sum(corner)) % 2 else 1
            near += sign * sat[np.ix_(*idx)]
        weight = _cells([segs[0][1][sl], *[length for _, length in segs[1:]]])
        test += int(weight[is_test].sum())
        buffer_cells += int(weight[~is_test & (near > 0)].sum())
        total += int(weight.sum())
    return {"train": total - test - buffer_cells, "test": test, "buffer": buffer_cells}


def fold_labels(k: int, n: int, buffer: int, periodic: bool, lo: int, hi: int) -> np.ndarray:
    """Labels ``(k, hi - lo)`` of contiguous folds along a dim of ``n`` cells, cells
    ``[lo, hi)``: fold ``i`` tests the ``i``-th of ``k`` near-equal ranges, cells within
    ``buffer`` of it are -1 (wrapping around when ``periodic``), the rest train.

    Examples
    --------
    >>> fold_labels(2, 6, 1, False, 0, 6).tolist()
    [[0, 0, 0, -1, 1, 1], [1, 1, -1, 0, 0, 0]]
    """
    edges = np.linspace(0, n, k + 1).round().astype(np.int64)
    pos = np.arange(lo, hi, dtype=np.int64)
    labels = np.full((k, hi - lo), TRAIN, dtype=np.int8)
    for i in range(k):
        a, b = edges[i], edges[i + 1]
        if buffer:
            if periodic:
                dist = np.minimum((a - pos) % n, (pos - (b - 1)) % n)
            else:
                dist = np.where(pos < a, a - pos, pos - (b - 1))
            labels[i, (dist > 0) & (dist <= buffer)] = BUFFER
        labels[i, (pos >= a) & (pos < b)] = TEST
    return labels
