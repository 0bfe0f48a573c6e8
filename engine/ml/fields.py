"""Models of whole 2-D fields: document 000's regression CNN and its standardising wrapper.

``unidata_cnn``
    The network of the Unidata post (document 000): ``Conv2D(32, 5x5, 'same')``, ELU,
    ``Conv2D(32, 5x5, 'same')``, ELU, ``Conv2D(1, 5x5, 'same')``, no output activation
    (a regression). Registered in :mod:`engine.ml.registry` as ``unidata_cnn``.
:class:`FieldStandardized`
    ``y = net((x - x_mean) / x_std) * y_std + y_mean`` with the training statistics as
    buffers, either one value per channel (``field``) or one per channel and grid cell
    (``cell``: the network sees anomalies from the training mean field and predicts the
    target's anomaly). The saved ``state_dict`` maps raw fields to raw fields, so
    :func:`engine.predict` needs nothing but the checkpoint.
:class:`FieldBatches`
    Batches of ``(x, y)`` fields for :func:`engine.ml.train.train_model`, reshuffled per
    epoch from ``(seed, epoch)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset

from engine.errors import SpecError
from engine.ml.registry import register_architecture

__all__ = ["UnidataCNN", "unidata_cnn", "FieldStandardized", "FieldBatches"]


class UnidataCNN(nn.Module):
    """Document 000's CNN: two ``filters``-wide ``kernel_size`` convolutions with ELU, then
    one ``kernel_size`` convolution to ``out_channels``; 'same' (zero) padding throughout.

    Examples
    --------
    >>> net = UnidataCNN(2)
    >>> net(torch.zeros(3, 2, 61, 120)).shape
    torch.Size([3, 1, 61, 120])
    >>> sum(p.numel() for p in net.parameters())
    28065
    """

    def __init__(self, in_channels: int, out_channels: int = 1, filters: int = 32,
                 kernel_size: int = 5) -> None:
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise SpecError(f"kernel_size={kernel_size}: use an odd size ('same' padding)")
        pad = kernel_size // 2
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, filters, kernel_size, padding=pad), nn.ELU(),
            nn.Conv2d(filters, filters, kernel_size, padding=pad), nn.ELU(),
            nn.Conv2d(filters, out_channels, kernel_size, padding=pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def unidata_cnn(in_channels: int, out_channels: int = 1, filters: int = 32,
                kernel_size: int = 5) -> UnidataCNN:
    """Factory of :class:`UnidataCNN` (registered as ``unidata_cnn``)."""
    return UnidataCNN(in_channels, out_channels, filters, kernel_size)


register_architecture("unidata_cnn", unidata_cnn, overwrite=True)


class FieldStandardized(nn.Module):
    """``net`` between standardisation of its input fields and de-standardisation of its
    output, with the statistics as buffers of shape ``(C, H, W)`` / ``(1, H, W)`` (per grid
    cell) or ``(C, 1, 1)`` / ``(1, 1, 1)`` (per field).

    Examples
    --------
    >>> m = FieldStandardized(nn.Identity(), np.full((1, 2, 3), 10.0), np.full((1, 1, 1), 2.0),
    ...                       np.full((1, 2, 3), 5.0), np.ones((1, 1, 1)))
    >>> m(torch.full((1, 1, 2, 3), 14.0))[0, 0, 0, 0].item()  # (14 - 10) / 2 * 1 + 5
    7.0
    """

    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(self, net: nn.Module, x_mean: np.ndarray, x_std: np.ndarray,
                 y_mean: np.ndarray, y_std: np.ndarray) -> None:
        super().__init__()
        self.net = net
        xs = torch.as_tensor(np.asarray(x_std), dtype=torch.float32)
        ys = torch.as_tensor(np.asarray(y_std), dtype=torch.float32)
        self.register_buffer("x_mean", torch.as_tensor(np.asarray(x_mean), dtype=torch.float32))
        # a constant input has std 0: divide by 1 instead of blowing up
        self.register_buffer("x_std", torch.where(xs > 0, xs, torch.ones_like(xs)))
        self.register_buffer("y_mean", torch.as_tensor(np.asarray(y_mean), dtype=torch.float32))
        self.register_buffer("y_std", torch.where(ys > 0, ys, torch.ones_like(ys)))

    def forward_standardized(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction in standardised target units (what the loss is computed on)."""
        return self.net((x - self.x_mean) / self.x_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_standardized(x) * self.y_std + self.y_mean


class FieldBatches(IterableDataset):
    """``(x, y)`` batches of whole fields, ``x`` ``(N, C, H, W)`` and ``y`` ``(N, 1, H, W)``,
    in a new order each epoch when ``shuffle`` (from ``(seed, epoch)``: reproducible)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} input fields but {len(y)} target fields")
        self.x = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
        self.y = torch.as_tensor(np.ascontiguousarray(y), dtype=torch.float32)
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __iter__(self):
        n = len(self.x)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        for i in range(0, n, self.batch_size):
            idx = torch.as_tensor(order[i:i + self.batch_size])
            yield self.x[idx], self.y[idx]
