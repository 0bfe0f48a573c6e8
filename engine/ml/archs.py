"""Small built-in architectures, registered in :mod:`engine.ml.registry`.

``conv_net``
    A stack of same-padded convolutions with an activation (the "Conv2D 5x5 ELU" regression
    CNN of the Unidata post), ending in a 1x1 projection to ``out_channels``.
``unet_small``
    A compact UNet (two poolings by default) for patch segmentation and regression; the
    input size must be divisible by ``2**depth``.
``unet``
    The same UNet four levels deep (document 003's glacier mapping).
``resnet18``
    ResNet-18 from scratch (tile classification), with the ImageNet or a small-tile stem.

Also here: :class:`Normalized` (training-region standardisation + output activation
around any of them) and the losses the patch jobs train with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.errors import SpecError
from engine.ml.registry import register_architecture

__all__ = ["ConvNet", "UNetSmall", "conv_net", "unet_small", "unet", "BasicBlock", "ResNet18",
           "resnet18", "Normalized", "TileBroadcast", "segmentation_loss", "classification_loss",
           "load_weights"]

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


# -- patch segmentation and tile classification (issue 10: kinds segment, classify) ------
def unet(in_channels: int, out_channels: int = 1, base: int = 32, depth: int = 4,
         activation: str = "relu") -> UNetSmall:
    """The deeper UNet of document 003's glacier mapping (four poolings, 32..512 channels
    by default; registered as ``unet``); input sizes must be divisible by ``2**depth``."""
    return UNetSmall(in_channels, out_channels, base, depth, activation)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016: four stages of two :class:`BasicBlock`, widths
    ``width * (1, 2, 4, 8)``, global average pooling, one linear layer), trained from
    scratch.

    ``stem="imagenet"`` is the original 7x7 stride-2 convolution and max pooling (inputs of
    about 64 pixels and more); ``stem="small"`` a 3x3 stride-1 convolution (the CIFAR
    variant, for tiles of 8 to 32 pixels). ``width=64`` is the published network; smaller
    widths keep the depth and shrink the cost (by ``(64 / width) ** 2``).
    """

    def __init__(self, in_channels: int, out_channels: int = 17, width: int = 64,
                 stem: str = "imagenet") -> None:
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(inplace=True))
        else:
            raise SpecError(f"stem {stem!r}: use 'imagenet' or 'small'")
        layers: list[nn.Module] = []
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, out_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(in_channels: int, out_channels: int = 17, width: int = 64,
             stem: str = "imagenet") -> ResNet18:
    """Factory of :class:`ResNet18` (registered as ``resnet18``)."""
    return ResNet18(in_channels, out_channels, width, stem)


class Normalized(nn.Module):
    """``output(core((x - mean) / std))`` per input channel, with the statistics (of the
    training region only) as buffers, so a saved ``state_dict`` maps raw cube values to
    the output. ``output``: ``"logits"`` (training), ``"sigmoid"`` or ``"softmax"`` over
    dim 1 (inference)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, core: nn.Module, n_channels: int, output: str = "logits") -> None:
        super().__init__()
        if output not in ("logits", "sigmoid", "softmax"):
            raise SpecError(f"output {output!r}: use 'logits', 'sigmoid' or 'softmax'")
        self.core = core
        self.output = output
        self.register_buffer("mean", torch.zeros(1, n_channels, 1, 1))
        self.register_buffer("std", torch.ones(1, n_channels, 1, 1))

    def set_statistics(self, mean: list[float], std: list[float]) -> None:
        with torch.no_grad():
            self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view_as(self.mean))
            s = torch.as_tensor(std, dtype=torch.float32).view_as(self.std)
            self.std.copy_(torch.where(s > 0, s, torch.ones_like(s)))  # constant channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.core((x - self.mean) / self.std)
        if self.output == "sigmoid":
            return torch.sigmoid(out)
        if self.output == "softmax":
            return torch.softmax(out, dim=1)
        return out


class TileBroadcast(nn.Module):
    """A tile classifier ``(B, C, H, W) -> (B, K)`` as a dense model: its softmax class
    probabilities spread over every pixel of the tile ``(B, K, H, W)``, so
    :func:`engine.predict` runs it blockwise on a tile grid (``overlap=0``)."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(self.classifier(x), dim=1)
        return p[:, :, None, None].expand(-1, -1, x.shape[-2], x.shape[-1])


