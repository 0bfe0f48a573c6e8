"""Pure numpy kernels for train/test split assignment (no dask, no xarray)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.kernels.hashing import uniform_from_index

__all__ = ["choose_test_blocks", "block_labels", "TRAIN", "TEST", "BUFFER"]

TRAIN = np.int8(1)
TEST = np.int8(0)
BUFFER = np.int8(-1)


def choose_test_blocks(grid: Sequence[int], n_test: int, seed: int) -> np.ndarray:
    """Boolean array of shape ``grid``: True for the ``n_test`` blocks chosen as test.

    Each block gets a score that is a pure function of (its multi-index, seed); the
    ``n_test`` lowest scores are test blocks. The count is exact, unlike one coin flip
    per block, and the choice does not depend on chunking or execution order.
    """
    grid = tuple(int(g) for g in grid)
    idx = np.indices(grid, dtype=np.int64).reshape(len(grid), -1)
    score = uniform_from_index(seed, *idx)
    order = np.lexsort((np.arange(score.size), score))  # ties broken by flat index
    test = np.zeros(score.size, dtype=bool)
    test[order[:n_test]] = True
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
            sl = [slice(None)] * ext.ndim
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
