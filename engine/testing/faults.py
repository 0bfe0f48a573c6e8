"""A small cube whose blocks count their computations and fail on request.

Used by the writer's fault-tolerance tests and benchmarks. Block values depend only on
their position, so any chunking or any re-computation gives the same bytes. Faults are
coordinated through marker files in ``workdir`` so that "the first time only" holds
across worker processes (and across a killed and restarted run).

>>> ds = counting_cube("/tmp/cube-doc", shape=(4, 4, 4), chunks=(2, 2, 2))
>>> ds["t2m"].shape
(4, 4, 4)
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from engine.dims import LAT, LON, TIME

__all__ = ["counting_cube", "count_computations"]

Block = tuple[int, ...]


def _block(
    x: np.ndarray,
    *,
    block_id: Block,
    block_info: dict,
    workdir: str,
    sleep: float,
    exit_once: frozenset[Block],
    fail_once: frozenset[Block],
    fail_always: frozenset[Block],
    nan_blocks: frozenset[Block],
) -> np.ndarray:
    marker = os.path.join(workdir, "markers", "-".join(map(str, block_id)))
    if block_id in fail_always:
        raise RuntimeError(f"injected permanent failure in block {block_id}")
    if block_id in exit_once and not os.path.exists(marker + ".exit"):
        Path(marker + ".exit").touch()
        os._exit(1)  # kill this worker process, the way an OOM kill would
    if block_id in fail_once and not os.path.exists(marker + ".fail"):
        Path(marker + ".fail").touch()
        raise OSError(f"injected transient I/O error in block {block_id}")
    if sleep:
        time.sleep(sleep)
    Path(workdir, "computed", f"{'-'.join(map(str, block_id))}.{uuid.uuid4().hex}").touch()
    if block_id in nan_blocks:
        return np.full(x.shape, np.nan, dtype=x.dtype)
    (t0, _), (y0, _), (x0, _) = block_info[None]["array-location"]
    t, y, xx = np.meshgrid(
        np.arange(t0, t0 + x.shape[0]),
        np.arange(y0, y0 + x.shape[1]),
        np.arange(x0, x0 + x.shape[2]),
        indexing="ij",
    )
    return (np.sin(0.3 * t) + 0.01 * y - 0.02 * xx).astype(x.dtype)


def counting_cube(
    workdir: str | os.PathLike,
    *,
    shape: tuple[int, int, int] = (12, 10, 8),
    chunks: tuple[int, int, int] = (4, 5, 4),
    sleep: float = 0.0,
    exit_once: Iterable[Block] = (),
    fail_once: Iterable[Block] = (),
    fail_always: Iterable[Block] = (),
    nan_blocks: Iterable[Block] = (),
) -> xr.Dataset:
    """Return a lazy (time, lat, lon) float32 cube whose blocks are instrumented.

    Parameters
    ----------
    workdir
        Folder for the marker and counter files (created).
    shape, chunks
        Cube shape and dask chunks.
    sleep
        Seconds each block sleeps, to make a run slow enough to interrupt.
    exit_once, fail_once, fail_always
        Block indices that kill their worker process the first time they run, raise
        ``OSError`` the first time, or raise ``RuntimeError`` every time.
    nan_blocks
        Block indices that are all NaN.
    """
    workdir = os.fspath(workdir)
    for sub in ("markers", "computed"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    base = da.zeros(shape, chunks=chunks, dtype="float32")
    data = base.map_blocks(
        _block,
        dtype="float32",
        workdir=workdir,
        sleep=sleep,
        exit_once=frozenset(map(tuple, exit_once)),
        fail_once=frozenset(map(tuple, fail_once)),
        fail_always=frozenset(map(tuple, fail_always)),
        nan_blocks=frozenset(map(tuple, nan_blocks)),
    )
    nt, ny, nx = shape
    return xr.Dataset(
        {"t2m": ((TIME, LAT, LON), data, {"units": "K"})},
        coords={
            TIME: np.arange(nt, dtype="int64"),
            LAT: np.linspace(-45.0, 45.0, ny),
            LON: np.linspace(0.0, 350.0, nx),
        },
        attrs={"title": "counting cube", "seed": 0},
    )


def count_computations(workdir: str | os.PathLike, block: Block | None = None) -> int:
    """How many block computations finished so far (of one block, if given)."""
    names = os.listdir(os.path.join(os.fspath(workdir), "computed"))
    if block is None:
        return len(names)
    prefix = "-".join(map(str, block)) + "."
    return sum(n.startswith(prefix) for n in names)
