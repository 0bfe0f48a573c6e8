"""Row access shared by the clustering modules: numpy, dask or an iterable of chunks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from engine.errors import SpecError

#: Rows per chunk when a numpy array is streamed through a chunked computation.
_CHUNK_ROWS = 65536


def _is_dask(x: Any) -> bool:
    return hasattr(x, "dask") and hasattr(x, "chunks")


def _check_2d(x: Any, name: str = "x") -> None:
    if len(getattr(x, "shape", ())) != 2:
        raise SpecError(f"{name} must be 2-D (n, d); got shape {getattr(x, 'shape', None)}")


def _iter_chunks(x: Any, batch_size: int | None = None) -> Iterator[np.ndarray]:
    """Yield ``(rows, d)`` float64 chunks of ``x`` (numpy, dask or an iterable of chunks)."""
    if _is_dask(x):
        _check_2d(x)
        x = x.rechunk({0: batch_size or x.chunks[0][0], 1: -1})
        for i in range(x.numblocks[0]):
            yield np.asarray(x.blocks[i].compute(), dtype=np.float64)
    elif isinstance(x, np.ndarray):
        _check_2d(x)
        step = batch_size or _CHUNK_ROWS
        for i in range(0, x.shape[0], step):
            yield np.asarray(x[i:i + step], dtype=np.float64)
    else:
        for chunk in x:
            c = np.asarray(chunk, dtype=np.float64)
            _check_2d(c, "each chunk")
            yield c


def _take_rows(x: Any, index: np.ndarray) -> np.ndarray:
    """``x[index]`` as float64 numpy, for numpy or dask ``x`` (one gather for dask)."""
    index = np.asarray(index)
    order = np.argsort(index, kind="stable")
    sorted_rows = x[index[order]]
    if _is_dask(sorted_rows):
        sorted_rows = sorted_rows.compute()
    out = np.empty((index.size, x.shape[1]), dtype=np.float64)
    out[order] = sorted_rows
    return out
