"""Stream per-pixel training samples from a dask-backed cube, chunk by chunk.

:class:`PixelSamples` is :func:`engine.iter_patches` with 1 x 1 windows: each dask chunk
is one task that stacks the features, the target and the sample mask of its cells and
keeps the cells where the mask is true (``where=`` runs inside the chunk task, so only
samples leave the worker). With ``cache=True`` and a distributed client the compact
sample blocks stay on the workers between epochs and the training process gathers a few
at a time: the cube is never materialised in one process, and the memory of the training
process is bounded by ``buffer_chunks`` sample blocks, not by the cube.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import xarray as xr
from torch.utils.data import IterableDataset

from engine import config
from engine.ops.patches import PatchIterator, _active_client, iter_patches

__all__ = ["PixelSamples"]

_KEEP = "__keep__"


class _KeepFlag:
    """``where=`` of the sample stream: the mask channel is 1 (picklable for workers)."""

    def __init__(self, channel: int) -> None:
        self.channel = channel

    def __call__(self, data: np.ndarray) -> np.ndarray:
        return data[:, self.channel].reshape(len(data)) == 1  # one cell per window


class PixelSamples(IterableDataset):
    """An iterable of ``(x, y)`` torch batches drawn from the cells where ``where`` is true.

    Parameters
    ----------
    ds
        Dask-backed cube holding ``features`` and ``target``. Features with fewer dims
        than the target (e.g. a static land mask) are broadcast to the target's dims.
    where
        Boolean (lazy) DataArray selecting the samples, e.g. train split & valid & mask.
    batch_size
        Samples per batch. The last batch of an epoch may be smaller.
    shuffle, seed
        Seeded, epoch-aware shuffling: chunk order and samples within the shuffle buffer
        are permuted by ``(seed, epoch)``; call :meth:`set_epoch` between epochs.
    buffer_chunks
        Sample blocks mixed together by the shuffle (default config
        ``train.shuffle-buffer-chunks``).
    cache
        Keep the compact sample blocks on the cluster's workers between epochs (or in
        this process without a client).
    client
        Distributed client (default: the active one, if any).
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
        self.features = tuple(features)
        self.target = target
        self.batch_size = int(batch_size)
        tgt = ds[target]
        dims = tgt.dims
        cube = xr.Dataset(
            {f"x{i}": ds[f].astype(np.float32).broadcast_like(tgt).transpose(*dims)
             for i, f in enumerate(self.features)}
        )
        cube["y"] = tgt.astype(np.float32)
        cube[_KEEP] = where.broadcast_like(tgt).transpose(*dims).astype(np.float32)
        nf = len(self.features)
        self._patches: PatchIterator = iter_patches(
            cube, size={str(d): 1 for d in dims},
            variables=[*[f"x{i}" for i in range(nf)], "y", _KEEP],
            batch_size=self.batch_size, where=_KeepFlag(nf + 1), shuffle=shuffle, seed=seed,
            shuffle_buffer=max(1, int(config.get("train.shuffle-buffer-chunks", buffer_chunks))),
            client=client,
            # without a client the blocks are recomputed each epoch: caching them here
            # would hold the whole training set in this process
            cache=cache and _active_client(client) is not None,
            positions=False,  # samples need no index: it would outweigh 1x1 windows
        )
        self.n_chunks = self._patches.n_units
        self.n_samples: int | None = None

    @property
    def shuffle(self) -> bool:
        return self._patches.shuffle

    @property
    def epoch(self) -> int:
        return self._patches.epoch

    @property
    def patches(self) -> PatchIterator:
        """The underlying :class:`~engine.ops.patches.PatchIterator` (1 x 1 windows)."""
        return self._patches

    def set_epoch(self, epoch: int) -> None:
        self._patches.set_epoch(epoch)

    def iter_arrays(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield numpy ``(x (n, feature), y (n,))`` float32 batches for the current epoch."""
        nf = len(self.features)
        total = 0
        for batch in self._patches:
            flat = batch.data.reshape(len(batch.data), -1)  # (n, feature + target + keep)
            total += len(flat)
            yield np.ascontiguousarray(flat[:, :nf]), np.ascontiguousarray(flat[:, nf])
        self.n_samples = total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.iter_arrays():
            yield torch.from_numpy(x), torch.from_numpy(y)

    def release(self) -> None:
        """Drop the cached sample blocks from the workers."""
        self._patches.release()
