"""Keeping a GPU fed: device resolution, per-thread CUDA streams, pinned host->device
copies, on-device window cutting and overlap-add, batch sizes from free memory, a
prefetching batch loader for training, and GPU utilisation sampling.

Everything here also runs on the CPU (the CUDA-only parts are no-ops there), so the
same code paths are exercised by the default, GPU-less test tier.

Why these pieces (see ``../shared/research/distributed_patterns.md``):

- A dask worker runs several tasks at once, one per thread. Each thread gets its own
  CUDA stream (:func:`thread_stream`), so one block's host->device copy, another's
  forward pass and a third's copy back overlap on the device; nothing holds a process
  lock around a forward pass. :func:`gpu_slots` bounds the blocks in flight per GPU.
- A copy from pageable host memory is synchronous and bounces through a driver buffer;
  :func:`to_device` stages it in pinned memory (torch's caching host allocator reuses
  those buffers) and copies ``non_blocking`` on the current stream.
- :func:`unfold_windows` cuts the windows of a block as strided views
  (``Tensor.unfold``) and :func:`fold_add` blends window predictions back with one
  strided in-place add per grid offset class (4 for 50 % overlap in 2-D), on whichever
  device the tensors live: no Python loop over windows, no per-window copy.
- :class:`DeviceLoader` turns an iterable of host batches (``iter_patches``) into device
  tensors with a producer thread that pins them and a side stream that copies batch
  ``i+1`` while the model computes batch ``i``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from engine import config
from engine.errors import SpecError

__all__ = [
    "resolve_device",
    "thread_stream",
    "gpu_slots",
    "gpu_semaphore",
    "to_device",
    "to_host",
    "unfold_windows",
    "fold_add",
    "fold_add_run",
    "grid_boxes",
    "auto_batch_size",
    "DeviceLoader",
    "GpuSampler",
]

_LOCAL = threading.local()
_LOCK = threading.Lock()
_SEMAPHORES: dict[str, threading.BoundedSemaphore] = {}
_BATCH_CACHE: dict[tuple, int] = {}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the CUDA device of this process if it has one, else the CPU.

    Raises a one-line ``SpecError`` for a string that names no device, and a one-line
    ``RuntimeError`` for ``"cuda"`` (or ``"mps"``) where this process has none.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise SpecError(f"device={device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {str(device)!r} but this process has no MPS device: "
                           "use device='auto'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} but this process has no CUDA device: "
                               "use device='auto' or run on GPU workers")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def thread_stream(dev: torch.device) -> Any:
    """This thread's own CUDA stream on ``dev`` (created once per thread and device);
    None on the CPU."""
    if dev.type != "cuda":
        return None
    streams = getattr(_LOCAL, "streams", None)
    if streams is None:
        streams = _LOCAL.streams = {}
    s = streams.get(dev.index)
    if s is None:
        s = streams[dev.index] = torch.cuda.Stream(device=dev)
    return s


def gpu_slots() -> int:
    """Blocks in flight per GPU (config ``predict.gpu-tasks-per-gpu``, a power of two).

    Inference tasks ask for ``GPU = 1 / slots`` of a worker's ``GPU=1`` resource, so a
    GPU worker runs that many at once (one per thread: start GPU workers with at least
    that many threads); a power of two keeps the fractions exact in the scheduler's
    bookkeeping.
    """
    n = int(config.get("predict.gpu-tasks-per-gpu"))
    if n < 1 or n & (n - 1):
        raise ValueError(f"engine.predict.gpu-tasks-per-gpu={n}: use a power of two (1, 2, 4, "
                         "8)")
    return n


def gpu_semaphore(dev: torch.device) -> Any:
    """Bounds the blocks this process works on at once on ``dev`` (:func:`gpu_slots`);
    a null context on the CPU. Bounds device memory, not concurrency on the host."""
    if dev.type != "cuda":
        return contextlib.nullcontext()
    with _LOCK:
        sem = _SEMAPHORES.get(str(dev))
        if sem is None:
            sem = _SEMAPHORES[str(dev)] = threading.BoundedSemaphore(gpu_slots())
    return sem


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def to_device(x: Any, dev: torch.device, *, fill_value: float | None = None) -> torch.Tensor:
    """``x`` (numpy, cupy or a torch tensor) as a float32 tensor on ``dev``.

    numpy input on a CUDA device: copied once into a pinned host buffer (torch's caching
    host allocator reuses them) and on to the device ``non_blocking`` on the current
    stream. cupy input stays on the device (DLPack, no host round trip). ``fill_value``
    replaces NaN, on the device.
    """
    if isinstance(x, torch.Tensor):  # e.g. a block assembled straight into pinned memory
        t = x.to(dev, torch.float32, non_blocking=True)
    elif _is_cupy(x):
        t = torch.from_dlpack(x).to(dev, torch.float32)
    elif dev.type == "cuda":
        host = torch.empty(x.shape, dtype=torch.float32, pin_memory=True)
        host.numpy()[...] = x
        t = host.to(dev, non_blocking=True)
    else:
        t = torch.from_numpy(np.asarray(x, np.float32))
    if fill_value is not None:
        t = torch.nan_to_num(t, nan=float(fill_value), posinf=float("inf"),
                             neginf=float("-inf"))
    return t


def to_host(t: torch.Tensor, like: Any = None) -> Any:
    """A device tensor back as a numpy array (one pinned, non_blocking copy, then a sync
    of the current stream), or as a cupy array without leaving the device when ``like``
    is cupy."""
    if like is not None and _is_cupy(like):
        import cupy

        torch.cuda.current_stream(t.device).synchronize()
        return cupy.from_dlpack(t.contiguous())
    if t.device.type != "cuda":
        return t.numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    # a plain copy: pinned buffers go back to torch's cache instead of living in dask's
    # memory as task results
    return host.numpy().copy()


def unfold_windows(x: torch.Tensor, first_axis: int, size: Sequence[int],
                   stride: Sequence[int]) -> torch.Tensor:
    """All full windows of ``x`` over ``len(size)`` axes from ``first_axis``, as a view.

    ``(M, C, H, W)`` with ``first_axis=2`` gives ``(M, C, nH, nW, sH, sW)``; window
    ``i`` starts at ``i * stride`` (the grid is anchored at index 0).
    """
    for j, (s, st) in enumerate(zip(size, stride, strict=True)):
        x = x.unfold(first_axis + j, int(s), int(st))
    return x


def fold_add(acc: torch.Tensor, preds: torch.Tensor, stride: Sequence[int],
             weights: torch.Tensor | None = None) -> None:
    """``acc[..., i*stride : i*stride+size] += w * preds[..., i, size]`` in place.

    ``acc`` is ``(*lead, *spatial)``, ``preds`` ``(*lead, *counts, *size)``, ``weights``
    (``size``, optional) multiplies every window as it is added (one fused
    ``addcmul_``, no weighted copy). Windows whose numbers agree modulo
    ``ceil(size/stride)`` never overlap, so each offset class is one in-place add through
    an unfolded (strided) view of ``acc``: the torch counterpart of
    :func:`engine.kernels.windows.overlap_add`, on any device.
    """
    k = len(stride)
    lead = acc.ndim - k
    counts, size = preds.shape[lead:lead + k], preds.shape[lead + k:]
    if preds.ndim != lead + 2 * k or preds.shape[:lead] != acc.shape[:lead]:
        raise ValueError(f"windows of shape {tuple(preds.shape)} do not match an accumulator "
                         f"of shape {tuple(acc.shape)} with {k} window axes")
    if min(stride) < 1:
        raise ValueError(f"stride {tuple(stride)}: every step must be >= 1")
    for c, s, st, n in zip(counts, size, stride, acc.shape[lead:], strict=True):
        if c and (c - 1) * st + s > n:
            raise ValueError(f"{c} windows of {s} step {st} exceed axis length {n}")
    if 0 in counts:  # no window: nothing to add (the window may not even fit in acc)
        return
    view = unfold_windows(acc, lead, size, stride)  # (*lead, *all_counts, *size), a view
    q = [-(-s // st) for s, st in zip(size, stride, strict=True)]
    for r in itertools.product(*(range(min(qi, c)) for qi, c in zip(q, counts, strict=True))):
        src = (slice(None),) * lead + tuple(slice(ri, None, qi) for ri, qi in zip(r, q,
                                                                                strict=True))
        dst = (slice(None),) * lead + tuple(slice(ri, c, qi) for ri, qi, c in
                                            zip(r, q, counts, strict=True))
        if weights is None:
            view[dst].add_(preds[src])
        else:
            view[dst].addcmul_(preds[src], weights)


def grid_boxes(lo: int, hi: int, shape: Sequence[int]
               ) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The flat range ``[lo, hi)`` of a C-ordered grid of ``shape`` as boxes
    ``(start, size)``: a partial first row, whole rows, a partial last row (recursively
    along the inner axes), at most ``2 * len(shape) - 1`` of them.

    Examples
    --------
    >>> list(grid_boxes(3, 11, (3, 4)))
    [((0, 3), (1, 1)), ((1, 0), (1, 4)), ((2, 0), (1, 3))]
    """
    if lo >= hi:
        return
    if len(shape) == 1:
        yield (lo,), (hi - lo,)
        return
    inner = math.prod(shape[1:])
    a0, r0 = divmod(lo, inner)
    a1, r1 = divmod(hi, inner)
    if a0 == a1:
        for s, n in grid_boxes(r0, r1, shape[1:]):
            yield (a0, *s), (1, *n)
        return
    if r0:
        for s, n in grid_boxes(r0, inner, shape[1:]):
            yield (a0, *s), (1, *n)
        a0 += 1
    if a1 > a0:
        yield (a0, *(0,) * (len(shape) - 1)), (a1 - a0, *shape[1:])
    if r1:
        for s, n in grid_boxes(0, r1, shape[1:]):
            yield (a1, *s), (1, *n)


