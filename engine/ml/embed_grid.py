"""Whole-domain tile embeddings on the cluster (document 004; issue 12, section 2).

:func:`embed_grid` embeds every window of a strided grid over a ``(time, channel, y, x)``
cube, lazily: one task per time step and band of tile rows, each on whichever worker holds
its input, the model shipped once per worker as with :func:`engine.predict` (one
serialised payload in the graph, cached per process and device; a GPU worker's share of
``GPU=1`` bounds the blocks in flight). A band holds as many rows of tiles as fit in
``band_bytes`` of input, so no task ever reads a whole global field.

The result is a flat ``tile`` dimension in time-major, then row, then column order, so a
row maps back to the grid by its index as well as by its ``time_index``/``y0``/``x0``
coordinates. A tile with a missing value in any channel keeps its row: ``valid`` is
false and its embedding and statistics are NaN (the rows of a time step never depend on
the data, so two runs over one grid always line up).
"""

from __future__ import annotations

import math
import time
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from engine.errors import SpecError

__all__ = ["window_grid", "tile_statistics", "embed_grid", "STATISTICS"]

#: Columns of ``tile_statistics``.
STATISTICS = ("mean", "std", "cloud_fraction")


def window_grid(n: int, tile: int, stride: int) -> np.ndarray:
    """Start indices of windows of ``tile`` with step ``stride`` that fit in ``n``.

    >>> window_grid(10, 4, 3).tolist()
    [0, 3, 6]
    """
    if tile > n:
        return np.zeros(0, np.int64)
    return np.arange(0, n - tile + 1, stride, dtype=np.int64)


def tile_statistics(tiles: np.ndarray, threshold: float) -> np.ndarray:
    """Per tile ``(mean, std, cloud_fraction)`` of the first channel, ``(n, 3)`` float32.

    >>> tile_statistics(np.array([[[[0.0, 1.0], [0.0, 1.0]]]]), 0.5).tolist()
    [[0.5, 0.5, 0.5]]
    """
    c = tiles[:, 0].reshape(len(tiles), -1)
    return np.stack([c.mean(1), c.std(1), (c > threshold).mean(1)], axis=1).astype(np.float32)


def _embed_block(block: np.ndarray, payload: Any, *, ys: np.ndarray, xs: np.ndarray,
                 tile: int, dim: int, batch_size: int, device: str, precision: str,
                 threshold: float) -> np.ndarray:
    """One time step's band ``(1, C, rows, x)`` -> ``(tiles, dim + 4)`` float32: the
    embedding, the 3 statistics and a validity flag of each window starting at
    ``(ys[i], xs[j])`` (row-major)."""
    import torch

    from engine import meter
    from engine.ml.predict import _autocast, _execution_context, _get_model, _gpu_name, _locks

    t0 = time.perf_counter()
    step = np.asarray(block)[0]
    win = np.lib.stride_tricks.sliding_window_view(step, (tile, tile), axis=(1, 2))
    yy, xx = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    n = yy.size
    out = np.full((n, dim + 4), np.nan, np.float32)
    out[:, -1] = 0.0
    dev, lock = _execution_context(device)
    block_lock, _ = _locks(dev, lock)
    model = _get_model(payload, dev)
    with block_lock, torch.inference_mode(), _autocast(dev, precision):
        for s in range(0, n, batch_size):
            # (C, B, tile, tile) gathered from the view, then batch-first: one copy
            x = np.ascontiguousarray(win[:, yy[s:s + batch_size], xx[s:s + batch_size]]
                                     .transpose(1, 0, 2, 3), dtype=np.float32)
            ok = np.isfinite(x).all(axis=(1, 2, 3))
            if not ok.any():
                continue
            rows = np.flatnonzero(ok) + s
            xin = torch.from_numpy(x[ok]).to(dev, non_blocking=True)
            out[rows, :dim] = model(xin).float().cpu().numpy()
            out[rows, dim:dim + 3] = tile_statistics(x[ok], threshold)
            out[rows, -1] = 1.0
    meter.record("predict", items=n, pixels=int(math.prod(step.shape[1:])),
                 bytes_read=int(step.nbytes), seconds=time.perf_counter() - t0,
                 gpu=_gpu_name(dev))
    return out


