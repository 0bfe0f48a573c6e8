"""Blockwise torch inference over dask-backed cubes: :func:`predict`.

Two modes share one model-shipping and loading scheme.

*Tiled* (``tile={"lat": 64, "lon": 64}``): a global window grid (tile ``T``, stride
``S = T * (1 - overlap)``) planned by :func:`engine.kernels.windows.grid_padding`: the
array is padded on both sides (``boundary``: reflect, nearest or a constant) by the same
margin of at least ``T - S``, so an edge pixel is blended from as many windows as an
interior one, and the grid tiles the padded array from its index 0. The padded array is
cut into blocks at multiples of ``S`` near the input's chunk boundaries, each extended by
a halo of ``ceil(T/S)*S - S`` between blocks (none at the true edges, so no window off
the grid is ever run): one inference task per block, which assembles the block with all
its channels from the input chunks itself (no gathered block is a task result, none
travels between workers), and one crop task per output chunk (:mod:`engine.ops.tiled`).
Inside a block the windows are cut as strided views, run through the model in batches,
and each batch's output is blended with a Gaussian importance map (sigma = T/8,
weights > 0) by one fused multiply-add per grid offset
(:func:`engine.ml.device.fold_add_run`), normalised by the summed weights in float32
at the end. Every window that covers a pixel lies inside that pixel's halo-extended
block, so every pixel gets the same windows and weights whatever the chunking (values
agree to float32 rounding: the order in which overlapping windows are summed, and the
batches the model sees, follow the blocks); the blocks' cores are cut back to the
input's chunks.

*Pointwise* (``tile=None``): a per-pixel model ``(n, features) -> (n, out)``, one
``map_blocks`` task per chunk, one model call per ``batch_size`` valid pixels; pixels
with a NaN feature get NaN without reaching the model.

The model is serialised once (state_dict + architecture factory, TorchScript, or the
pickled module) into ONE graph key that every block depends on, and loaded lazily once
per worker process into a cache keyed by its content hash (:func:`model_load_count`).
With ``device="cuda"`` the inference tasks carry ``resources={"GPU": 1/n}`` (``n`` =
``predict.gpu-tasks-per-gpu``): start the workers with ``--resources GPU=1`` and at least
``n`` threads (``--cluster local-cuda`` does), or they will never run. On a CUDA device a
block runs there end to end (:func:`_tiles_on_device`): assembled straight into pinned
memory, one copy in, windows cut
by ``unfold``, forward passes, the weighted blend as strided in-place adds, one copy out.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import math
import os
import sys
import threading
import time
import warnings
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr
from torch import nn

from engine import config, meter
from engine.errors import CubeError, SpecError
from engine.kernels.windows import (
    gaussian_weights,
    overlap_add,
    pad_kwargs,
)
from engine.ml.device import (
    auto_batch_size,
    fold_add_run,
    gpu_semaphore,
    gpu_slots,
    resolve_device,
    thread_stream,
    to_device,
    to_host,
    unfold_windows,
)
from engine.ops.tiled import (
    TiledPlan,
    block_shape,
    crop_blocks,
    gather,
    map_gathered,
    plan_tiles,
)

__all__ = [
    "predict",
    "ModelSpec",
    "serialize_model",
    "model_load_count",
    "clear_model_cache",
    "CHANNEL_DIM",
]

#: Name of the output channel dim when ``out_channels > 1``.
CHANNEL_DIM = "channel"
_CHANNEL_NAMES = ("variable", "channel", "band", "feature")
_SLAB_WINDOWS = 1024  # windows cut, predicted and blended at once inside a block
_DEFAULT_TILE: Mapping[str, int] = {"lat": 64, "lon": 64}
_PRECISIONS = {"auto": "auto", "fp32": None, "float32": None, "tf32": "tf32",
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Weights plus a registered architecture.

    Parameters
    ----------
    weights
        A ``state_dict``: file path, the bytes of ``torch.save(state_dict)``, or the dict.
    architecture
        Name in :mod:`engine.ml.registry`.
    kwargs
        Keyword arguments of the architecture factory.
    """

    weights: Any
    architecture: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class _Payload:
    """The serialised model: the single graph key every inference task depends on."""

    kind: Literal["state_dict", "torchscript", "module"]
    data: bytes
    digest: str
    factory: Callable[..., nn.Module] | None = None
    kwargs: tuple = ()
    origin: Literal["file", "object"] = "object"

    def __dask_tokenize__(self) -> tuple:  # hash once, not on every tokenize
        return ("engine-model", self.digest)


# -- serialisation (client side) ----------------------------------------------------------
def _digest(kind: str, data: bytes, extra: str = "") -> str:
    h = hashlib.sha256(kind.encode())
    h.update(data)
    h.update(extra.encode())
    return h.hexdigest()


def _state_dict_payload(weights: Any, architecture: str, kwargs: Mapping[str, Any]) -> _Payload:
    from engine.ml.registry import get_architecture

    factory = get_architecture(architecture)
    if isinstance(weights, (str, os.PathLike)):
        if not os.path.exists(weights):
            raise SpecError(f"model weights {os.fspath(weights)!r} not found: check the path")
        with open(weights, "rb") as f:
            data = f.read()
    elif isinstance(weights, (bytes, bytearray)):
        data = bytes(weights)
    elif isinstance(weights, Mapping):
        buf = io.BytesIO()
        torch.save(dict(weights), buf)
        data = buf.getvalue()
    else:
        raise SpecError(f"model weights of type {type(weights).__name__}: pass a path, bytes "
                        "or a state_dict")
    if _is_torchscript(data):
        raise SpecError("model weights are a TorchScript archive, not a state_dict: pass the "
                        "file itself as model= with allow_torchscript=True if you trust it")
    try:  # fail here, with one clear line, rather than in every task
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        factory(**dict(kwargs)).load_state_dict(state)
    except Exception as err:
        raise SpecError(f"weights do not load into architecture {architecture!r} with "
                        f"{dict(kwargs)}: {str(err).splitlines()[0]}") from err
    items = tuple(sorted(dict(kwargs).items()))
    extra = f"{architecture}:{getattr(factory, '__qualname__', '')}:{items!r}"
    return _Payload("state_dict", data, _digest("state_dict", data, extra), factory, items)