def fold_add_run(acc: torch.Tensor, preds: torch.Tensor, grid: Sequence[int], first: int,
                 stride: Sequence[int], weights: torch.Tensor | None = None) -> None:
    """Add windows ``first .. first + len(preds)`` (C order) of a window grid of shape
    ``grid`` into ``acc`` (``(O, *spatial)``; window ``i`` at ``i * stride``), weighted:
    ``preds`` is ``(n, O, *size)``, a model's output for consecutive windows of the grid,
    split into :func:`grid_boxes` and added by :func:`fold_add` straight from it (no
    buffer of the windows' predictions, no weighted copy)."""
    k = len(grid)
    n_out, size = preds.shape[1], tuple(preds.shape[2:])
    for start, box in grid_boxes(first, first + len(preds), grid):
        j0 = int(np.ravel_multi_index(start, tuple(grid))) - first
        part = preds[j0:j0 + math.prod(box)].reshape(*box, n_out, *size).movedim(k, 0)
        at = (slice(None),) + tuple(slice(s * st, None) for s, st in zip(start, stride,
                                                                          strict=True))
        fold_add(acc[at], part, stride, weights)


def auto_batch_size(model: torch.nn.Module, sample_shape: Sequence[int], dev: torch.device,
                    autocast: Any, *, key: Any = None, minimum: int = 16,
                    maximum: int = 4096) -> int:
    """Windows per forward pass from this device's free memory.

    One trial forward pass of 8 windows measures the peak memory per window; the batch
    takes half of the free memory shared by the :func:`gpu_slots` blocks in flight,
    rounded down to a power of two in ``[minimum, maximum]``. Measured once per ``key``
    (model, window shape, device) and process. CPU: config ``predict.tile-batch-size``.
    """
    if dev.type != "cuda":
        return int(config.get("predict.tile-batch-size"))
    cache_key = (key, tuple(sample_shape), str(dev))
    with _LOCK:
        if cache_key in _BATCH_CACHE:
            return _BATCH_CACHE[cache_key]
        trial = 8
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.inference_mode(), autocast:
            model(torch.zeros((trial, *sample_shape), device=dev))
        torch.cuda.synchronize(dev)
        per_window = max(1, (torch.cuda.max_memory_allocated(dev) - base) // trial)
        free, _ = torch.cuda.mem_get_info(dev)
        budget = free // 2 // gpu_slots()
        n = max(minimum, min(maximum, int(budget // per_window)))
        n = 1 << (n.bit_length() - 1)
        _BATCH_CACHE[cache_key] = n
        return n


_DONE = object()


class _Failed:
    def __init__(self, err: BaseException) -> None:
        self.err = err


def _as_tensor(x: Any, copy: bool = False) -> Any:
    """numpy arrays as tensors; ``copy``: never the caller's memory (a model or loss that
    works in place, ``ReLU(inplace=True)``, must not change the caller's arrays or a
    patch cache, as torch's DataLoader never lets it)."""
    if isinstance(x, torch.Tensor):
        return x.clone() if copy and x.device.type == "cpu" else x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, order="C", copy=True) if copy
                                else np.ascontiguousarray(x))
    return x


def _pin(x: Any) -> Any:
    return x.pin_memory() if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x


class DeviceLoader:
    """Batches from an iterable, as tensors on ``device``, copied ahead of use.

    Each batch is a tuple (or a single array) of numpy arrays / tensors, e.g.
    ``(x, y)``; a :class:`engine.ops.patches.PatchBatch` gives ``(data, positions)``.
    On a CUDA device a producer thread pulls batches from the iterable (the host work:
    reading and cutting patches) and pins them, ``prefetch`` at most ahead; the consumer
    copies batch ``i+1`` on a side stream, ``non_blocking``, while the caller computes on
    batch ``i``. On the CPU batches become tensors of their own (copies), in order; on
    another device (``mps``) they are moved there.

    Examples
    --------
    >>> batches = [(np.ones((2, 3), np.float32), np.zeros(2, np.float32))] * 3
    >>> [tuple(x.shape) for x, y in DeviceLoader(batches, "cpu")]
    [(2, 3), (2, 3), (2, 3)]
    """

    def __init__(self, batches: Iterable[Any], device: str | torch.device = "auto", *,
                 prefetch: int = 2) -> None:
        self.batches = batches
        self.device = resolve_device(device)
        self.prefetch = max(1, int(prefetch))
        self.wait_s = 0.0  # time the consumer waited for the host (producer) side

    @staticmethod
    def _parts(batch: Any) -> tuple[Any, ...]:
        if hasattr(batch, "data") and hasattr(batch, "positions"):
            return (batch.data, batch.positions)
        if isinstance(batch, (tuple, list)):
            return tuple(batch)
        return (batch,)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.device.type != "cuda":
            dev = self.device
            for batch in self.batches:
                parts = (_as_tensor(p, copy=dev.type == "cpu") for p in self._parts(batch))
                yield tuple(p.to(dev) if isinstance(p, torch.Tensor) and dev.type != "cpu"
                            else p for p in parts)
            return
        yield from self._cuda()

    def _cuda(self) -> Iterator[tuple[torch.Tensor, ...]]:
        dev = self.device
        q: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for batch in self.batches:
                    item = tuple(_pin(_as_tensor(p)) for p in self._parts(batch))
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(_DONE)
            except BaseException as err:  # re-raised in the consumer
                q.put(_Failed(err))

        producer = threading.Thread(target=produce, name="engine-device-loader", daemon=True)
        producer.start()
        copy_stream = torch.cuda.Stream(device=dev)

        def fetch() -> Any:
            t0 = time.perf_counter()
            item = q.get()
            self.wait_s += time.perf_counter() - t0
            if item is _DONE:
                return None
            if isinstance(item, _Failed):
                raise item.err
            with torch.cuda.stream(copy_stream):
                return tuple(p.to(dev, non_blocking=True) if isinstance(p, torch.Tensor)
                             else p for p in item)

        try:
            nxt = fetch()
            while nxt is not None:
                cur = nxt
                compute = torch.cuda.current_stream(dev)
                compute.wait_stream(copy_stream)
                for p in cur:  # the caching allocator must not reuse them under the copy
                    if isinstance(p, torch.Tensor):
                        p.record_stream(compute)
                nxt = fetch()  # batch i+1 copies while the caller computes on batch i
                yield cur
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
            # a producer waiting to put sees the stop within 0.1 s; one inside a slow
            # next() of the source (a chunk being read) is a daemon thread that exits
            # when that returns: the caller does not wait for it
            producer.join(timeout=0.2)


class GpuSampler:
    """Sample GPU utilisation (percent busy) and memory in a background thread.

    Uses NVML (``pynvml``, from the ``nvidia-ml-py`` package) where it loads, else
    ``nvidia-smi``; with neither (or no GPU) :attr:`available` is False and the summary
    is empty. Use as a context manager around the phase to measure.

    Examples
    --------
    >>> with GpuSampler(interval=0.05) as s:
    ...     pass
    >>> isinstance(s.summary(), dict)
    True
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = float(interval)
        self.samples: dict[int, list[tuple[float, float, float]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._query = self._nvml() or self._smi()
        self.available = self._query is not None

    @staticmethod
    def _nvml() -> Any:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                       for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:
            return None
        if not handles:
            return None

        def query() -> list[tuple[float, float]]:
            out = []
            for h in handles:
                u = pynvml.nvmlDeviceGetUtilizationRates(h)
                m = pynvml.nvmlDeviceGetMemoryInfo(h)
                out.append((float(u.gpu), float(m.used) / 2**30))
            return out

        return query

    @staticmethod
    def _smi() -> Any:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None

        def query() -> list[tuple[float, float]]:
            text = subprocess.run(
                [exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5, check=True).stdout
            return [(float(a), float(b) / 1024) for a, b in
                    (line.split(",") for line in text.strip().splitlines())]

        try:
            query()
        except Exception:
            return None
        return query

    def _run(self) -> None:
        assert self._query is not None
        t0 = time.perf_counter()
        while not self._stop.is_set():
            try:
                rows = self._query()
            except Exception:
                rows = []
            now = time.perf_counter() - t0
            for i, (util, mem) in enumerate(rows):
                self.samples.setdefault(i, []).append((now, util, mem))
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread = threading.Thread(target=self._run, name="engine-gpu-sampler",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict[int, dict[str, float]]:
        """Per GPU index: mean and median busy percent, share of samples >= 50 % busy,
        peak memory (GiB), sample count."""
        out = {}
        for i, rows in self.samples.items():
            util = np.array([u for _, u, _ in rows], float)
            out[i] = {"busy_mean_pct": float(util.mean()) if len(util) else math.nan,
                      "busy_median_pct": float(np.median(util)) if len(util) else math.nan,
                      "busy_share_ge50": float((util >= 50).mean()) if len(util) else math.nan,
                      "memory_peak_gib": max((m for _, _, m in rows), default=math.nan),
                      "samples": len(rows)}
        return out
