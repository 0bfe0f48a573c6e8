"""Per-pixel regression models of the gap-filling job (document 001).

``linear`` is the one-node linear model of the ml4xcube use case; ``mlp`` a small
multi-layer perceptron. Both are wrapped in :class:`Standardized`, which carries the
training-split statistics as buffers: the saved ``state_dict`` maps raw feature units to
raw target units, so inference needs nothing but the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["Standardized", "build_regressor", "ACTIVATIONS"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "elu": nn.ELU,
}


class Standardized(nn.Module):
    """``y = core((x - mean_x) / std_x) * std_y + mean_y`` with the statistics as buffers."""

    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(self, core: nn.Module, n_features: int) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("x_mean", torch.zeros(n_features))
        self.register_buffer("x_std", torch.ones(n_features))
        self.register_buffer("y_mean", torch.zeros(1))
        self.register_buffer("y_std", torch.ones(1))

    def set_statistics(self, x_mean: Sequence[float], x_std: Sequence[float],
                       y_mean: float, y_std: float) -> None:
        with torch.no_grad():
            self.x_mean.copy_(torch.as_tensor(x_mean, dtype=torch.float32))
            # A constant feature has std 0: divide by 1 instead of blowing up.
            xs = torch.as_tensor(x_std, dtype=torch.float32)
            self.x_std.copy_(torch.where(xs > 0, xs, torch.ones_like(xs)))
            self.y_mean.fill_(float(y_mean))
            self.y_std.fill_(float(y_std) if y_std > 0 else 1.0)

    def forward_standardized(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction in standardised target units (what the loss is computed on)."""
        return self.core((x - self.x_mean) / self.x_std).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.forward_standardized(x) * self.y_std + self.y_mean).unsqueeze(-1)


def build_regressor(kind: str, n_features: int, hidden: Sequence[int] = (64, 64),
                    activation: str = "relu") -> Standardized:
    """Build a per-pixel regressor (``linear`` or ``mlp``) wrapped in :class:`Standardized`."""
    if kind == "linear":
        core: nn.Module = nn.Linear(n_features, 1)
    elif kind == "mlp":
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), ACTIVATIONS[activation]()]
            width = int(h)
        layers.append(nn.Linear(width, 1))
        core = nn.Sequential(*layers)
    else:
        raise ValueError(f"unknown model kind {kind!r}: use linear or mlp")
    return Standardized(core, n_features)


def regressor_factory(n_features: int, kind: str = "linear", hidden: Sequence[int] = (64, 64),
                      activation: str = "relu") -> Standardized:
    """Registry factory: the architecture of a saved gap-filling checkpoint."""
    return build_regressor(kind, n_features, hidden, activation)


def architecture_kwargs(spec_model: Mapping, n_features: int) -> dict:
    return {"n_features": n_features, "kind": spec_model["kind"],
            "hidden": list(spec_model.get("hidden", [])), "activation": spec_model["activation"]}