def segmentation_loss(kind: str = "bce", pos_weight: float | None = None) -> Any:
    """Loss of binary segmentation on logits ``(B, 1, H, W)`` against 0/1 labels: binary
    cross-entropy (document 003), or ``"bce_dice"``: BCE + (1 - soft Dice) over the batch.

    >>> f = segmentation_loss("bce_dice")
    >>> y = torch.zeros(1, 1, 2, 2); y[..., 0, 0] = 1
    >>> round(float(f(40 * y - 20, y)), 3), round(float(f(20 - 40 * y, y)), 1)  # right, wrong
    (0.0, 20.8)
    """
    if kind not in ("bce", "bce_dice"):
        raise SpecError(f"loss {kind!r}: use 'bce' or 'bce_dice'")
    pw = None if pos_weight is None else torch.tensor([float(pos_weight)])

    def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.to(logits.dtype).reshape(logits.shape)
        w = None if pw is None else pw.to(logits.device, logits.dtype)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=w)
        if kind == "bce":
            return bce
        p = torch.sigmoid(logits)
        dice = (2 * (p * y).sum() + 1.0) / (p.sum() + y.sum() + 1.0)
        return bce + (1 - dice)

    return _loss


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class logits ``(B, C)`` against integer labels ``(B,)``; labels
    -100 (tiles of no listed class) do not count."""
    return nn.functional.cross_entropy(logits, y.reshape(-1).long(), ignore_index=-100)


def load_weights(module: nn.Module, path: str) -> None:
    """Load a ``state_dict`` file into ``module`` (tensors only: ``weights_only=True``, no
    code runs). A state_dict of a :class:`Normalized` wrapper (``core.`` keys) loads into
    its core too. A missing, foreign or mismatched file is one :class:`SpecError` line."""
    import os

    if not os.path.isfile(path):
        raise SpecError(f"model.weights {path!r} not found: give the path of a state_dict "
                        "file (torch.save(model.state_dict(), path))")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a state_dict")
        if all(str(k).startswith("core.") for k in state) and not isinstance(module,
                                                                              Normalized):
            state = {k[5:]: v for k, v in state.items() if k.startswith("core.")}
        module.load_state_dict(state)
    except Exception as err:
        raise SpecError(f"model.weights {path!r} does not load into "
                        f"{type(module).__name__} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}); give weights of the same "
                        "architecture, channels and classes") from None


register_architecture("unet", unet, overwrite=True)
register_architecture("resnet18", resnet18, overwrite=True)


register_architecture("conv_net", conv_net, overwrite=True)
register_architecture("unet_small", unet_small, overwrite=True)

# Document 000's regression CNN lives with the other whole-field models; importing it here
# registers ``unidata_cnn`` with the built-in architectures.
import engine.ml.fields  # noqa: E402,F401


class ConvAutoencoder(nn.Module):
    """A convolutional autoencoder whose bottleneck is a tile embedding (document 004's
    alternative to Tile2Vec, section 11.2).

    Encoder: ``depth`` stride-2 3x3 convolutions (widths ``base * 2**i``, batch norm,
    activation), flattened, then a linear layer to ``embedding_dim``. Decoder: the mirror
    image (linear, ``depth`` stride-2 transposed convolutions, a 3x3 convolution to
    ``in_channels``). ``forward`` returns the reconstruction, :meth:`encode` the embedding
    ``(batch, embedding_dim)``. Tiles are ``tile`` pixels square, divisible by
    ``2**depth``.
    """

    def __init__(self, in_channels: int, tile: int = 32, embedding_dim: int = 32,
                 base: int = 16, depth: int = 3, activation: str = "relu") -> None:
        super().__init__()
        if depth < 1 or tile % (2 ** depth):
            raise SpecError(f"conv_autoencoder: tile={tile} must be divisible by "
                            f"2**depth = {2 ** depth} (depth >= 1)")
        self.tile, self.depth = tile, depth
        enc: list[nn.Module] = []
        cin = in_channels
        for i in range(depth):
            cout = base * 2 ** i
            enc += [nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), _activation(activation)]
            cin = cout
        self.encoder = nn.Sequential(*enc)
        self.bottom = (cin, tile // 2 ** depth)
        flat = cin * self.bottom[1] ** 2
        self.to_embedding = nn.Linear(flat, embedding_dim)
        self.from_embedding = nn.Linear(embedding_dim, flat)
        dec: list[nn.Module] = []
        for i in reversed(range(depth)):
            cout = base * 2 ** max(i - 1, 0)
            dec += [nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout),
                    _activation(activation)]
            cin = cout
        dec.append(nn.Conv2d(cin, in_channels, 3, 1, 1))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding ``(batch, embedding_dim)`` of tiles ``(batch, C, tile, tile)``."""
        if tuple(x.shape[-2:]) != (self.tile, self.tile):
            raise SpecError(f"conv_autoencoder: tiles must be {self.tile}x{self.tile}; got "
                            f"{tuple(x.shape[-2:])}")
        return self.to_embedding(torch.flatten(self.encoder(x), 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Tiles ``(batch, C, tile, tile)`` from embeddings ``(batch, embedding_dim)``."""
        c, s = self.bottom
        return self.decoder(self.from_embedding(z).view(z.shape[0], c, s, s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def conv_autoencoder(in_channels: int, tile: int = 32, embedding_dim: int = 32, base: int = 16,
                     depth: int = 3, activation: str = "relu") -> ConvAutoencoder:
    """Factory of :class:`ConvAutoencoder` (registered as ``conv_autoencoder``)."""
    return ConvAutoencoder(in_channels, tile, embedding_dim, base, depth, activation)


register_architecture("conv_autoencoder", conv_autoencoder, overwrite=True)
