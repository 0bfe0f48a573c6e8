"""Window grids, strided patch views, Gaussian blending weights and overlap-add.

Pure array functions (numpy; the view and blend helpers also accept cupy arrays): no
dask, no torch. They are the in-block half of the two-level tiling used by
:func:`engine.ops.patches.iter_patches` and :func:`engine.ml.predict.predict` -- a dask
block is the unit of work, and inside it a window grid cuts patches as strided *views*.

The grid is **global**: along an axis of length ``n`` windows of ``size`` start at
``0, stride, 2*stride, ...`` (anchored at index 0 of the whole array, never of a block).
A *full* window ends inside the array; a *partial* window starts inside but runs past
the end (it exists only when the edge is padded).

:func:`grid_padding` plans the padded grid that :func:`engine.ml.predict.predict` runs:
both edges get the same margin, so a pixel at an array edge is covered by the same
windows at the same positions as an interior pixel. :func:`pad_widths` and
:func:`pad_array` define the padding content (``boundary``): ``"reflect"`` is numpy's
``np.pad(mode="reflect")`` (mirror about the edge pixel, the edge not repeated, as
torch's ``F.pad(mode="reflect")``), ``"nearest"`` is ``mode="edge"``, ``"constant"``
zeros and a number that constant.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "WindowGrid",
    "n_full_windows",
    "n_covering_windows",
    "window_starts",
    "blend_depth",
    "window_view",
    "gaussian_weights",
    "accumulate_windows",
    "stitch_windows",
    "weight_sum",
    "grid_starts",
    "GridPadding",
    "grid_padding",
    "pad_kwargs",
    "pad_widths",
    "pad_array",
    "overlap_add",
]


def n_full_windows(length: int, size: int, stride: int) -> int:
    """Number of windows of ``size`` that start on the grid and end inside ``length``."""
    if length < size:
        return 0
    return (length - size) // stride + 1


def n_covering_windows(length: int, size: int, stride: int) -> int:
    """Number of grid windows (full or partial) needed until no pixel is left uncovered.

    With ``stride > size`` pixels between windows stay uncovered whatever we do; the count
    is then every grid start inside the array.
    """
    if length <= 0:
        return 0
    if stride > size:
        return (length - 1) // stride + 1
    return 1 + max(0, math.ceil((length - size) / stride))


def window_starts(length: int, size: int, stride: int, *, partial: bool = False) -> np.ndarray:
    """Global start indices along one axis (``int64``); ``partial`` adds the edge windows."""
    n = (n_covering_windows if partial else n_full_windows)(length, size, stride)
    return np.arange(n, dtype=np.int64) * stride


def _covered(length: int, size: int, stride: int, n: int) -> int:
    """Pixels of ``[0, length)`` covered by the first ``n`` grid windows."""
    if n == 0:
        return 0
    if stride >= size:  # disjoint windows; the last may be cut by the array end
        return sum(min(size, max(0, length - k * stride)) for k in range(n))
    return min(length, (n - 1) * stride + size)


def blend_depth(size: int, stride: int) -> int:
    """Halo that every block needs so that all windows touching its core fit inside it.

    Valid when block boundaries are multiples of ``stride``: the windows covering a core
    pixel start at most ``ceil(size/stride) - 1`` strides before the block.
    """
    return math.ceil(size / stride) * stride - stride


@dataclass(frozen=True)
class WindowGrid:
    """A global window grid over the patch axes of an array.

    Parameters
    ----------
    shape
        Lengths of the patch axes.
    size, stride
        Window size and step per axis.
    partial
        Whether edge windows that run past the array end are part of the grid (padding).

    Examples
    --------
    >>> g = WindowGrid((100, 130), (64, 64), (64, 64))
    >>> g.counts, g.n_partial
    ((1, 2), 4)
    """

    shape: tuple[int, ...]
    size: tuple[int, ...]
    stride: tuple[int, ...]
    partial: bool = False

    def __post_init__(self) -> None:
        if not (len(self.shape) == len(self.size) == len(self.stride)):
            raise ValueError("shape, size and stride need one entry per patch axis")
        if min(self.size, default=1) < 1 or min(self.stride, default=1) < 1:
            raise ValueError(f"window size {self.size} and stride {self.stride} must be >= 1")

    @property
    def counts(self) -> tuple[int, ...]:
        """Windows per axis."""
        f = n_covering_windows if self.partial else n_full_windows
        return tuple(f(*a) for a in self._axes)

    @property
    def _axes(self) -> list[tuple[int, int, int]]:
        return list(zip(self.shape, self.size, self.stride, strict=True))

    @property
    def n_windows(self) -> int:
        """Windows in the grid (product of :attr:`counts`)."""
        return math.prod(self.counts)

    @property
    def n_partial(self) -> int:
        """Windows that cover pixels but run past the array end (dropped unless padded)."""
        full = math.prod(n_full_windows(*a) for a in self._axes)
        cover = math.prod(n_covering_windows(*a) for a in self._axes)
        return cover - full

    @property
    def covered_share(self) -> float:
        """Share of the array's pixels inside at least one window of the grid."""
        share = 1.0
        for n, s, st, k in zip(self.shape, self.size, self.stride, self.counts, strict=True):
            share *= _covered(n, s, st, k) / n if n else 0.0
        return share

    def starts(self, axis: int) -> np.ndarray:
        """Global window starts along patch axis ``axis``."""
        return window_starts(self.shape[axis], self.size[axis], self.stride[axis],
                             partial=self.partial)

    def block_range(self, axis: int, lo: int, hi: int) -> tuple[int, int]:
        """Window numbers ``[k0, k1)`` whose start lies in ``[lo, hi)`` along ``axis``.

        Assigning each window to the block that holds its start produces every window
        exactly once whatever the chunking.
        """
        st, n = self.stride[axis], self.counts[axis]
        k0 = min(n, -(-lo // st))
        k1 = min(n, -(-hi // st))
        return k0, max(k0, k1)

    def span(self, axis: int, k0: int, k1: int) -> tuple[int, int]:
        """Index range ``[start, stop)`` read by windows ``k0..k1-1`` (stop may pass the end)."""
        if k1 <= k0:
            return 0, 0
        st, s = self.stride[axis], self.size[axis]
        return k0 * st, (k1 - 1) * st + s


def window_view(x: Any, axes: Sequence[int], size: Sequence[int], stride: Sequence[int],
                offset: Sequence[int] | None = None, count: Sequence[int] | None = None) -> Any:
    """Strided view of all windows of ``x`` along ``axes`` (no copy).

    The result has the shape of ``x`` with each patch axis replaced by its window count,
    followed by the window sizes: ``x`` of shape ``(V, H, W)`` with ``axes=(1, 2)`` gives
    ``(V, nH, nW, sH, sW)``. Window ``i`` along an axis starts at ``offset + i*stride``.
    Works for numpy and cupy arrays (both expose ``lib.stride_tricks.as_strided``).
    """
    axes = [a % x.ndim for a in axes]
    offset = list(offset) if offset is not None else [0] * len(axes)
    if count is None:
        count = [max(0, (x.shape[a] - o - s) // st + 1)
                 for a, o, s, st in zip(axes, offset, size, stride, strict=True)]
    for a, o, s, st, c in zip(axes, offset, size, stride, count, strict=True):
        if c > 0 and o + (c - 1) * st + s > x.shape[a]:
            raise ValueError(f"{c} windows of {s} from {o} step {st} exceed axis length "
                             f"{x.shape[a]}")
    base = x[tuple(slice(o, None) if i in axes else slice(None)
                   for i, o in zip(range(x.ndim), _expand(axes, offset, x.ndim), strict=True))]
    shape = list(base.shape)
    strides = list(base.strides)
    for a, st, c in zip(axes, stride, count, strict=True):
        shape[a] = c
        strides[a] = base.strides[a] * st
    shape += list(size)
    strides += [base.strides[a] for a in axes]
    xp = _namespace(x)
    if xp is np:  # read-only: writing through overlapping windows would alias pixels
        return np.lib.stride_tricks.as_strided(base, shape=tuple(shape), strides=tuple(strides),
                                               writeable=False)
    return xp.lib.stride_tricks.as_strided(base, shape=tuple(shape), strides=tuple(strides))


def _expand(axes: Sequence[int], values: Sequence[int], ndim: int) -> list[int]:
    out = [0] * ndim
    for a, v in zip(axes, values, strict=True):
        out[a] = v
    return out


def _namespace(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return np
    import importlib

    return importlib.import_module(type(x).__module__.split(".")[0])


@functools.lru_cache(maxsize=32)
def _gaussian(size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    w = np.ones((), dtype=np.float64)
    for s in size:
        centre = (s - 1) / 2.0
        sigma = max(s * sigma_scale, 1e-6)
        g = np.exp(-0.5 * ((np.arange(s) - centre) / sigma) ** 2)
        w = np.multiply.outer(w, g)
    w = w / w.max()
    w = w.astype(np.float32)
    # Far from the centre exp() underflows; a zero weight would leave pixels that only
    # one window reaches undefined (0/0), so clamp to the smallest positive weight.
    positive = w[w > 0]
    floor = positive.min() if positive.size else np.float32(1.0)
    w = np.maximum(w, max(floor, np.finfo(np.float32).tiny))
    w.setflags(write=False)
    return w


def gaussian_weights(size: Sequence[int], sigma_scale: float = 1.0 / 8.0) -> np.ndarray:
    """Gaussian importance map for blending windows (nnU-Net style).

    ``sigma = size * sigma_scale`` per axis, normalised to a maximum of 1, float32,
    every weight strictly positive. The array is cached and read-only.
    """
    return _gaussian(tuple(int(s) for s in size), float(sigma_scale))


def accumulate_windows(acc: Any, wsum: Any | None, preds: Any, starts: Sequence[Sequence[int]],
                       weights: Any | None = None) -> None:
    """Overlap-add window predictions into ``acc`` (in place).

    Parameters
    ----------
    acc
        ``(..., *spatial)`` float32 accumulator; the leading axes (e.g. channels) are
        broadcast against each prediction.
    wsum
        ``spatial``-shaped accumulator of the weights, or None to skip it.
    preds
        ``(n, ..., *size)`` predictions for ``n`` windows.
    starts
        ``n`` start tuples, one index per spatial axis of ``acc``.
    weights
        ``size``-shaped weights (None: all ones, i.e. a plain mean).
    """
    size = preds.shape[preds.ndim - len(starts[0]):] if len(starts) else ()
    for p, st in zip(preds, starts, strict=True):
        idx = tuple(slice(s, s + n) for s, n in zip(st, size, strict=True))
        full = (Ellipsis,) + idx
        if weights is None:
            acc[full] += p
            if wsum is not None:
                wsum[idx] += 1.0
        else:
            acc[full] += p * weights
            if wsum is not None:
                wsum[idx] += weights


def weight_sum(shape: Sequence[int], starts: Sequence[Sequence[int]], size: Sequence[int],
               weights: np.ndarray | None = None) -> np.ndarray:
    """Sum of the window weights at every pixel of ``shape`` (float32; 0 where uncovered)."""
    wsum = np.zeros(tuple(shape), np.float32)
    w = np.ones(tuple(size), np.float32) if weights is None else weights
    for st in starts:
        wsum[tuple(slice(s, s + n) for s, n in zip(st, size, strict=True))] += w
    return wsum


def stitch_windows(preds: np.ndarray, starts: Sequence[Sequence[int]], shape: Sequence[int],
                   weights: np.ndarray | None = None) -> np.ndarray:
    """Blend window predictions into an array of spatial ``shape``: ``sum(w*p) / sum(w)``.

    Pixels no window covers are NaN.
    """
    lead = preds.shape[1:preds.ndim - len(shape)]
    acc = np.zeros((*lead, *shape), np.float32)
    wsum = np.zeros(tuple(shape), np.float32)
    accumulate_windows(acc, wsum, preds, starts, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(wsum > 0, acc / wsum, np.float32(np.nan)).astype(np.float32)


def grid_starts(shape: Sequence[int], size: Sequence[int], stride: Sequence[int]) -> list[tuple]:
    """All full-window start tuples of a local grid anchored at 0 (row-major order)."""
    per_axis = [range(0, max(0, n - s) + 1, st) if n >= s else range(0)
                for n, s, st in zip(shape, size, stride, strict=True)]
    return list(itertools.product(*per_axis))


# -- padded grids (predict) --------------------------------------------------------------
class GridPadding(NamedTuple):
    """Padding of one axis and the window count of the grid over the padded axis."""

    before: int
    after: int
    windows: int


def grid_padding(length: int, size: int, stride: int) -> GridPadding:
    """Plan the window grid over an axis of ``length`` padded on both sides.

    Every pixel must be covered by all the windows an endless grid would give it: the
    grid reaches at least ``size - stride`` past each edge. The fewest windows that do so
    are taken, the total padding is split equally (one pixel more after when it is odd),
    and the windows start at ``-before + i * stride`` in array coordinates; they tile the
    padded axis of ``before + length + after = (windows - 1) * stride + size`` exactly.
    With an even total the grid is symmetric: flipping the axis maps windows onto windows.
    The plan depends only on ``(length, size, stride)``, never on the chunking.

    Examples
    --------
    >>> grid_padding(64, 32, 16)
    GridPadding(before=16, after=16, windows=5)
    >>> grid_padding(90, 32, 16)
    GridPadding(before=19, after=19, windows=7)
    >>> grid_padding(10, 4, 4)
    GridPadding(before=1, after=1, windows=3)
    """
    if size < 1 or stride < 1 or stride > size:
        raise ValueError(f"window size {size} and stride {stride}: need 1 <= stride <= size")
    if length < 1:
        raise ValueError(f"axis length {length} must be >= 1")
    margin = size - stride
    # fewest windows whose span (count-1)*stride + size reaches length + 2*margin
    count = 1 + max(0, -(-(length + 2 * margin - size) // stride))
    total = (count - 1) * stride + size - length
    return GridPadding(total // 2, total - total // 2, count)


def pad_kwargs(boundary: Any) -> dict[str, Any]:
    """``np.pad`` keyword arguments of a ``boundary`` (see the module docstring)."""
    if isinstance(boundary, str):
        if boundary == "reflect":
            return {"mode": "reflect"}
        if boundary == "nearest":
            return {"mode": "edge"}
        if boundary == "constant":
            return {"mode": "constant", "constant_values": 0.0}
    elif isinstance(boundary, (int, float, np.number)) and not isinstance(boundary, bool):
        return {"mode": "constant", "constant_values": float(boundary)}
    raise ValueError(f"boundary={boundary!r}: use 'reflect', 'nearest', 'constant' or a number")


def pad_widths(length: int, before: int, after: int, mode: str) -> list[tuple[int, int]]:
    """``(before, after)`` steps that pad an axis of ``length`` as one ``np.pad`` would.

    A reflection reaches at most ``length - 1`` pixels past an edge, so wider reflect
    padding is applied in steps of at most ``length - 1`` (of the *original* axis), each
    reflecting the axis padded so far: every step but the last ends on a mirror pixel, and
    the result is ``np.pad(mode="reflect")``. An axis of one pixel reflects as ``"edge"``
    (numpy's rule). Other modes take one step.

    Examples
    --------
    >>> pad_widths(5, 12, 9, "reflect")
    [(4, 4), (4, 4), (4, 1)]
    """
    if before < 0 or after < 0:
        raise ValueError(f"negative padding ({before}, {after})")
    if mode != "reflect" or length < 2:
        return [(before, after)] if before or after else []
    steps = []
    while before or after:
        b, a = min(before, length - 1), min(after, length - 1)
        steps.append((b, a))
        before, after = before - b, after - a
    return steps


def pad_array(x: Any, widths: Sequence[tuple[int, int]], boundary: Any) -> Any:
    """Pad a numpy or cupy array by ``widths`` per axis with ``boundary``'s content."""
    kw = pad_kwargs(boundary)
    xp = _namespace(x)
    mode = kw["mode"]
    if mode == "reflect":
        for axis, (b, a) in enumerate(widths):
            mode_ax = "reflect" if x.shape[axis] > 1 else "edge"
            for sb, sa in pad_widths(x.shape[axis], b, a, "reflect"):
                w = [(0, 0)] * x.ndim
                w[axis] = (sb, sa)
                x = xp.pad(x, w, mode=mode_ax)
        return x
    return xp.pad(x, [tuple(w) for w in widths], **kw)


def overlap_add(acc: Any, preds: Any, stride: Sequence[int], weights: Any | None = None) -> None:
    """Add a grid of windows into ``acc`` in place: ``acc[..., i*stride : i*stride+size] += w*p``.

    ``acc`` is ``(*lead, *spatial)`` and ``preds`` ``(*lead, *counts, *size)``: window
    ``i`` (per axis) starts at ``i * stride`` of ``acc``. Windows whose numbers agree
    modulo ``q = ceil(size / stride)`` never overlap, so each of the ``prod(q)`` classes is
    added through one writable strided view of ``acc`` -- a loop over grid offsets (4 for
    50 % overlap in 2-D), not over windows. numpy or cupy (both have ``as_strided``).

    Examples
    --------
    >>> acc = np.zeros(6, np.float32)
    >>> overlap_add(acc, np.ones((3, 4), np.float32), (1,))
    >>> acc
    array([1., 2., 3., 3., 2., 1.], dtype=float32)
    """
    k = len(stride)
    lead = acc.ndim - k
    if preds.ndim != lead + 2 * k or preds.shape[:lead] != acc.shape[:lead]:
        raise ValueError(f"windows of shape {preds.shape} do not match an accumulator of "
                         f"shape {acc.shape} with {k} window axes")
    counts, size = preds.shape[lead:lead + k], preds.shape[lead + k:]
    for c, s, st, n in zip(counts, size, stride, acc.shape[lead:], strict=True):
        if c and (c - 1) * st + s > n:
            raise ValueError(f"{c} windows of {s} step {st} exceed axis length {n}")
    xp = _namespace(acc)
    q = [-(-s // st) for s, st in zip(size, stride, strict=True)]
    for r in itertools.product(*(range(min(qi, c)) for qi, c in zip(q, counts, strict=True))):
        sel = preds[(slice(None),) * lead
                    + tuple(slice(ri, None, qi) for ri, qi in zip(r, q, strict=True))]
        if weights is not None:
            sel = sel * weights
        base = acc[(slice(None),) * lead
                   + tuple(slice(ri * st, None) for ri, st in zip(r, stride, strict=True))]
        # interleaved (count, size) axes per spatial axis: the view walks acc in memory
        # order, and where q*stride == size it is one contiguous region per leading index
        shape = base.shape[:lead] + tuple(
            v for j in range(k) for v in (sel.shape[lead + j], size[j]))
        strides = base.strides[:lead] + tuple(
            v for j in range(k) for v in (base.strides[lead + j] * q[j] * stride[j],
                                          base.strides[lead + j]))
        view = xp.lib.stride_tricks.as_strided(base, shape=shape, strides=strides)
        view += sel.transpose(*range(lead), *(a for j in range(k)
                                              for a in (lead + j, lead + k + j)))
