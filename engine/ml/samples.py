"""Stream per-pixel training samples from a dask-backed cube, chunk by chunk.

Each dask chunk of the cube is reduced *on the workers* to the samples it holds (rows
of features and target where the sample mask is true). With a distributed client those
compact sample blocks are kept on the workers (``client.compute``) and the training
process gathers a few of them at a time: the cube is never materialised in one process,
and the memory of the training process is bounded by ``buffer_chunks`` sample blocks,
not by the cube.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import dask
import numpy as np
import torch
import xarray as xr
from torch.utils.data import IterableDataset

from engine import config
from engine.kernels.hashing import hash_index

__all__ = ["PixelSamples"]


def _extract(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (features, target) where ``w``; x is (feature, *cells)."""
    keep = np.asarray(w, dtype=bool)
    xs = np.ascontiguousarray(np.asarray(x)[:, keep].T, dtype=np.float32)
    ys = np.asarray(y)[keep].astype(np.float32)
    return xs, ys


def _default_client():
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


class PixelSamples(IterableDataset):
    """An iterable of ``(x, y)`` torch batches drawn from the cells where ``where`` is true.

    Parameters
    ----------
    ds
        Dask-backed cube holding ``features`` and ``target``.
    where
        Boolean (lazy) DataArray selecting the samples, e.g. train split & valid & mask.
    batch_size
        Samples per batch. The last batch of an epoch may be smaller.
    shuffle, seed
        Seeded, epoch-aware shuffling: chunk order and samples within the shuffle buffer
        are permuted by ``(seed, epoch)``; call :meth:`set_epoch` between epochs.
    buffer_chunks
        Sample blocks mixed together (and gathered in one round trip).
    cache
        Keep the compact sample blocks on the cluster's workers between epochs.
    """

    def __init__(
        self,
        ds: xr.Dataset,
        features: Sequence[str],
        target: str,
        where: xr.DataArray,
        *,
        batch_size: int = 1024,
        shuffle: bool = True,
        seed: int = 0,
        buffer_chunks: int | None = None,
        cache: bool = True,
        client=None,
    ) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.buffer_chunks = max(1, int(config.get("train.shuffle-buffer-chunks", buffer_chunks)))
        tgt = ds[target]
        dims = tgt.dims
        x = xr.concat([ds[f].astype(np.float32) for f in features], dim="__feature__")
        x = x.transpose("__feature__", *dims)
        w = where.broadcast_like(tgt).transpose(*dims)
        x, y, w = xr.unify_chunks(x.chunk({"__feature__": -1}), tgt.astype(np.float32), w)
        xd = x.data.to_delayed().reshape(-1)  # feature axis is one chunk
        yd = y.data.to_delayed().reshape(-1)
        wd = w.data.to_delayed().reshape(-1)
        self._blocks = [dask.delayed(_extract, pure=True)(a, b, c)
                        for a, b, c in zip(xd, yd, wd, strict=True)]
        self.n_chunks = len(self._blocks)
        self._client = client if client is not None else _default_client()
        self._futures = None
        if cache and self._client is not None:
            self._futures = self._client.compute(self._blocks)
        self.n_samples: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, salt: int) -> np.random.Generator:
        key = int(hash_index(self.seed, np.int64(self.epoch), np.int64(salt)))
        return np.random.default_rng(key)

    def _gather(self, idx: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._futures is not None:
            return self._client.gather([self._futures[i] for i in idx])
        return list(dask.compute(*[self._blocks[i] for i in idx]))

    def iter_arrays(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield numpy ``(x, y)`` batches for the current epoch."""
        order = np.arange(self.n_chunks)
        if self.shuffle:
            order = self._rng(-1).permutation(order)
        carry_x = np.empty((0, 0), np.float32)
        carry_y = np.empty((0,), np.float32)
        total = 0
        for g in range(0, self.n_chunks, self.buffer_chunks):
            parts = self._gather(order[g : g + self.buffer_chunks].tolist())
            xs = [p[0] for p in parts if len(p[1])]
            ys = [p[1] for p in parts if len(p[1])]
            if not xs:
                continue
            if len(carry_y):
                xs.insert(0, carry_x)
                ys.insert(0, carry_y)
            bx, by = np.concatenate(xs), np.concatenate(ys)
            if self.shuffle:
                perm = self._rng(g).permutation(len(by))
                bx, by = bx[perm], by[perm]
            n_full = len(by) // self.batch_size * self.batch_size
            for s in range(0, n_full, self.batch_size):
                total += self.batch_size
                yield bx[s : s + self.batch_size], by[s : s + self.batch_size]
            carry_x, carry_y = bx[n_full:], by[n_full:]
        if len(carry_y):
            total += len(carry_y)
            yield carry_x, carry_y
        self.n_samples = total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.iter_arrays():
            yield torch.from_numpy(x), torch.from_numpy(y)

    def release(self) -> None:
        """Drop the cached sample blocks from the workers."""
        if self._futures is not None:
            for f in self._futures:
                f.release()
            self._futures = None