def embed_grid(data: xr.DataArray, model: Any, *, tile: int, stride: int,
               batch_size: int = 256, device: str = "auto", precision: str = "fp32",
               threshold: float = 0.15, band_bytes: int = 64 * 2**20,
               resources: dict[str, float] | None = None) -> xr.Dataset:
    """Lazy embeddings of every ``tile`` x ``tile`` window with step ``stride`` over
    ``data`` ``(time, channel, y, x)``.

    Returns a Dataset on ``tile`` (time-major, then ``y0``, then ``x0``) with
    ``embedding (tile, dim)`` (NaN where invalid), ``tile_statistics (tile, statistic)``
    (:func:`tile_statistics` with ``threshold``) and ``valid (tile)``; coordinates
    ``time_index``, ``y0``, ``x0`` (the window's first pixel). ``model`` maps float32
    tiles ``(B, C, tile, tile)`` to ``(B, dim)`` and has an integer ``dim`` attribute.
    Nothing is computed here; ``.persist()`` runs it on the active cluster.
    """
    from engine.ml.device import gpu_slots
    from engine.ml.predict import serialize_model

    if tuple(data.dims) != ("time", "channel", "y", "x"):
        raise SpecError(f"embed_grid: data must be (time, channel, y, x), got {data.dims}")
    dim = getattr(model, "dim", None)
    if not isinstance(dim, int) or dim < 1:
        raise SpecError("embed_grid: the model needs an integer 'dim' (embedding size)")
    if not (tile >= 1 and stride >= 1 and batch_size >= 1):
        raise SpecError(f"embed_grid: tile={tile}, stride={stride} and "
                        f"batch_size={batch_size} must be >= 1")
    nt, nc, ny, nx = (int(v) for v in data.shape)
    ys, xs = window_grid(ny, tile, stride), window_grid(nx, tile, stride)
    if ys.size == 0 or xs.size == 0:
        raise SpecError(f"embed_grid: tiles of {tile} px do not fit the {ny} x {nx} grid")
    # rows of tiles per band: the band's input stays within band_bytes (at least one row)
    per_px_row = nc * nx * np.dtype(np.float32).itemsize
    rows = max(1, int((band_bytes // per_px_row - tile) // stride) + 1)
    bands = [(b, min(b + rows, ys.size)) for b in range(0, ys.size, rows)]
    payload = serialize_model(model)
    payload_key = dask.delayed(payload, name=f"model-{payload.digest[:16]}", pure=True,
                               traverse=False)
    src = da.asarray(data.data).astype(np.float32)
    common = {"xs": xs, "tile": tile, "dim": dim, "batch_size": int(batch_size),
              "device": device, "precision": precision, "threshold": float(threshold)}
    if resources is None and device.startswith("cuda"):
        resources = {"GPU": 1 / gpu_slots()}
    annotate = (dask.annotate(resources=dict(resources)) if resources
                else dask.annotate())
    parts = []
    with annotate:
        for t in range(nt):
            for b0, b1 in bands:
                r0, r1 = int(ys[b0]), int(ys[b1 - 1]) + tile
                # one block: this step's band of rows, every channel and column
                band = src[t:t + 1, :, r0:r1, :].rechunk(-1)
                token = dask.base.tokenize(band.name, payload.digest, common)
                parts.append(band.map_blocks(
                    _embed_block, payload_key, ys=ys[b0:b1] - r0, drop_axis=[2, 3],
                    chunks=(((b1 - b0) * xs.size,), (dim + 4,)), dtype=np.float32,
                    name=f"embed-grid-{token}", **common))
    flat = da.concatenate(parts, axis=0)
    ti, yi, xi = (a.ravel() for a in np.meshgrid(np.arange(nt), ys, xs, indexing="ij"))
    return xr.Dataset(
        {"embedding": (("tile", "dim"), flat[:, :dim]),
         "tile_statistics": (("tile", "statistic"), flat[:, dim:dim + 3],
                             {"statistics": " ".join(STATISTICS)}),
         "valid": ("tile", flat[:, -1] > 0)},
        coords={"time_index": ("tile", ti.astype(np.int32)),
                "y0": ("tile", yi.astype(np.int32)),
                "x0": ("tile", xi.astype(np.int32))},
        attrs={"engine_tile_px": tile, "engine_stride_px": stride,
               "engine_model_hash": payload.digest})
