"""engine.ml.archs.conv_autoencoder: shapes, the embedding, learning to reconstruct."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import SpecError
from engine.ml.archs import ConvAutoencoder
from engine.ml.registry import build_architecture


def _tiles(n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Two textures: horizontal or vertical sinusoidal stripes, random phase, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    phase = torch.rand(n, generator=g) * 6.283
    r = torch.arange(16.0)
    wave = torch.sin(r[None, :] * 1.2 + phase[:, None])  # (n, 16)
    horiz = wave[:, :, None].expand(n, 16, 16)
    vert = wave[:, None, :].expand(n, 16, 16)
    x = torch.where(y[:, None, None] == 0, horiz, vert) + 0.1 * torch.randn(n, 16, 16,
                                                                            generator=g)
    return x[:, None], y.numpy()


def test_shapes_and_registry():
    net = build_architecture("conv_autoencoder", in_channels=3, tile=32, embedding_dim=10,
                             base=4, depth=3)
    assert isinstance(net, ConvAutoencoder)
    x = torch.rand(5, 3, 32, 32)
    assert net.encode(x).shape == (5, 10)
    assert net(x).shape == (5, 3, 32, 32)
    assert net.decode(torch.zeros(2, 10)).shape == (2, 3, 32, 32)
    with pytest.raises(SpecError, match="divisible"):
        ConvAutoencoder(1, tile=20, depth=3)
    with pytest.raises(SpecError, match="32x32"):
        net.encode(torch.rand(1, 3, 16, 16))


def test_reconstruction_improves_on_held_out_tiles():
    torch.manual_seed(0)
    net = ConvAutoencoder(1, tile=16, embedding_dim=8, base=8, depth=2)
    x, _ = _tiles(64)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.eval()
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(net(x), x).item()
    net.train()
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), x)
        loss.backward()
        opt.step()
    net.eval()
    xt, _ = _tiles(64, seed=1)  # held-out tiles
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(net(x), x).item()
        held = torch.nn.functional.mse_loss(net(xt), xt).item()
    # a decoder that learnt only the mean tile would stay near the tiles' variance (~0.5)
    assert after < 0.5 * before, (before, after)
    assert held < 0.6 * before, (before, held)
    assert held < 0.6 * float(xt.var())
