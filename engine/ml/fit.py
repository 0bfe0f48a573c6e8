"""The training loop of patch models (segmentation, classification, regression): :func:`fit`.

Batches come from any iterable per epoch -- typically
:func:`engine.ops.patches.iter_patches` or a sampler built on it -- and reach the model
through :class:`engine.ml.device.DeviceLoader`: on a GPU they are pinned by a producer
thread and copied ``non_blocking`` on a side stream one batch ahead, so reading and
cutting patches on the host overlaps the forward and backward passes. The running loss
stays on the device (one host sync per epoch, not per step). Early stopping keeps the
weights of the best validation epoch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.errors import SpecError, TrainingError
from engine.ml.device import DeviceLoader, resolve_device

__all__ = ["fit", "FitResult", "evaluate_loss"]

_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model (best validation epoch when early
    stopping), the per-epoch history and the training throughput."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0
    samples: int = 0
    stopped_early: bool = False
    input_wait_s: float = 0.0  # time the loop waited for batches from the host

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def _autocast(dev: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32" or (precision == "auto" and dev.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(dev.type, dtype=dtype)


def _loss_of(loss: Callable[..., torch.Tensor], model: nn.Module, batch: tuple) -> Any:
    x, y, *rest = batch
    out = model(x)
    return loss(out, y, *rest)


def _finite(which: str, value: float, epoch: int) -> None:
    if not math.isfinite(value):
        raise TrainingError(
            f"epoch {epoch}: the {which} loss is {value}: the {which} inputs or targets "
            "hold NaN (sample with where='no-nan', or fill them), or the run diverged "
            "(lower lr=, or set max_grad_norm=)")


def evaluate_loss(model: nn.Module, batches: Iterable[Any], loss: Callable[..., torch.Tensor],
                  device: str | torch.device = "auto", precision: str = "fp32",
                  prefetch: int = 2) -> float:
    """Mean of ``loss`` over ``batches`` weighted by batch size, without gradients (NaN
    for no batches)."""
    return _evaluate(model, batches, loss, resolve_device(device), precision, prefetch)[0]


def _evaluate(model: nn.Module, batches: Iterable[Any], loss: Callable[..., torch.Tensor],
              dev: torch.device, precision: str, prefetch: int) -> tuple[float, int]:
    """The weighted mean loss and the number of samples."""
    total = torch.zeros((), device=dev, dtype=torch.float64)
    n = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in DeviceLoader(batches, dev, prefetch=prefetch):
                with _autocast(dev, precision):
                    value = _loss_of(loss, model, batch)
                total += value.detach().double() * len(batch[0])
                n += len(batch[0])
    finally:
        model.train(was_training)
    return (float(total) / n if n else math.nan), n


def fit(
    model: nn.Module,
    train: Callable[[int], Iterable[Any]],
    *,
    loss: Callable[..., torch.Tensor],
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    val: Callable[[], Iterable[Any]] | None = None,
    patience: int | None = None,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    prefetch: int = 2,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    seed: int | None = None,
    max_grad_norm: float | None = None,
) -> FitResult:
    """Train ``model`` with Adam (decoupled weight decay) on batches from ``train(epoch)``.

    Parameters
    ----------
    model
        Any module; moved to ``device`` and left there.
    train
        ``epoch -> iterable of batches``; a batch is ``(x, y)`` or ``(x, y, w)`` of numpy
        arrays or tensors (``x`` float32; nothing is cast). A ``PatchBatch`` from
        ``iter_patches`` is ``(data, positions)``: split its channels into ``(x, y)``
        first (as the segment and classify jobs do).
    loss
        ``loss(model(x), y[, w]) -> scalar tensor``.
    val
        ``() -> iterable of batches`` scored after every epoch (``val_loss``).
    patience
        Stop after this many epochs without a better ``val_loss`` and restore the best
        weights (needs ``val``).
    device, precision
        ``"auto"``/``"cpu"``/``"cuda[:N]"``; ``"fp32"``, ``"bf16"``, ``"fp16"`` (with a
        gradient scaler) or ``"auto"`` (bf16 on CUDA, fp32 on the CPU).
    prefetch
        Batches read ahead of the loop on a GPU (:class:`~engine.ml.device.DeviceLoader`).
    on_epoch
        Called with each epoch's record (``epoch``, ``train_loss``, ``val_loss``,
        ``seconds``, ``samples``).
    seed
        Seeds torch (and numpy / random) before the model's first step.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    >>> y = x @ np.array([[2.0], [-1.0]], np.float32)
    >>> res = fit(nn.Linear(2, 1), lambda e: [(x, y)], loss=nn.functional.mse_loss,
    ...           epochs=200, lr=0.05, device="cpu", seed=0)
    >>> res.history[-1]["train_loss"] < 1e-3
    True
    """
    if precision not in _PRECISIONS:
        raise SpecError(f"precision={precision!r}: use one of {list(_PRECISIONS)}")
    if epochs < 1:
        raise SpecError(f"epochs={epochs} must be >= 1")
    if patience is not None and val is None:
        raise SpecError("patience= stops on the validation loss: give val= batches too")
    if patience is not None and patience < 1:
        raise SpecError(f"patience={patience} must be >= 1 (epochs without a better "
                        "validation loss before stopping)")
    if seed is not None:
        from engine.ml.train import seed_everything

        seed_everything(seed)
    dev = resolve_device(device)
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    result = FitResult(model)
    best, best_state, since = math.inf, None, 0
    t_start = time.perf_counter()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        total = torch.zeros((), device=dev, dtype=torch.float64)
        n = 0
        loader = DeviceLoader(train(epoch), dev, prefetch=prefetch)
        for batch in loader:
            with _autocast(dev, precision):
                value = _loss_of(loss, model, batch)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(value).backward()
                scaler.unscale_(opt)
            else:
                value.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            total += value.detach().double() * len(batch[0])
            n += len(batch[0])
        if n == 0:
            raise SpecError(f"epoch {epoch}: the training batches are empty: check the "
                            "split and the sampling")
        train_loss = float(total) / n  # the one host sync of the epoch
        _finite("training", train_loss, epoch)
        record = {"epoch": epoch, "train_loss": train_loss, "samples": n}
        result.samples += n
        result.input_wait_s += loader.wait_s
        if val is not None:
            record["val_loss"], n_val = _evaluate(model, val(), loss, dev, precision,
                                                  prefetch)
            if n_val == 0:
                raise SpecError(f"epoch {epoch}: the validation batches are empty: check "
                                "the split, or leave val= out")
            _finite("validation", record["val_loss"], epoch)
            score = record["val_loss"]
        else:
            score = train_loss
        record["seconds"] = time.perf_counter() - t0
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if score < best:
            best, since, result.best_epoch = score, 0, epoch
            if patience is not None:
                best_state = copy.deepcopy(model.state_dict())
        else:
            since += 1
            if patience is not None and since >= patience:
                result.stopped_early = True
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - t_start
    model.eval()
    return result