_TORCHSCRIPT_REFUSED = (
    "{what} is TorchScript, which is executable code run when it loads: pass "
    "allow_torchscript=True only for a file you trust, or ship a state_dict as "
    "ModelSpec(weights, architecture, kwargs)")


def _is_torchscript(data: bytes) -> bool:
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


@contextlib.contextmanager
def _quiet_jit() -> Any:
    """TorchScript save/load warn that they are deprecated; the user chose the format."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=DeprecationWarning)
        yield


#: Payload of each registered-architecture module, with the fingerprint of the weights it
#: was made from: a second predict() with an unchanged model skips saving it and checking
#: it against its architecture again (0.25 s for a 31 MB UNet; the fingerprint: 20 ms).
_MODULE_PAYLOADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's name, dtype, shape and bytes. Version
    counters are not enough: an in-place write through ``p.data`` (an EMA update,
    ``p.data.copy_``) does not bump ``p``'s counter."""
    h = hashlib.sha256()
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        data = t.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.contiguous().reshape(-1)
        h.update(data.view(torch.uint8).numpy().data if data.numel() else b"")
    return h.hexdigest()


def serialize_model(model: Any, *, allow_torchscript: bool = False) -> _Payload:
    """Serialise ``model`` once (see :func:`predict` for the accepted forms).

    A TorchScript *file* is executable code (its loader runs the TorchScript in it), so it
    is refused unless ``allow_torchscript=True``. A state_dict is read with
    ``torch.load(weights_only=True)``, which runs no code. A ``torch.jit.ScriptModule``
    or ``nn.Module`` object is already in this process: it is shipped to the workers as
    bytes made here, never read from a file.
    """
    if isinstance(model, _Payload):
        if model.kind == "torchscript" and model.origin == "file" and not allow_torchscript:
            raise SpecError(_TORCHSCRIPT_REFUSED.format(what="the model payload"))
        return model
    if isinstance(model, ModelSpec):
        return _state_dict_payload(model.weights, model.architecture, model.kwargs)
    if isinstance(model, tuple) and len(model) in (2, 3) and isinstance(model[1], str):
        return _state_dict_payload(model[0], model[1], model[2] if len(model) == 3 else {})
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.exists(path):
            raise SpecError(f"model file {path!r} not found: check the path")
        with open(path, "rb") as f:
            data = f.read()
        if not _is_torchscript(data):
            raise SpecError(f"{path!r} is not a TorchScript file: for a state_dict pass "
                            "ModelSpec(weights=path, architecture=NAME, kwargs={...})")
        if not allow_torchscript:
            raise SpecError(_TORCHSCRIPT_REFUSED.format(what=repr(path)))
        return _Payload("torchscript", data, _digest("torchscript", data), origin="file")
    if isinstance(model, torch.jit.ScriptModule):
        buf = io.BytesIO()
        with _quiet_jit():
            torch.jit.save(model, buf)
        data = buf.getvalue()
        return _Payload("torchscript", data, _digest("torchscript", data))
    if isinstance(model, nn.Module):
        arch = getattr(model, "_engine_architecture", None)
        if arch is not None:
            key = (repr(arch), _weights_fingerprint(model))
            cached = _MODULE_PAYLOADS.get(model)
            if cached is not None and cached[0] == key:
                return cached[1]
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            payload = _state_dict_payload(state, arch[0], arch[1])
            _MODULE_PAYLOADS[model] = (key, payload)
            return payload
        import cloudpickle

        # By value for classes defined in scripts/notebooks, by reference otherwise.
        buf = io.BytesIO()
        torch.save(model, buf, pickle_module=cloudpickle)
        data = buf.getvalue()
        return _Payload("module", data, _digest("module", data))
    raise SpecError(f"model of type {type(model).__name__}: pass an nn.Module, a TorchScript "
                    "path, or ModelSpec(weights, architecture, kwargs)")


# -- loading (worker side) ----------------------------------------------------------------
_LOCK = threading.Lock()
_FORWARD_LOCK = threading.Lock()
_CACHE: OrderedDict[tuple[str, str], nn.Module] = OrderedDict()
_CACHE_SIZE = 4
_LOADS = 0
_THREADS_SET = False


def model_load_count() -> int:
    """Models deserialised in this process so far (1 per model and device when cached)."""
    return _LOADS


def clear_model_cache() -> None:
    """Drop the cached models of this process (the load counter is kept)."""
    with _LOCK:
        _CACHE.clear()


def _load(payload: _Payload, device: torch.device) -> nn.Module:
    buf = io.BytesIO(payload.data)
    if payload.kind == "state_dict":
        assert payload.factory is not None
        model = payload.factory(**dict(payload.kwargs))
        model.load_state_dict(torch.load(buf, map_location="cpu", weights_only=True))
    elif payload.kind == "torchscript":
        with _quiet_jit():
            model = torch.jit.load(buf, map_location="cpu")
    else:  # bytes produced by serialize_model in this job, never from a file
        model = torch.load(buf, map_location="cpu", weights_only=False)
    model = model.to(device).eval()
    if device.type == "cuda":  # other threads use it on their own streams: copy done
        torch.cuda.synchronize(device)
    return model


