"""Tile embeddings trained on triplets (Tile2Vec; document 004, issue 12 section 2).

:class:`TileEmbedder` maps a tile ``(C, h, w)`` to a ``dim``-vector (100 by default):
per-channel standardisation (training statistics as buffers) -> a ResNet-18 without its
classifier (:class:`engine.ml.archs.ResNet18`) -> document 004's fully connected head
(:class:`EmbeddingHead`). Given a triplet batch ``(B, 3, C, h, w)`` (anchor, neighbour,
distant stacked on axis 1, as :func:`engine.ops.triplets.triplet_batches` yields them)
it returns ``(B, 3, dim)``, so :func:`engine.ml.fit.fit` trains it with
:func:`triplet_loss` and no loop of its own.

The loss is document 004's equation 3, ``[d(a, n) - d(a, d) + m]_+``, with ``d`` the
plain L2 distance (``"l2"``) or its square (``"squared_l2"``, Tile2Vec's code).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn

from engine.errors import SpecError
from engine.ml.archs import ResNet18

__all__ = ["EmbeddingHead", "StandardisedEmbedder", "TileEmbedder", "tile_embedder",
           "triplet_loss", "embed_tiles",
           "triplet_distances", "triplet_accuracy", "save_weights", "AutoencoderEmbedder",
           "autoencoder_embedder", "Reconstruction", "reconstruction_loss", "models_hash"]


class EmbeddingHead(nn.Module):
    """Document 004's head: the backbone's pooled features through a two-layer fully
    connected network (batch norm, dropout, ReLU) to the embedding."""

    def __init__(self, n_features: int, dim: int = 100, hidden: int = 256,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm1d(n_features), nn.Dropout(dropout), nn.Linear(n_features, hidden),
            nn.ReLU(inplace=True), nn.BatchNorm1d(hidden), nn.Dropout(dropout),
            nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class StandardisedEmbedder(nn.Module):
    """Per-channel standardisation with the training tiles' statistics (buffers), then
    :meth:`embed`; a triplet batch ``(B, 3, C, h, w)`` gives ``(B, 3, dim)``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("std", torch.ones(1, in_channels, 1, 1))

    def set_statistics(self, mean: list[float], std: list[float]) -> None:
        """Per-channel mean and standard deviation of the training tiles."""
        with torch.no_grad():
            self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view_as(self.mean))
            s = torch.as_tensor(std, dtype=torch.float32).view_as(self.std)
            self.std.copy_(torch.where(s > 0, s, torch.ones_like(s)))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, dim)`` of standardised tiles ``(B, C, h, w)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:  # (B, 3, C, h, w) triplets -> (B, 3, dim)
            b, k = x.shape[:2]
            return self.forward(x.reshape(b * k, *x.shape[2:])).reshape(b, k, -1)
        return self.embed(self.standardise(x))


class TileEmbedder(StandardisedEmbedder):
    """Standardisation -> ResNet-18 features -> :class:`EmbeddingHead`."""

    def __init__(self, in_channels: int, dim: int = 100, width: int = 64,
                 stem: str = "imagenet", hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__(in_channels, dim)
        self.backbone = ResNet18(in_channels, 1, width=width, stem=stem)
        self.backbone.fc = nn.Identity()  # type: ignore[assignment]
        self.head = EmbeddingHead(8 * width, dim, hidden, dropout)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(z))


def tile_embedder(in_channels: int, dim: int = 100, width: int = 64, stem: str = "imagenet",
                  hidden: int = 256, dropout: float = 0.25) -> TileEmbedder:
    """Factory of :class:`TileEmbedder`.

    >>> m = tile_embedder(1, dim=100, width=8, stem="small").eval()
    >>> tuple(m(torch.zeros(2, 3, 1, 16, 16)).shape), tuple(m(torch.zeros(4, 1, 16, 16)).shape)
    ((2, 3, 100), (4, 100))
    """
    if not 1 <= dim <= 4096:
        raise SpecError(f"model.dim must be in [1, 4096], got {dim}")
    if not 1 <= width <= 256:
        raise SpecError(f"model.width must be in [1, 256], got {width}")
    if not 0 <= dropout < 1:
        raise SpecError(f"model.dropout must be in [0, 1), got {dropout}")
    return TileEmbedder(in_channels, dim, width, stem, hidden, dropout)


def triplet_distances(out: torch.Tensor,
                      distance: Literal["l2", "squared_l2"] = "l2") -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """Anchor-neighbour and anchor-distant distances of embeddings ``(B, 3, dim)``."""
    a, n, d = out[:, 0], out[:, 1], out[:, 2]
    dn = ((a - n) ** 2).sum(-1)
    dd = ((a - d) ** 2).sum(-1)
    if distance == "l2":
        # the epsilon keeps the gradient finite where two embeddings coincide
        dn, dd = torch.sqrt(dn + 1e-12), torch.sqrt(dd + 1e-12)
    return dn, dd


def triplet_loss(margin: float = 1.0, distance: Literal["l2", "squared_l2"] = "l2",
                 ) -> Callable[..., torch.Tensor]:
    """``loss(out, y) = mean([d(a, n) - d(a, d) + margin]_+)`` over triplets ``out`` of
    shape ``(B, 3, dim)``; ``y`` is ignored (:func:`engine.ml.fit.fit` passes it).

    >>> f = triplet_loss(margin=1.0)
    >>> good = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [3.0, 0.0]]])
    >>> bad = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.1, 0.0]]])
    >>> round(float(f(good, None)), 4), round(float(f(bad, None)), 4)
    (0.0, 3.9)
    >>> round(float(triplet_loss(1.0, "squared_l2")(bad, None)), 4)
    9.99
    """
    if distance not in ("l2", "squared_l2"):
        raise SpecError(f"loss.distance {distance!r}: use 'l2' or 'squared_l2'")
    if not margin > 0:
        raise SpecError(f"loss.margin must be > 0, got {margin}")

    def _loss(out: torch.Tensor, y: object = None, *rest: object) -> torch.Tensor:
        dn, dd = triplet_distances(out.float(), distance)
        return torch.relu(dn - dd + margin).mean()

    return _loss


