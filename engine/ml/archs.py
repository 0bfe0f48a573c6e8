"""Small built-in architectures, registered in :mod:`engine.ml.registry`.

``conv_net``
    A stack of same-padded convolutions with an activation (the "Conv2D 5x5 ELU" regression
    CNN of the Unidata post), ending in a 1x1 projection to ``out_channels``.
``unet_small``
    A compact UNet (two poolings by default) for patch segmentation and regression; the
    input size must be divisible by ``2**depth``.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import SpecError
from engine.ml.registry import register_architecture

__all__ = ["ConvNet", "UNetSmall", "conv_net", "unet_small"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU,
}


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise SpecError(f"activation {name!r}: use one of {sorted(_ACTIVATIONS)}") from None


class ConvNet(nn.Module):
    """``layers`` convolutions of ``kernel_size`` (same padding) + activation, then 1x1 out."""

    def __init__(self, in_channels: int, out_channels: int = 1, hidden: int = 32,
                 layers: int = 3, kernel_size: int = 5, activation: str = "elu") -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise SpecError(f"kernel_size={kernel_size}: use an odd size (same padding)")
        mods: list[nn.Module] = []
        width = in_channels
        for _ in range(layers):
            mods += [nn.Conv2d(width, hidden, kernel_size, padding=kernel_size // 2),
                     _activation(activation)]
            width = hidden
        mods.append(nn.Conv2d(width, out_channels, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _double_conv(cin: int, cout: int, activation: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), _activation(activation),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), _activation(activation),
    )


class UNetSmall(nn.Module):
    """UNet with ``depth`` poolings and ``base * 2**level`` channels per level."""

    def __init__(self, in_channels: int, out_channels: int = 1, base: int = 16,
                 depth: int = 2, activation: str = "relu") -> None:
        super().__init__()
        self.depth = depth
        self.down = nn.ModuleList()
        width = in_channels
        for level in range(depth):
            self.down.append(_double_conv(width, base * 2**level, activation))
            width = base * 2**level
        self.bottom = _double_conv(width, base * 2**depth, activation)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        width = base * 2**depth
        for level in reversed(range(depth)):
            self.up.append(nn.ConvTranspose2d(width, base * 2**level, 2, stride=2))
            self.dec.append(_double_conv(2 * base * 2**level, base * 2**level, activation))
            width = base * 2**level
        self.head = nn.Conv2d(width, out_channels, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def conv_net(in_channels: int, out_channels: int = 1, hidden: int = 32, layers: int = 3,
             kernel_size: int = 5, activation: str = "elu") -> ConvNet:
    """Factory of :class:`ConvNet` (registered as ``conv_net``)."""
    return ConvNet(in_channels, out_channels, hidden, layers, kernel_size, activation)


def unet_small(in_channels: int, out_channels: int = 1, base: int = 16, depth: int = 2,
               activation: str = "relu") -> UNetSmall:
    """Factory of :class:`UNetSmall` (registered as ``unet_small``)."""
    return UNetSmall(in_channels, out_channels, base, depth, activation)


register_architecture("conv_net", conv_net, overwrite=True)
register_architecture("unet_small", unet_small, overwrite=True)