def _get_model(payload: _Payload, device: torch.device) -> nn.Module:
    global _LOADS
    key = (payload.digest, str(device))
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = _load(payload, device)
            _LOADS += 1
            _CACHE[key] = model
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
    return model


def _in_worker() -> Any:
    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def _execution_context(device: str) -> tuple[torch.device, contextlib.AbstractContextManager]:
    """Resolve the device in *this* process and pick the block lock.

    In a distributed worker the nanny sets ``OMP_NUM_THREADS=1``, so each of the worker's
    threads runs its own single-threaded forward pass; without that variable torch gets
    ``cores // threads-per-worker`` threads. With the local threaded scheduler forward
    passes on the CPU are serialised by a process lock and each uses all of torch's
    threads, so ``n`` dask threads never start ``n x cores`` torch threads. On a GPU no
    lock is held around forward passes: each thread runs on its own CUDA stream, and a
    semaphore (:func:`engine.ml.device.gpu_semaphore`) bounds the blocks in flight.
    """
    global _THREADS_SET
    try:
        dev = resolve_device(device)
    except RuntimeError:
        raise RuntimeError(f"predict(device={device!r}) but this worker has no CUDA device: "
                           "use device='auto' or start GPU workers") from None
    if dev.type == "cuda":
        # fixed window shapes: let cuDNN time its algorithms once per shape
        torch.backends.cudnn.benchmark = bool(config.get("predict.cudnn-benchmark"))
        return dev, gpu_semaphore(dev)
    worker = _in_worker()
    if worker is None:
        return dev, _FORWARD_LOCK
    if not _THREADS_SET and "OMP_NUM_THREADS" not in os.environ:
        with _LOCK:
            budget = max(1, (os.cpu_count() or 1) // max(1, worker.state.nthreads))
            if budget < torch.get_num_threads():  # only ever lower it, and only once
                torch.set_num_threads(budget)
            _THREADS_SET = True
    return dev, contextlib.nullcontext()


@functools.lru_cache(maxsize=16)
def _cuda_name(index: int) -> str:
    name = f"{torch.cuda.get_device_name(index)} (cuda:{index})"
    try:  # its busy share is sampled through NVML for the throughput table
        meter.watch_gpu(name, str(torch.cuda.get_device_properties(index).uuid))
    except Exception:  # NVML missing or unusable: the row has no busy share
        pass
    return name


def _gpu_name(dev: torch.device | None) -> str | None:
    """``"NAME (cuda:i)"`` of a CUDA device, for the per-GPU throughput summary."""
    if dev is None or dev.type != "cuda":
        return None
    return _cuda_name(dev.index if dev.index is not None else torch.cuda.current_device())


def _locks(dev: torch.device, lock: Any) -> tuple[Any, Any]:
    """``(block lock, forward lock)`` from the execution context's lock.

    On a CPU shared by the local threaded scheduler a whole block holds the lock: torch's
    intra-op threads spin on every core during a forward pass, and another dask thread
    cutting windows meanwhile slowed the forward passes by a third (measured on 2 cores).
    On a GPU the block holds a slot of the device's semaphore and forward passes hold
    nothing.
    """
    return lock, contextlib.nullcontext()


def _autocast(dev: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``dev``. On CUDA ``"fp32"`` also turns
    TF32 off for convolutions and matrix products in this process (cuDNN uses TF32 for
    float32 convolutions by default: a 10-bit mantissa, ~1e-3 relative error), and
    ``"tf32"`` turns it on."""
    choice = _PRECISIONS[precision]
    if dev.type == "cuda" and choice in (None, "tf32"):
        torch.backends.cudnn.allow_tf32 = choice == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = choice == "tf32"
    dtype = (torch.bfloat16 if dev.type == "cuda" else None) if choice == "auto" else choice
    if not isinstance(dtype, torch.dtype):
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=dtype)


def _run_model(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``model(batch)``; its tensor (the first item of a tuple or list). An error inside
    the model gets a note with the shape of the windows it was given."""
    try:
        out = model(batch)
    except Exception as err:
        what = ("windows: batch, input channels, then the tile dims in the cube's order"
                if batch.ndim > 2 else "pixels: batch, input features")
        err.add_note(f"(predict: the model was given {what}, shape {tuple(batch.shape)})")
        raise
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned a {type(out).__name__}; predict needs a tensor "
                        "(or a tuple or list whose first item is one)")
    return out


def _forward(model: nn.Module, batch: Any, dev: torch.device, xp: Any) -> Any:
    """Run ``model`` on an (n, ...) float32 batch; returns float32 in the batch's library."""
    t = torch.from_numpy(batch) if xp is np else torch.from_dlpack(batch)
    if t.device != dev:
        t = t.to(dev, non_blocking=True)
    out = _run_model(model, t).float()
    if xp is np:
        return out.cpu().numpy()
    return xp.from_dlpack(out.contiguous())


def _namespace(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return np
    import importlib

    return importlib.import_module(type(x).__module__.split(".")[0])


@functools.lru_cache(maxsize=16)
def _block_weight_sum(ext: tuple[int, ...], tile: tuple[int, ...], stride: tuple[int, ...],
                      blend: str) -> np.ndarray:
    counts = tuple(max(0, (e - t) // s + 1) for e, t, s in zip(ext, tile, stride, strict=True))
    w = gaussian_weights(tile) if blend == "gaussian" else np.ones(tile, np.float32)
    wsum = np.zeros(ext, np.float32)
    overlap_add(wsum, np.broadcast_to(w, counts + tile), stride)
    wsum[wsum == 0] = 1.0  # only halo pixels no full window reaches; trimmed afterwards
    wsum.setflags(write=False)
    return wsum


# -- block functions ----------------------------------------------------------------------
def _predict_tiles(spec: tuple, index: tuple[int, ...], payload: _Payload, *pieces: Any,
                   tile: tuple[int, ...], stride: tuple[int, ...],
                   batch_size: int | None, blend: str, out_channels: int, device: str,
                   precision: str, fill_value: float | None, tiling: TiledPlan) -> Any:
    """One halo-extended block and the model -> its core ``(*others, out, *core)``.

    The block ``(*others, C, *ext)`` (all channels, float32) is assembled here from the
    input chunks ``pieces`` by :func:`engine.ops.tiled.gather` (the ``spec``): into this
    thread's reused buffer on the host, or into pinned memory on its way to a CUDA device
    (one copy from the chunks to the device, through the pinned buffer). Local index 0 of
    the block is a grid point (block boundaries are multiples of the stride in the padded
    array), so the block runs every full window of its local grid. Only the block's core
    (:meth:`~engine.ops.tiled.TiledPlan.core`) is returned: the halo's blend is
    incomplete, and never stored; the core's real pixels (inside ``tiling.real``) are
    counted for the meter.
    On a CUDA device the whole block runs there (:func:`_tiles_on_device`).
    """
    t0 = time.perf_counter()
    k = len(tile)
    shape = block_shape(spec, pieces)
    others, n_in, ext = shape[:-k - 1], shape[-k - 1], shape[-k:]
    m_count = math.prod(others)
    counts = tuple(max(0, (e - t) // s + 1) for e, t, s in zip(ext, tile, stride, strict=True))
    at = index[len(index) - k:]
    core = tuple(tiling.core(j, i) for j, i in enumerate(at))
    dev, lock = _execution_context(device)
    block_lock, step_lock = _locks(dev, lock)
    model = _get_model(payload, dev)
    xp = _namespace(pieces[0])
    block: Any
    if dev.type == "cuda" and xp is np:
        block = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        gather(spec, pieces, out=block.numpy())
    else:
        block = gather(spec, pieces, out=_scratch(xp, "block", shape))
    block = block.reshape(m_count, n_in, *ext)
    run = _tiles_on_device if dev.type == "cuda" else _tiles_on_host
    with block_lock, torch.inference_mode():
        out = run(block, model, payload.digest, dev, step_lock, tile=tile, stride=stride,
                  counts=counts, core=core, batch_size=batch_size, blend=blend,
                  out_channels=out_channels, precision=precision, fill_value=fill_value)
    pixels = m_count
    for b, (lo, hi), i in zip(tiling.bounds, tiling.real, at, strict=True):
        pixels *= max(0, min(b[i + 1], hi) - max(b[i], lo))
    meter.record("predict", items=m_count * math.prod(counts), pixels=pixels,
                 bytes_read=4 * math.prod(shape),
                 seconds=time.perf_counter() - t0, gpu=_gpu_name(dev))
    return out.reshape(*others, out_channels, *out.shape[2:])


def _check_out(out: Any, n: int, out_channels: int, tile: tuple[int, ...]) -> Any:
    if out.ndim == len(tile) + 1 and out_channels == 1:
        out = out[:, None]
    if tuple(out.shape) != (n, out_channels, *tile):
        raise RuntimeError(f"model returned shape {tuple(out.shape)} for {n} windows of "
                           f"{tile}; expected (batch, {out_channels}, *{tile}): check "
                           "out_channels= and the model")
    return out


_SCRATCH = threading.local()


def _scratch(xp: Any, slot: str, shape: tuple[int, ...]) -> Any:
    """A float32 work array of ``shape``, reused by this thread from block to block.

    A fresh numpy array of megabytes is fresh pages: the first write to each 4 kB page
    faults, which costs more than the copy into it (a 576 x 576 accumulator: 0.85 ms of
    faults on a 2-core VM, 0.05 ms of zeroing reused). A thread keeps its buffers while
    together they stay within ``predict.scratch-mib`` (the rest are allocated per
    block); cupy has its own pool.
    """
    if xp is not np:
        return xp.empty(shape, xp.float32)
    n = math.prod(shape)
    bufs: dict[str, np.ndarray] = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if buf is None or buf.size < n:
        buf = np.empty(n, np.float32)
        kept = sum(b.nbytes for k, b in bufs.items() if k != slot)
        if kept + buf.nbytes <= 2**20 * float(config.get("predict.scratch-mib")):
            bufs[slot] = buf
    return buf[:n].reshape(shape)


def _run_slab(cut: torch.Tensor, acc: torch.Tensor, grid: tuple[int, ...], model: nn.Module,
              dev: torch.device, step_lock: Any, precision: str, bs: int, out_channels: int,
              tile: tuple[int, ...], stride: tuple[int, ...],
              weights: torch.Tensor | None) -> None:
    """A slab's windows ``cut`` (``(n, C, *tile)``, a ``grid`` of windows in C order)
    through the model in batches of ``bs``, each batch's output added, weighted, into
    ``acc`` (``(O, *spatial)``, window 0 at its origin) straight from the model
    (:func:`engine.ml.device.fold_add_run`): no buffer of predictions, no weighted
    copy. The host and the device paths share it."""
    for b0 in range(0, len(cut), bs):
        batch = cut[b0:b0 + bs]
        with step_lock, _autocast(dev, precision):
            out = _check_out(_run_model(model, batch.to(dev)), len(batch), out_channels, tile)
        fold_add_run(acc, out.float().to(acc.device), grid, b0, stride, weights)


def _tiles_on_host(x: Any, model: nn.Module, digest: str, dev: torch.device,
                   step_lock: Any, *, tile: tuple[int, ...], stride: tuple[int, ...],
                   counts: tuple[int, ...], core: tuple[slice, ...],
                   batch_size: int | None, blend: str,
                   out_channels: int, precision: str, fill_value: float | None) -> Any:
    """The block on the host (numpy, or cupy blocks with a CPU model): windows cut as
    strided views in slabs of whole window rows, one copy per slab, batches through the
    model, and each batch's output added, weighted, straight into this thread's reused
    accumulator (:func:`engine.ml.device.fold_add_run`: one fused multiply-add per grid
    offset class and box of the batch's windows, no buffer of predictions); the ``core``
    divided by the summed weights is the one fresh array (``x`` is the caller's own
    buffer, NaN filled in place). Python loops over slabs, batches and boxes, never over
    windows; memory holds one slab's windows, not the block's."""
    from engine.kernels.windows import window_view

    xp = _namespace(x)
    k = len(tile)
    m_count, n_in, ext = x.shape[0], x.shape[1], tuple(x.shape[2:])
    bs = int(batch_size or config.get("predict.tile-batch-size"))
    if fill_value is not None:
        x[xp.isnan(x)] = xp.float32(fill_value)
    win = window_view(x, range(2, 2 + k), tile, stride, count=counts)  # (M, C, *nw, *tile)
    acc_x = _scratch(xp, "acc", (m_count, out_channels, *ext))
    acc_x[...] = 0
    acc = torch.from_numpy(acc_x) if xp is np else torch.from_dlpack(acc_x)
    weights = (_device_const(("gauss", tile), lambda: gaussian_weights(tile), acc.device)
               if blend == "gaussian" else None)
    rest = math.prod(counts[1:])
    rows = max(1, min(counts[0], -(-max(bs, _SLAB_WINDOWS) // max(rest, 1))))
    for m, i0 in itertools.product(range(m_count), range(0, counts[0] if rest else 0, rows)):
        r = min(rows, counts[0] - i0)
        # (C, r, *rest_counts, *tile) view -> (r, *rest_counts, C, *tile), one copy
        cut = _scratch(xp, "cut", (r, *counts[1:], n_in, *tile))
        cut[...] = xp.moveaxis(win[m, :, i0:i0 + r], 0, k)
        cut = cut.reshape(r * rest, n_in, *tile)
        _run_slab(torch.from_numpy(cut) if xp is np else torch.from_dlpack(cut),
                  acc[m, :, i0 * stride[0]:], (r, *counts[1:]), model, dev, step_lock,
                  precision, bs, out_channels, tile, stride, weights)
    # the core only, divided by the summed weights into the one fresh array of the block
    wsum = _block_weight_sum(ext, tile, stride, blend)[core]
    cut_acc = acc_x[(slice(None), slice(None), *core)]
    return xp.divide(cut_acc, wsum if xp is np else xp.asarray(wsum))


_DEVICE_SLAB = 8192  # windows cut at once on a GPU (one gather; ~100 MB for 3x64x64)
_DEVICE_CONST: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def _device_const(key: tuple, make: Callable[[], np.ndarray], dev: torch.device) -> Any:
    """A read-only array (weights, weight sums) uploaded once per device and cached."""
    full = (*key, str(dev))
    with _LOCK:
        t = _DEVICE_CONST.get(full)
        if t is None:
            t = _DEVICE_CONST[full] = torch.from_numpy(np.array(make())).to(dev)
            if dev.type == "cuda":  # read by every thread's stream: the copy must be done
                torch.cuda.current_stream(dev).synchronize()
            while len(_DEVICE_CONST) > 32:
                _DEVICE_CONST.popitem(last=False)
    return t


def _tiles_on_device(block: Any, model: nn.Module, digest: str, dev: torch.device,
                     step_lock: Any, *, tile: tuple[int, ...], stride: tuple[int, ...],
                     counts: tuple[int, ...], core: tuple[slice, ...],
                     batch_size: int | None, blend: str,
                     out_channels: int, precision: str, fill_value: float | None) -> Any:
    """The whole block on a CUDA device, on this thread's own stream.

    One host->device copy (pinned, ``non_blocking``; cupy blocks are already there),
    windows cut on the device as an unfolded view (one gather per slab), forward passes,
    each batch's output added, weighted, by fused strided multiply-adds
    (:func:`engine.ml.device.fold_add_run`) into a device accumulator, the ``core``'s
    division by the summed weights, and one copy back of the core (none for cupy). The
    forward passes of other threads' blocks, their copies and their host work overlap
    this one.
    """
    k = len(tile)
    m_count, n_in, ext = block.shape[0], block.shape[1], tuple(block.shape[2:])
    stream = thread_stream(dev)
    with torch.cuda.stream(stream):
        x = to_device(block, dev, fill_value=fill_value)  # (M, C, *ext)
        acc = torch.zeros((m_count, out_channels, *ext), device=dev, dtype=torch.float32)
        rest = math.prod(counts[1:])
        if rest and counts[0]:
            win = unfold_windows(x, 2, tile, stride)  # (M, C, *counts, *tile), a view
            bs = int(batch_size or auto_batch_size(
                model, (n_in, *tile), dev, _autocast(dev, precision),
                key=(digest, precision)))
            weights = (_device_const(("gauss", tile), lambda: gaussian_weights(tile), dev)
                       if blend == "gaussian" else None)
            rows = max(1, min(counts[0], -(-max(bs, _DEVICE_SLAB) // rest)))
            for m, i0 in itertools.product(range(m_count), range(0, counts[0], rows)):
                r = min(rows, counts[0] - i0)
                # (C, r, *rest, *tile) -> (r*rest, C, *tile): one gather on the device
                cut = win[m, :, i0:i0 + r].movedim(0, k).reshape(r * rest, n_in, *tile)
                _run_slab(cut, acc[m, :, i0 * stride[0]:], (r, *counts[1:]), model, dev,
                          step_lock, precision, bs, out_channels, tile, stride, weights)
        wsum = _device_const(("wsum", ext, tile, stride, blend),
                             lambda: _block_weight_sum(ext, tile, stride, blend), dev)
        core_acc = acc[(slice(None), slice(None), *core)] / wsum[core]
        return to_host(core_acc, like=block)


def _predict_points(*args: Any, batch_size: int, out_channels: int, device: str,
                    precision: str, fill_value: float | None) -> Any:
    """One block per feature ``(*cells)`` -> ``(*cells, out)``; NaN rows skip the model."""
    t0 = time.perf_counter()
    *blocks, payload = args
    xp = _namespace(blocks[0])
    shape = blocks[0].shape
    dev = None
    x = xp.empty((math.prod(shape), len(blocks)), xp.float32)
    for j, b in enumerate(blocks):
        x[:, j] = b.reshape(-1)
    if fill_value is not None:
        x[xp.isnan(x)] = fill_value
        rows = None
    else:
        valid = xp.isfinite(x).all(axis=1)
        rows = None if bool(valid.all()) else xp.flatnonzero(valid)
    out = xp.full((len(x), out_channels), xp.nan, xp.float32)
    n = len(x) if rows is None else len(rows)
    if n:
        dev, lock = _execution_context(device)
        block_lock, step_lock = _locks(dev, lock)
        model = _get_model(payload, dev)
        with block_lock, torch.inference_mode():
            for b0 in range(0, n, batch_size):
                sel = slice(b0, min(n, b0 + batch_size)) if rows is None else \
                    rows[b0:b0 + batch_size]
                batch = xp.ascontiguousarray(x[sel])
                with step_lock, _autocast(dev, precision):
                    y = _forward(model, batch, dev, xp)
                out[sel] = y.reshape(len(batch), -1)
    meter.record("predict", items=n, pixels=math.prod(shape),
                 bytes_read=sum(int(b.nbytes) for b in blocks),
                 seconds=time.perf_counter() - t0, gpu=_gpu_name(dev))
    return out.reshape(*shape, out_channels)


# -- graph construction -------------------------------------------------------------------
def _inputs(obj: xr.Dataset | xr.DataArray, variables: Sequence[str] | None,
            channel_dim: str | None) -> list[xr.DataArray]:
    """One DataArray per input channel, all with the same dims in the same order."""
    if isinstance(obj, xr.Dataset):
        if channel_dim is not None:
            raise SpecError(f"channel_dim={channel_dim!r} is for a DataArray: a Dataset's "
                            "input channels are its variables (variables=)")
        names = list(variables) if variables is not None else [str(v) for v in obj.data_vars]
        missing = [v for v in names if v not in obj.data_vars]
        if missing or not names:
            raise CubeError(f"variables {missing or names} are not in the cube (it has "
                            f"{list(obj.data_vars)}): pass variables= that exist")
        arrays = [obj[v] for v in names]
    else:
        ch = channel_dim or next((d for d in _CHANNEL_NAMES if d in obj.dims), None)
        if channel_dim is not None and channel_dim not in obj.dims:
            raise CubeError(f"channel_dim {channel_dim!r} is not a dim of {obj.dims}")
        arrays = [obj] if ch is None else [obj.isel({ch: i}, drop=True)
                                           for i in range(obj.sizes[ch])]
    dims = arrays[0].dims
    for a in arrays[1:]:
        if set(a.dims) != set(dims):
            raise CubeError(f"input variables have different dims ({a.dims} vs {dims}): "
                            "select variables on the same grid")
    out = []
    for a in arrays:
        a = a.transpose(*dims)
        out.append(a if isinstance(a.data, da.Array) else a.chunk())
    return out


def _whole(v: Any) -> bool:
    """A whole number >= 1 (not a bool, not a float with a fraction, not a string)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and bool(v >= 1)


def _check_boundary(boundary: Any) -> None:
    try:
        pad_kwargs(boundary)
    except ValueError as err:
        raise SpecError(str(err)) from None


def predict(
    obj: xr.Dataset | xr.DataArray,
    model: Any,
    *,
    variables: Sequence[str] | None = None,
    tile: Mapping[str, int] | None = _DEFAULT_TILE,
    overlap: float = 0.5,
    batch_size: int | None = None,
    blend: Literal["gaussian", "mean"] = "gaussian",
    device: str = "auto",
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto",
    out_channels: int = 1,
    output_name: str = "prediction",
    boundary: Any = "reflect",
    channel_dim: str | None = None,
    fill_value: float | None = None,
    allow_torchscript: bool = False,
    resources: Mapping[str, float] | None = None,
) -> xr.DataArray:
    """Run a torch model blockwise over a cube; returns a lazy DataArray.

    Parameters
    ----------
    obj
        A Dataset (``variables`` are stacked as input channels) or a DataArray whose
        channel dim is ``channel_dim`` (default: one of variable/channel/band/feature; a
        DataArray without one is a single channel). Other dims (e.g. time) are iterated.
    model
        An ``nn.Module``; a TorchScript file path (only with ``allow_torchscript=True``);
        or :class:`ModelSpec` / ``(weights, architecture, kwargs)`` with a state_dict and a
        registered architecture. **Model files that are TorchScript or pickles are
        executable code**: loading one runs whatever it contains. State_dicts are read with
        ``torch.load(weights_only=True)`` and run nothing; an ``nn.Module`` object is
        pickled here and unpickled only by this job's workers.
    tile
        Window size per tiled dim (whole numbers). The model gets windows
        ``(batch, channels, *tile)`` with the tile axes in the cube's dim order, as
        :func:`engine.ops.patches.iter_patches` cuts training patches, not in the order of
        the keys here. ``None`` or ``{}``: a per-pixel model mapping ``(n, channels)`` to
        ``(n, out_channels)``.
    overlap
        Window overlap in ``[0, 1)``; stride ``= round(tile * (1 - overlap))``.
    batch_size
        Windows (or pixels) per model call, a whole number >= 1. Default for tiles: on a
        GPU the largest power of two that half the free device memory holds for the
        blocks in flight (measured once per model), on the CPU config
        ``predict.tile-batch-size`` (32); for pixels config ``predict.batch-size``.
    blend
        ``"gaussian"`` (sigma = tile/8) or ``"mean"`` weighting of overlapping windows.
    device
        ``"auto"`` (CUDA when the worker has it), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        ``"cuda"`` annotates the tasks with ``resources={"GPU": 1/n}`` (``n`` = config
        ``predict.gpu-tasks-per-gpu``, 4): a GPU worker (``--resources GPU=1``, as
        ``--cluster local-cuda`` starts them) runs ``n`` blocks at once, each on its own
        CUDA stream, so copies, forward passes and host work of different blocks overlap.
        On a CUDA device a block's windows are cut, run and blended on the device, with
        one copy in and one copy out per block (none for cupy-backed cubes).
    precision
        ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"fp32"`` (on CUDA without
        TF32, so it matches the CPU), ``"tf32"``, ``"bf16"``, ``"fp16"``.
    out_channels
        Model output channels; more than one adds a ``"channel"`` dim.
    boundary
        Content of the padding past both array edges that the edge windows read:
        ``"reflect"`` (``np.pad(mode="reflect")``: mirrored about the edge pixel, which is
        not repeated), ``"nearest"`` (the edge pixel repeated), ``"constant"`` (zeros) or
        a number (NaN too: the edge windows then read NaN, which ``fill_value`` replaces
        like any NaN input). The grid reaches ``tile - stride`` past each edge, so edge
        pixels are blended from as many windows as interior pixels.
    fill_value
        Replace NaN inputs by this value before the model. None: in pointwise mode NaN
        pixels give NaN; in tiled mode NaN propagates through the model.
    allow_torchscript
        Load a TorchScript file given as ``model``. Off by default: TorchScript is code.
    resources
        Worker resources each inference task asks for (dask annotations). Default:
        ``{"GPU": 1/n}`` for ``device="cuda"`` (see ``device``), none otherwise.

    Returns
    -------
    DataArray
        Lazy, float32, chunked exactly like the input along the input's dims. Every graph
        key is named from a token of the inputs, the model content and every parameter, so
        several predictions compose in one graph and a repeated call has the same keys.

    Examples
    --------
    >>> import torch
    >>> from engine.testing.cubes import synthetic_cube
    >>> ds = synthetic_cube({"time": 2, "lat": 64, "lon": 64}, chunks={"lat": 32})
    >>> net = torch.nn.Conv2d(3, 1, 3, padding=1)
    >>> out = predict(ds, net, tile={"lat": 32, "lon": 32})
    >>> out.dims, out.shape
    (('time', 'lat', 'lon'), (2, 64, 64))
    """
    arrays = _inputs(obj, variables, channel_dim)
    if precision not in _PRECISIONS:
        raise SpecError(f"precision={precision!r}: use auto, fp32, tf32, bf16 or fp16")
    if blend not in ("gaussian", "mean"):
        raise SpecError(f"blend={blend!r}: use 'gaussian' or 'mean'")
    if not _whole(out_channels):
        raise SpecError(f"out_channels={out_channels!r} must be a whole number >= 1")
    if batch_size is not None and not _whole(batch_size):
        raise SpecError(f"batch_size={batch_size!r}: use a whole number >= 1, or None for "
                        "the default")
    if out_channels > 1 and CHANNEL_DIM in arrays[0].dims:
        raise CubeError(f"the cube has a dim {CHANNEL_DIM!r} already, and out_channels="
                        f"{out_channels} adds one: rename it first (e.g. "
                        f"ds.rename({{{CHANNEL_DIM!r}: 'level'}}))")
    if not (device == "auto" or device.split(":")[0] in ("cpu", "cuda", "mps")):
        raise SpecError(f"device={device!r}: use auto, cpu, cuda or cuda:N")
    payload = serialize_model(model, allow_torchscript=allow_torchscript)
    # One key holds the model bytes; every block task references it.
    payload_key = dask.delayed(payload, name=f"model-{payload.digest[:16]}", pure=True,
                               traverse=False)
    dims = arrays[0].dims
    meta_x = arrays[0].data._meta
    xp = _namespace(meta_x) if type(meta_x).__module__.startswith("cupy") else np
    common = {"out_channels": int(out_channels), "device": device, "precision": precision,
              "fill_value": fill_value}
    gpu = device.startswith("cuda")
    # a share of a GPU worker's GPU=1 resource: gpu_slots() blocks run at once per GPU
    if resources is None and gpu:
        resources = {"GPU": 1 / gpu_slots()}
    annotate = (dask.annotate(resources=dict(resources)) if resources
                else contextlib.nullcontext())
    attrs = {"engine_model_hash": payload.digest, "engine_model_format": payload.kind}
    out_dims: list[Any]

    if not tile:
        pbs = int(config.get("predict.batch-size", batch_size))
        data = [a.data.rechunk(arrays[0].data.chunks) for a in arrays]
        # every key names all it depends on: the inputs (their dask names hold data and
        # chunking), the model content and every parameter; two calls compose in one graph
        token = dask.base.tokenize("points", [x.name for x in data], payload.digest, pbs,
                                   sorted(common.items()))
        with annotate:
            y = da.map_blocks(_predict_points, *data, payload_key, new_axis=len(dims),
                              chunks=data[0].chunks + ((out_channels,),), dtype=np.float32,
                              meta=xp.empty((0,) * (len(dims) + 1), np.float32),
                              name=f"predict-points-{token}", batch_size=pbs, **common)
        out_dims = list(dims) + [CHANNEL_DIM]
        attrs["engine_predict"] = f"pointwise batch_size={pbs}"
    else:
        if not isinstance(tile, Mapping) or not all(_whole(v) for v in tile.values()):
            raise SpecError(f"tile={tile!r}: give a mapping of dim name to a whole number of "
                            "pixels >= 1, e.g. {'lat': 64, 'lon': 64}")
        unknown = [d for d in tile if d not in dims]
        if unknown:
            default = (f" (the default tile is {dict(_DEFAULT_TILE)}: pass tile= with this "
                       "cube's dims)" if tile is _DEFAULT_TILE else "")
            raise CubeError(f"tile dims {unknown} are not dims of the input {dims}{default}")
        empty = [d for d in tile if arrays[0].sizes[d] == 0]
        if empty:
            raise CubeError(f"tile dims {empty} have length 0: nothing to predict")
        if not 0 <= overlap < 1:
            raise SpecError(f"overlap={overlap}: use a value in [0, 1)")
        _check_boundary(boundary)
        tile_dims = [str(d) for d in dims if d in tile]
        others = [str(d) for d in dims if d not in tile]
        size = tuple(int(tile[d]) for d in tile_dims)
        stride = tuple(max(1, int(round(t * (1 - overlap)))) for t in size)
        # on a GPU the batch comes from the device's free memory when not given (in the
        # worker: engine.ml.device.auto_batch_size); on the CPU from the config
        bs: int | None = (int(batch_size) if batch_size is not None else
                          int(config.get("predict.tile-batch-size")) if device == "cpu"
                          else None)
        k0 = len(others)
        xs = [a.transpose(*others, *tile_dims).data for a in arrays]
        in_chunks = xs[0].chunks
        xs = [xs[0]] + [x.rechunk(in_chunks) for x in xs[1:]]
        # the global grid: same margin past both edges (engine.kernels.windows.grid_padding),
        # blocks cut at multiples of the stride near the input's chunk boundaries
        plan = plan_tiles(xs[0].shape[k0:], in_chunks[k0:], size, stride)
        params = {"tile": size, "stride": stride, "batch_size": bs, "blend": blend,
                  "tiling": plan, **common}
        token = dask.base.tokenize("tiles", [x.name for x in xs], in_chunks, payload.digest,
                                   str(boundary), type(boundary).__name__,
                                   sorted(params.items()))
        # one task per padded, halo-extended block with all channels (engine.ops.tiled):
        # the padded array holds the whole grid from its index 0, so no off-grid window
        # is ever run, and halos exist only between blocks
        with annotate:
            y = map_gathered(_predict_tiles, xs, plan, boundary, f"predict-tiles-{token}",
                             lead=out_channels, meta=xp.empty(0, np.float32), cores=True,
                             args=(payload_key,), **params)
        # the blocks' cores, cut back to the input's chunking (one task per chunk), so the
        # output writes and merges next to its input
        y = crop_blocks(y, plan, in_chunks, f"crop-{token}", squeeze=out_channels == 1,
                        cores=True)
        out_dims = others + ([CHANNEL_DIM] if out_channels > 1 else []) + tile_dims
        attrs["engine_predict"] = (f"tile={dict(zip(tile_dims, size, strict=True))} stride="
                                   f"{dict(zip(tile_dims, stride, strict=True))} blend={blend} "
                                   f"boundary={boundary} batch_size={bs or 'auto'}")
    if out_channels == 1 and CHANNEL_DIM in out_dims:
        ax = out_dims.index(CHANNEL_DIM)
        y = y[(slice(None),) * ax + (0,)]
        out_dims.remove(CHANNEL_DIM)
    coords = {k: v for k, v in arrays[0].coords.items() if set(v.dims) <= set(out_dims)
              and not (k == CHANNEL_DIM and CHANNEL_DIM in out_dims)}
    result = xr.DataArray(y, dims=out_dims, coords=coords, name=output_name, attrs=attrs)
    order = [d for d in dims if d in out_dims]
    if CHANNEL_DIM in out_dims:
        at = order.index(tile_dims[0]) if tile else len(order)
        order.insert(at, CHANNEL_DIM)
    return result.transpose(*order)
