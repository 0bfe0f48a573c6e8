"""Class activation maps of a tile classifier: Grad-CAM and Grad-CAM++ (issue 12, section 4).

Grad-CAM (Selvaraju et al. 2017): with ``A_k`` the activations of a convolutional layer and
``y_c`` the logit of class ``c``, the channel weights are the spatial means of the
gradients, ``w_k = mean_ij dy_c/dA_k[i, j]``, and the map is ``ReLU(sum_k w_k A_k)``.
Grad-CAM++ (Chattopadhay et al. 2018) weights each gradient position by
``alpha = g**2 / (2 g**2 + sum_ij A_k * g**3)`` and keeps only positive gradients:
``w_k = sum_ij alpha * ReLU(g)`` (the closed form of the paper's exponential-score
derivation, as in its reference code). Maps are upsampled bilinearly to the tile size and,
by default, divided by each tile's maximum (so they lie in 0..1).

:func:`gradcam` runs on a batch tensor or an iterator of batches (one forward and one
backward pass per batch; samples do not interact in eval mode, so a batch gives the same
maps as its tiles one by one). :func:`cube_gradcam` cuts a cube into tiles lazily (one dask
task per block) and returns the maps beside the model's predictions as an
:class:`xarray.Dataset`; :func:`overlay_plot` draws a map over its tile.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine.errors import SpecError

if TYPE_CHECKING:
    import os

    import xarray as xr
    from matplotlib.figure import Figure

__all__ = ["CAMResult", "gradcam", "cube_gradcam", "overlay_plot", "find_layer",
           "map_sizes", "resolving_layer", "blank_tile"]

Method = Literal["gradcam", "gradcam++"]

# Hooks live on the model object: two threads running one model at once would see each
# other's activations, so one map computation at a time per process.
_LOCK = threading.Lock()


@dataclass(frozen=True)
class CAMResult:
    """Maps and predictions of ``n`` tiles of ``(height, width)`` pixels.

    ``heatmaps (n, height, width)`` float32, ``target (n,)`` the class each map explains,
    ``logits (n, classes)`` the model's outputs.
    """

    heatmaps: np.ndarray
    target: np.ndarray
    logits: np.ndarray

    @property
    def prediction(self) -> np.ndarray:
        """The predicted class of each tile (argmax of the logits)."""
        return self.logits.argmax(1)


def find_layer(model: nn.Module, layer: str | None = None) -> nn.Module:
    """The module called ``layer`` in ``model.named_modules()``, or the last ``Conv2d``.

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 4, 3))
    >>> find_layer(net) is net[2], find_layer(net, "0") is net[0]
    (True, True)
    """
    modules = dict(model.named_modules())
    if layer is not None:
        if layer not in modules:
            convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            raise SpecError(f"layer {layer!r} is not in the model; its convolutions: {convs}")
        return modules[layer]
    convs = [m for m in modules.values() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise SpecError("the model has no Conv2d layer: name the target layer (layer=...)")
    return convs[-1]


def map_sizes(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict[str, int]:
    """The smaller side of each named module's output map on ``x`` (one forward pass in
    eval mode, no gradients); a module whose output is not ``(B, C, h, w)`` is left out.

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Flatten())
    >>> map_sizes(net, torch.zeros(1, 1, 9, 9), ["0", "1"])
    {'0': 4}
    """
    modules = dict(model.named_modules())
    sizes: dict[str, int] = {}
    handles = []
    for name in names:
        if name not in modules:
            raise SpecError(f"layer {name!r} is not in the model")

        def keep(_m: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                sizes[name] = min(int(out.shape[-2]), int(out.shape[-1]))

        handles.append(modules[name].register_forward_hook(keep))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: sizes[n] for n in names if n in sizes}


def resolving_layer(model: nn.Module, x: torch.Tensor, candidates: Sequence[str],
                    min_size: int = 4) -> str:
    """The deepest of ``candidates`` (module names in forward order, e.g. a ResNet's
    stages) whose output on ``x`` is still a map of at least ``min_size`` x ``min_size``
    positions; the first candidate when none is.

    The deepest layer explains best (its features are the classifier's), but on small
    tiles the last stage of a ResNet is 1 x 1 or 2 x 2 and its map, upsampled, is a
    constant or a blur: a map needs positions to localise anything.

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, stride=2),
    ...                     nn.Conv2d(2, 2, 3, stride=2))
    >>> resolving_layer(net, torch.zeros(1, 1, 16, 16), ["0", "1", "2"])  # 16, 7, 3 positions
    '1'
    """
    sizes = map_sizes(model, x, candidates)
    ok = [n for n in candidates if sizes.get(n, 0) >= min_size]
    return ok[-1] if ok else candidates[0]


def _weights(acts: torch.Tensor, grads: torch.Tensor, method: Method) -> torch.Tensor:
    if method == "gradcam":
        return grads.mean(dim=(2, 3))
    if method == "gradcam++":
        g2 = grads * grads
        g3 = g2 * grads
        denom = 2.0 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
        return (alpha * F.relu(grads)).sum(dim=(2, 3))
    raise SpecError(f"method={method!r}: use 'gradcam' or 'gradcam++'")


def _one_batch(model: nn.Module, module: nn.Module, x: torch.Tensor, target: Any,
               method: Method, normalize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    store: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor):
            raise SpecError("the target layer must return one tensor (B, C, h, w)")
        store["acts"] = out.detach().clone()  # a later in-place op must not change it
        out.register_hook(lambda g: store.__setitem__("grads", g.detach()))

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # a graph even if parameters are frozen
            logits = model(x)
            if logits.ndim != 2:
                raise SpecError(f"the model must return logits (batch, classes); got "
                                f"shape {tuple(logits.shape)}")
            if target is None:
                tgt = logits.argmax(1)
            else:
                tgt = torch.as_tensor(np.array(np.broadcast_to(np.asarray(target),
                                                               (x.shape[0],))),
                                      device=logits.device, dtype=torch.long)
                if (tgt < 0).any() or (tgt >= logits.shape[1]).any():
                    raise SpecError(f"target classes must be in 0..{logits.shape[1] - 1}")
            model.zero_grad(set_to_none=True)
            logits.gather(1, tgt[:, None]).sum().backward()
    finally:
        handle.remove()
    if "acts" not in store or "grads" not in store:
        raise SpecError("the target layer was not used in the forward pass (or its output "
                        "does not reach the logits)")
    acts, grads = store["acts"], store["grads"]
    if acts.ndim != 4:
        raise SpecError(f"the target layer's output must be (B, C, h, w); got {tuple(acts.shape)}")
    w = _weights(acts, grads, method)
    cam = F.relu((w[:, :, None, None] * acts).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    if normalize:
        peak = cam.amax(dim=(1, 2), keepdim=True)
        cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, 1.0), cam)
    return (cam.detach().float().cpu().numpy(), tgt.cpu().numpy(),
            logits.detach().float().cpu().numpy())


def gradcam(model: nn.Module, batches: torch.Tensor | np.ndarray | Iterable[Any],
            target: int | Sequence[int] | np.ndarray | None = None, layer: str | None = None,
            method: Method = "gradcam", batch_size: int | None = 64, normalize: bool = True,
            device: str | torch.device | None = None) -> CAMResult:
    """Grad-CAM or Grad-CAM++ maps of ``model`` (``(B, C, H, W)`` -> logits ``(B, K)``).

    Parameters
    ----------
    model
        A tile classifier; it is put in eval mode for the computation (and put back).
    batches
        One ``(n, C, H, W)`` tensor or array (split into ``batch_size`` tiles), or an
        iterable of such batches (each taken as it comes).
    target
        The class each map explains: ``None`` for the predicted class, one class for all
        tiles, or one per tile.
    layer
        Name of the target layer in ``model.named_modules()``; the last ``Conv2d`` by
        default. A layer whose output is post-activation (a ResNet's last block, a ReLU
        after the last convolution) usually localises better: with pre-activation
        outputs, a negative weight times a negative activation also lights up.
    method
        ``"gradcam"`` or ``"gradcam++"``.
    normalize
        Divide each map by its maximum (maps that are all zero stay zero).

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
    ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    >>> r = gradcam(net, torch.rand(5, 1, 8, 8), method="gradcam++", batch_size=2)
    >>> r.heatmaps.shape, r.logits.shape
    ((5, 8, 8), (5, 2))
    """
    module = find_layer(model, layer)
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(batches, torch.Tensor | np.ndarray):
        whole = torch.as_tensor(batches)
        step = batch_size or max(int(whole.shape[0]), 1)
        chunks: Iterable[Any] = (whole[i:i + step] for i in range(0, whole.shape[0], step))
    else:
        chunks = batches
    per_tile = None if target is None else np.asarray(target)
    was_training = model.training
    model.eval()
    maps, targets, logits = [], [], []
    done = 0
    try:
        with _LOCK:
            for chunk in chunks:
                x = torch.as_tensor(chunk).to(dev, torch.float32)
                if x.ndim != 4:
                    raise SpecError(f"batches must be (n, C, H, W); got {tuple(x.shape)}")
                t = per_tile if per_tile is None or per_tile.ndim == 0 else \
                    per_tile[done:done + x.shape[0]]
                m, tg, lg = _one_batch(model, module, x, t, method, normalize)
                maps.append(m)
                targets.append(tg)
                logits.append(lg)
                done += x.shape[0]
    finally:
        model.train(was_training)
    if not maps:
        raise SpecError("gradcam: no tiles")
    return CAMResult(np.concatenate(maps).astype(np.float32), np.concatenate(targets),
                     np.concatenate(logits))


def _block_maps(block: np.ndarray, model: nn.Module, *, tile: tuple[int, int], layer: str | None,
                method: Method, batch_size: int, target: int | None,
                normalize: bool) -> np.ndarray:
    """``(..., C, H, W)`` block -> ``(3, ..., H, W)``: map, predicted class, probability."""
    *lead, c, h, w = block.shape
    th, tw = tile
    ny, nx = h // th, w // tw
    out = np.full((3, *lead, h, w), np.nan, dtype=np.float32)
    flat = block.reshape(-1, c, h, w)
    n_lead = flat.shape[0]
    if ny == 0 or nx == 0 or n_lead == 0:
        return out
    core = flat[:, :, :ny * th, :nx * tw].reshape(n_lead, c, ny, th, nx, tw)
    tiles = np.ascontiguousarray(core.transpose(0, 2, 4, 1, 3, 5)).reshape(-1, c, th, tw)
    valid = np.isfinite(tiles).all(axis=(1, 2, 3))
    maps = np.full((tiles.shape[0], th, tw), np.nan, dtype=np.float32)
    pred = np.full(tiles.shape[0], np.nan, dtype=np.float32)
    prob = np.full(tiles.shape[0], np.nan, dtype=np.float32)
    if valid.any():
        r = gradcam(model, torch.from_numpy(tiles[valid].astype(np.float32)), target=target,
                    layer=layer, method=method, batch_size=batch_size, normalize=normalize)
        maps[valid] = r.heatmaps
        pred[valid] = r.prediction
        p = torch.softmax(torch.from_numpy(r.logits), 1).numpy()
        prob[valid] = p[np.arange(p.shape[0]), r.target]
    maps = maps.reshape(n_lead, ny, nx, th, tw).transpose(0, 1, 3, 2, 4).reshape(
        n_lead, ny * th, nx * tw)
    res = out.reshape(3, n_lead, h, w)
    res[0, :, :ny * th, :nx * tw] = maps
    for i, per in ((1, pred), (2, prob)):
        res[i, :, :ny * th, :nx * tw] = np.repeat(np.repeat(
            per.reshape(n_lead, ny, nx), th, axis=1), tw, axis=2)
    return out


def cube_gradcam(model: nn.Module, data: xr.DataArray, tile: Mapping[str, int],
                 channel_dim: str | None = None, target: int | None = None,
                 layer: str | None = None, method: Method = "gradcam", batch_size: int = 64,
                 normalize: bool = True) -> xr.Dataset:
    """Lazy class activation maps over a cube's non-overlapping tiles, beside predictions.

    ``data`` has the two dims of ``tile`` last (``{y_dim: height, x_dim: width}``), an
    optional ``channel_dim`` (the model's input channels) and any other leading dims (time,
    ...), each tile classified and explained on its own. Spatial chunks are rounded to
    multiples of the tile size, one dask task per block. Returns a Dataset on ``data``'s
    grid: ``cam`` (the map, 0..1 when ``normalize``), ``prediction`` (each pixel's tile's
    predicted class) and ``probability`` (softmax probability of the explained class);
    pixels of an incomplete edge tile, and tiles with a NaN input, are NaN.
    Nothing is computed until the caller computes. Graph keys are tokens of the input's
    keys, the model's content (:func:`engine.ml.train.model_hash`) and every parameter, so
    a repeated call has the same keys (a resumable write recognises its data).
    """
    import dask
    import dask.array as da
    import xarray as xr

    (ydim, th), (xdim, tw) = tuple(tile.items())
    dims = list(data.dims)
    if dims[-2:] != [ydim, xdim]:
        data = data.transpose(..., ydim, xdim)
    if channel_dim is None:
        data = data.expand_dims("__channel__", axis=-3)
        cdim = "__channel__"
    else:
        if channel_dim not in data.dims:
            raise SpecError(f"channel_dim {channel_dim!r} is not a dim of the data {dims}")
        data = data.transpose(..., channel_dim, ydim, xdim)
        cdim = channel_dim
    arr = data.data if isinstance(data.data, da.Array) else da.from_array(data.values)
    lead = arr.ndim - 3

    def rounded(chunks: tuple[int, ...], t: int) -> int:
        return max(t, (max(chunks) // t) * t)

    arr = arr.rechunk({**{i: 1 for i in range(lead)}, lead: -1,
                       lead + 1: rounded(arr.chunks[lead + 1], th),
                       lead + 2: rounded(arr.chunks[lead + 2], tw)})
    out_chunks = ((3,), *arr.chunks[:lead], *arr.chunks[lead + 1:])
    kwargs = dict(tile=(th, tw), layer=layer, method=method,
                  batch_size=batch_size, target=target, normalize=normalize)
    from engine.ml.train import model_hash

    digest = dask.base.tokenize(type(model).__qualname__, model_hash(model),
                                getattr(model, "output", None))
    # one graph key holds the model; every block task depends on it (not a copy per task)
    model_key = dask.delayed(model, name=f"gradcam-model-{digest}", pure=True,
                             traverse=False)
    token = dask.base.tokenize(arr.name, arr.chunks, digest, sorted(kwargs.items()))
    # meta given: dask does not call the function on an empty block to find it
    stacked = da.map_blocks(_block_maps, arr, model_key, dtype=np.float32, chunks=out_chunks,
                            drop_axis=lead, new_axis=0, name=f"gradcam-{token}",
                            meta=np.empty((0,) * len(out_chunks), np.float32), **kwargs)
    out_dims = [d for d in data.dims if d != cdim]
    coords = {k: v for k, v in data.coords.items() if cdim not in v.dims}
    attrs = {"method": method, "tile": f"{th}x{tw}",
             "layer": layer or "last Conv2d", "target": "predicted class" if target is None
             else str(target)}
    return xr.Dataset(
        {"cam": (out_dims, stacked[0], {**attrs, "long_name": f"{method} class activation map"}),
         "prediction": (out_dims, stacked[1], {"long_name": "predicted class of the tile"}),
         "probability": (out_dims, stacked[2],
                         {"long_name": "softmax probability of the explained class"})},
        coords=coords)


def overlay_plot(tile: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45,
                 title: str | None = None, ax: Any = None,
                 path: str | os.PathLike[str] | None = None) -> Figure:
    """Draw ``heatmap (H, W)`` (jet, ``alpha``) over ``tile``: ``(H, W)`` grey,
    ``(H, W, 3)`` RGB or ``(C, H, W)`` (first channel, or channels 0..2 when ``C == 3``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    img = np.asarray(tile, dtype=float)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (3,):
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    if img.ndim == 3:
        lo, hi = np.nanmin(img), np.nanmax(img)
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4, 4))
    else:
        fig = ax.figure
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    ax.imshow(np.asarray(heatmap, dtype=float), cmap="jet", alpha=alpha,
              vmin=0.0, vmax=max(float(np.nanmax(heatmap)), 1e-12))
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def blank_tile(channels: int, size: int) -> torch.Tensor:
    """One all-zero tile ``(1, channels, size, size)``, to try a layer choice on."""
    return torch.zeros(1, channels, size, size)
