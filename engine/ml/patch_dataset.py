"""A torch ``IterableDataset`` over :func:`engine.ops.patches.iter_patches`.

Use it with ``DataLoader(PatchDataset(it), batch_size=None, num_workers=N)``: the
iterator already yields whole batches, and inside each DataLoader worker it deals the
chunk tasks across workers (``torch.utils.data.get_worker_info``), so one epoch over
``N`` workers yields every patch exactly once. Inside a worker the chunks are computed
by a local thread pool (a distributed client does not survive the fork).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset

from engine.ops.patches import PatchIterator

__all__ = ["PatchDataset"]


class PatchDataset(IterableDataset):
    """Yield ``(data, positions)`` tensors, one pair per batch of ``patches``.

    Parameters
    ----------
    patches
        The batch iterator (its ``batch_size`` is the DataLoader batch size).

    Examples
    --------
    >>> from torch.utils.data import DataLoader
    >>> from engine.ops.patches import iter_patches
    >>> from engine.testing.cubes import synthetic_cube
    >>> it = iter_patches(synthetic_cube(), size={"lat": 32, "lon": 32}, batch_size=16)
    >>> loader = DataLoader(PatchDataset(it), batch_size=None, num_workers=0)
    >>> x, pos = next(iter(loader))
    >>> tuple(x.shape), x.dtype
    ((16, 3, 32, 32), torch.float32)
    """

    def __init__(self, patches: PatchIterator) -> None:
        super().__init__()
        self.patches = patches

    def set_epoch(self, epoch: int) -> None:
        """Shuffle order of the next epoch (with ``persistent_workers`` set it per worker)."""
        self.patches.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.patches:
            data, pos = batch.data, batch.positions
            if not isinstance(data, torch.Tensor):
                data, pos = torch.from_numpy(data), torch.from_numpy(pos)
            yield data, pos