def embed_tiles(model: nn.Module, tiles: np.ndarray, batch_size: int = 256,
                device: str | torch.device = "cpu") -> np.ndarray:
    """Embeddings ``(n, dim)`` float32 of tiles ``(n, C, h, w)``, in eval mode."""
    from engine.ml.device import resolve_device

    dev = resolve_device(device)
    model.to(dev).eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(tiles), batch_size):
            x = torch.as_tensor(np.ascontiguousarray(tiles[s:s + batch_size]), device=dev)
            out.append(model(x.float()).float().cpu().numpy())
    if not out:
        return np.zeros((0, getattr(model, "dim", 0)), np.float32)
    return np.concatenate(out).astype(np.float32)


def save_weights(model: nn.Module, path: str) -> None:
    """Write ``model``'s state_dict to ``path`` atomically (a temporary file renamed)."""
    import os

    tmp = f"{path}.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def triplet_accuracy(model: nn.Module, batches: object, device: str | torch.device = "cpu",
                     distance: Literal["l2", "squared_l2"] = "l2") -> tuple[float, int]:
    """Share of triplets whose neighbour embeds closer to the anchor than the distant tile
    (0.5 is chance), over ``(x, y)`` triplet batches; and their count."""
    from engine.ml.device import resolve_device

    dev = resolve_device(device)
    model.to(dev).eval()
    right = total = 0
    with torch.inference_mode():
        for x, _ in batches:  # type: ignore[attr-defined]
            out = model(torch.as_tensor(np.ascontiguousarray(x), device=dev).float())
            dn, dd = triplet_distances(out.float(), distance)
            right += int((dn < dd).sum())
            total += len(dn)
    return (right / total if total else float("nan")), total


class AutoencoderEmbedder(StandardisedEmbedder):
    """Standardisation -> :class:`engine.ml.archs.ConvAutoencoder`; the bottleneck is the
    embedding (document 004's alternative to Tile2Vec, section 11.2).

    ``forward`` returns the embedding ``(batch, dim)`` of tiles ``(batch, C, tile, tile)``,
    as :class:`TileEmbedder` does, so every embedding, clustering and scoring step takes
    either model. :meth:`reconstruct` returns the standardised reconstruction, the
    training target of :func:`reconstruction_loss`. The tile size is fixed by the
    bottleneck's linear layers.
    """

    def __init__(self, in_channels: int, tile: int, dim: int = 100, width: int = 16,
                 depth: int = 3) -> None:
        super().__init__(in_channels, dim)
        from engine.ml.archs import ConvAutoencoder

        self.autoencoder = ConvAutoencoder(in_channels, tile, dim, width, depth)
        self.tile = tile

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The standardised reconstruction of tiles ``x``."""
        return self.autoencoder(self.standardise(x))


def autoencoder_embedder(in_channels: int, tile: int, dim: int = 100, width: int = 16,
                         depth: int = 3) -> AutoencoderEmbedder:
    """Factory of :class:`AutoencoderEmbedder`; ``tile`` must divide by ``2**depth``.

    >>> m = autoencoder_embedder(2, 16, dim=8, width=4, depth=2).eval()
    >>> x = torch.zeros(3, 2, 16, 16)
    >>> tuple(m(x).shape), tuple(m.reconstruct(x).shape)
    ((3, 8), (3, 2, 16, 16))
    """
    if not 1 <= dim <= 4096:
        raise SpecError(f"model.dim must be in [1, 4096], got {dim}")
    if not 1 <= width <= 256:
        raise SpecError(f"model.width must be in [1, 256], got {width}")
    if not 1 <= depth <= 8 or tile % (2 ** depth):
        raise SpecError(f"model autoencoder: the tile ({tile} px) must divide by "
                        f"2**depth = {2 ** depth} (depth in [1, 8]): change tiles.size or "
                        "model.depth")
    return AutoencoderEmbedder(in_channels, tile, dim, width, depth)


class Reconstruction(nn.Module):
    """Training view of an :class:`AutoencoderEmbedder`: ``forward`` stacks the
    standardised reconstruction and the standardised input on axis 1, so
    :func:`engine.ml.fit.fit` trains it with :func:`reconstruction_loss` and no loop of
    its own. Triplet batches ``(B, 3, C, h, w)`` count as ``3 B`` tiles."""

    def __init__(self, embedder: AutoencoderEmbedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:
            x = x.reshape(-1, *x.shape[2:])
        return torch.stack([self.embedder.reconstruct(x), self.embedder.standardise(x)], 1)


def reconstruction_loss(out: torch.Tensor, y: object = None, *rest: object) -> torch.Tensor:
    """Mean squared error between the two halves of :class:`Reconstruction`'s output
    (standardised units, so 1.0 is the error of predicting the mean).

    >>> reconstruction_loss(torch.stack([torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)], 1))
    tensor(1.)
    """
    out = out.float()
    return torch.mean((out[:, 0] - out[:, 1].detach()) ** 2)


def models_hash(models: list[nn.Module]) -> str:
    """sha256 of several models' weights together (one model: its own
    :func:`engine.ml.train.model_hash`)."""
    from engine.ml.train import model_hash

    return model_hash(models[0] if len(models) == 1 else nn.ModuleList(models))
