"""Training loop: Adam, epochs, early stopping with patience, best checkpoint.

Unlike ml4xcube's trainers (which never call ``optimizer.step()``; see
shared/research/peers_ml4xcube_xbatcher.md section 1.6) this loop is tested to reduce
the loss, keeps the best ``state_dict`` on disk and reloads it with
``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["TrainResult", "train_model", "state_dict_bytes", "model_hash", "plot_loss",
           "Batches", "StandardizedModel"]


class Batches(Protocol):
    """What :func:`train_model` trains on: an iterable dataset of ``(x, y)`` batches with
    ``set_epoch`` (:class:`engine.ml.samples.PixelSamples` for pixels,
    :class:`engine.ml.fields.FieldBatches` for whole fields)."""

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Any: ...


class StandardizedModel(Protocol):
    """A model that carries its target statistics (:class:`engine.ml.models.Standardized`,
    :class:`engine.ml.fields.FieldStandardized`): the loss is computed in standardised
    target units."""

    y_mean: torch.Tensor
    y_std: torch.Tensor

    def forward_standardized(self, x: torch.Tensor) -> torch.Tensor: ...

    def parameters(self) -> Any: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val_loss: float = float("inf")
    checkpoint: str | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    samples_seen: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.samples_seen / self.seconds if self.seconds else 0.0


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def model_hash(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (stable across save formats)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _evaluate(model: StandardizedModel, samples: Batches) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.inference_mode():
        for x, y in DataLoader(cast(IterableDataset, samples), batch_size=None):
            z = (y - model.y_mean) / model.y_std
            total += float(((model.forward_standardized(x) - z) ** 2).sum())
            n += z.numel()  # the mean over every value, a pixel's or a field's
    return total / n if n else float("nan")


def train_model(
    model: StandardizedModel,
    train: Batches,
    val: Batches,
    *,
    epochs: int = 100,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    patience: int = 10,
    min_delta: float = 0.0,
    checkpoint: str | None = None,
    seed: int = 0,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` with MSE on standardised targets; keep the best validation epoch.

    Early stopping ends training after ``patience`` epochs without a validation loss
    improvement larger than ``min_delta``. The best weights are written to
    ``checkpoint`` (a ``state_dict``) and loaded back into ``model`` at the end.
    """
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    res = TrainResult(checkpoint=checkpoint)
    best_state: dict[str, torch.Tensor] | None = None
    strikes = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        model.train()
        loss_sum, n = 0.0, 0
        for x, y in DataLoader(cast(IterableDataset, train), batch_size=None):
            z = (y - model.y_mean) / model.y_std
            loss = torch.mean((model.forward_standardized(x) - z) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            n += len(y)
        res.samples_seen += n
        val_loss = _evaluate(model, val)
        rec = {"epoch": epoch, "train_loss": loss_sum / max(n, 1), "val_loss": val_loss}
        res.history.append(rec)
        if val_loss < res.best_val_loss - min_delta:
            res.best_val_loss, res.best_epoch, strikes = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if checkpoint:
                tmp = checkpoint + ".tmp"
                torch.save(best_state, tmp)
                os.replace(tmp, checkpoint)  # never leave a torn checkpoint
        else:
            strikes += 1
        if on_epoch is not None:
            on_epoch(rec)
        if strikes >= patience:
            res.stopped_early = True
            break
    res.seconds = time.perf_counter() - t0
    if checkpoint and os.path.exists(checkpoint):
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
    elif best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return res


def plot_loss(history: list[dict[str, float]], path: str, title: str = "") -> str:
    """Write the training / validation loss curve as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ep = np.array([h["epoch"] for h in history])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(ep, [h["train_loss"] for h in history], label="train")
    ax.plot(ep, [h["val_loss"] for h in history], label="validation")
    best = int(np.nanargmin([h["val_loss"] for h in history]))
    ax.axvline(ep[best], color="0.6", ls="--", lw=1, label=f"best epoch {ep[best]}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (standardised)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load a state_dict checkpoint (tensors only, ``weights_only=True``) into ``model``.

    A truncated, foreign or mismatched file is one line (:class:`StoreError`) that says how
    to recover, never a traceback.
    """
    from engine.errors import StoreError

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    except Exception as err:
        raise StoreError(f"checkpoint {path} cannot be loaded ({type(err).__name__}); delete "
                         "it or pass --restart to retrain") from None


def seed_everything(seed: int) -> None:
    """Seed torch's generators (model initialisation, dropout) and numpy's and Python's
    global ones (a user's batch function shuffling with ``np.random``) for a
    reproducible run. The engine's own sampling uses seeded generators of its own."""
    import random

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global generator is the point)
    random.seed(seed)
