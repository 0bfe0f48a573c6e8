"""Graph planning of tiled inference: padded, halo-extended blocks in one task each.

:func:`engine.ml.predict.predict` runs a global window grid over an array padded on both
sides (:func:`engine.kernels.windows.grid_padding`). Its blocks are the padded array cut
at multiples of the stride, each extended by the blend halo. Built from ``da.pad``,
``rechunk`` and ``da.overlap`` that took about a hundred tasks per block (pad pieces,
rechunk merges, halo slices and concatenations, per channel). Here each extended block
is assembled by ONE call (:func:`gather`): it reads the input chunks its padded range maps
to (reflect / nearest / constant padding is index arithmetic, :func:`padded_source_index`),
cuts and stacks all channels. :func:`map_gathered` runs that assembly inside the task that
consumes the block (predict's inference), :func:`gather_blocks` as a task of its own; and
each output chunk, in the input's chunking, is ONE task (:func:`crop_blocks`) that takes
the cores of the predicted blocks it overlaps. The scheduler sees 2 tasks per block
instead of ~100, and no chunk is copied more than twice on the way to the model.

No torch here: plain numpy/cupy and dask graphs.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from dask.base import is_dask_collection
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from engine.kernels.windows import GridPadding, blend_depth, grid_padding, pad_kwargs

__all__ = ["TiledPlan", "plan_tiles", "padded_source_index", "block_sources", "block_shape",
           "gather", "gather_blocks", "map_gathered", "crop_blocks"]


def padded_source_index(lo: int, hi: int, before: int, n: int, mode: str) -> np.ndarray:
    """Source index in ``[0, n)`` of each padded position ``[lo, hi)`` (``-1``: constant).

    Position ``p`` of the padded axis is ``p - before`` of the array. ``"reflect"`` is
    ``np.pad(mode="reflect")`` however wide (the mirror about the edge pixel, repeated:
    period ``2(n-1)``; ``"edge"`` for ``n == 1``), ``"edge"`` repeats the edge pixel,
    ``"constant"`` gives ``-1`` outside the array.

    Examples
    --------
    >>> padded_source_index(0, 9, 3, 4, "reflect").tolist()
    [3, 2, 1, 0, 1, 2, 3, 2, 1]
    >>> padded_source_index(0, 6, 2, 3, "constant").tolist()
    [-1, -1, 0, 1, 2, -1]
    """
    s = np.arange(lo, hi, dtype=np.int64) - before
    if mode == "reflect" and n > 1:
        period = 2 * (n - 1)
        r = np.mod(s, period)
        return np.where(r >= n, period - r, r)
    if mode in ("reflect", "edge"):
        return np.clip(s, 0, n - 1)
    if mode == "constant":
        return np.where((s >= 0) & (s < n), s, -1)
    raise ValueError(f"padding mode {mode!r}: use reflect, edge or constant")


@dataclass(frozen=True)
class TiledPlan:
    """Where the blocks of a tiled prediction lie, per tile axis (the last ``k`` axes).

    ``bounds[j]``: block boundaries of the padded axis (multiples of ``stride[j]``);
    block ``b`` is extended to ``[max(0, bounds[b] - depth), min(P, bounds[b+1] + depth)]``.
    ``pads[j]``: the grid's padding; ``real[j]``: the array's range in padded coordinates.
    """

    shape: tuple[int, ...]  # the tile axes of the unpadded array
    tile: tuple[int, ...]
    stride: tuple[int, ...]
    depth: tuple[int, ...]
    pads: tuple[GridPadding, ...]
    bounds: tuple[tuple[int, ...], ...]

    @property
    def real(self) -> tuple[tuple[int, int], ...]:
        return tuple((p.before, p.before + n) for p, n in zip(self.pads, self.shape,
                                                              strict=True))

    def extent(self, axis: int, block: int) -> tuple[int, int]:
        """Padded range ``[lo, hi)`` of block ``block`` with its halo along tile ``axis``."""
        b, d = self.bounds[axis], self.depth[axis]
        return max(0, b[block] - d), min(b[-1], b[block + 1] + d)

    def core(self, axis: int, block: int) -> slice:
        """Block ``block``'s core (between its boundaries) in the local index of its
        halo-extended range along tile ``axis``."""
        lo = self.extent(axis, block)[0]
        b = self.bounds[axis]
        return slice(b[block] - lo, b[block + 1] - lo)

    def core_chunks(self, axis: int) -> tuple[int, ...]:
        return tuple(int(v) for v in np.diff(self.bounds[axis]))

    def ext_chunks(self, axis: int) -> tuple[int, ...]:
        n = len(self.bounds[axis]) - 1
        return tuple(hi - lo for lo, hi in (self.extent(axis, b) for b in range(n)))


def _aligned_chunks(chunks: Sequence[int], shift: int, total: int, step: int,
                    minimum: int) -> tuple[int, ...]:
    """Chunks of a padded axis of ``total`` with internal boundaries on multiples of
    ``step``, each chunk at least ``minimum``, as close as possible to the original
    boundaries (``chunks`` of the unpadded axis, shifted by the padding ``shift``)."""
    minimum = -(-max(step, minimum) // step) * step
    out, last = [], 0
    for b in np.cumsum(chunks)[:-1]:
        r = int(round((b + shift) / step)) * step
        if r - last >= minimum and total - r >= minimum:
            out.append(r - last)
            last = r
    out.append(total - last)
    return tuple(out)


def plan_tiles(shape: Sequence[int], chunks: Sequence[Sequence[int]], tile: Sequence[int],
               stride: Sequence[int]) -> TiledPlan:
    """Plan the padded grid and its blocks for tile axes of ``shape`` chunked ``chunks``.

    Depends on the chunking only through the block boundaries, which the blend makes
    irrelevant to the result (every window touching a block's core lies in its halo).
    """
    tile = tuple(int(t) for t in tile)
    stride = tuple(int(s) for s in stride)
    depth = tuple(blend_depth(t, s) for t, s in zip(tile, stride, strict=True))
    pads = tuple(grid_padding(int(n), t, s) for n, t, s in zip(shape, tile, stride,
                                                                strict=True))
    bounds = []
    for n, c, p, s, d in zip(shape, chunks, pads, stride, depth, strict=True):
        aligned = _aligned_chunks(c, p.before, p.before + int(n) + p.after, s, d)
        bounds.append(tuple(int(v) for v in np.cumsum((0,) + aligned)))
    return TiledPlan(tuple(int(n) for n in shape), tile, stride, depth, pads, tuple(bounds))


def _chunk_range(cum: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Chunks ``[c0, c1)`` of an axis with boundaries ``cum`` holding indices lo..hi-1."""
    return int(np.searchsorted(cum, lo, side="right")) - 1, int(np.searchsorted(
        cum, hi - 1, side="right"))


def _assemble(pieces: Sequence[Any], grid: Sequence[int], axes: Sequence[int]) -> Any:
    """Concatenate a row-major list of chunks laid out on ``grid`` along ``axes``."""
    xp = _namespace(pieces[0])
    arr = list(pieces)
    for g, ax in zip(reversed(grid), reversed(axes), strict=True):
        arr = [xp.concatenate(arr[i:i + g], axis=ax) if g > 1 else arr[i]
               for i in range(0, len(arr), g)]
    return arr[0]


def _namespace(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return np
    import importlib

    return importlib.import_module(type(x).__module__.split(".")[0])


def _runs(local: np.ndarray) -> tuple[tuple[int, int, int, int], ...]:
    """Split an index map into runs copied as one slice each: ``(out_start, length,
    src_start, step)`` with step +1 (ascending), -1 (mirrored) or 0 (constant)."""
    runs: list[tuple[int, int, int, int]] = []
    i, n = 0, len(local)
    while i < n:
        if local[i] < 0:
            j = i + 1
            while j < n and local[j] < 0:
                j += 1
            runs.append((i, j - i, 0, 0))
        else:
            step = int(local[i + 1] - local[i]) if i + 1 < n and local[i + 1] >= 0 else 1
            step = step if step in (1, -1) else 1
            j = i + 1
            while j < n and local[j] >= 0 and local[j] - local[j - 1] == step:
                j += 1
            runs.append((i, j - i, int(local[i]), step))
        i = j
    return tuple(runs)


def _src_slice(start: int, length: int, step: int) -> slice:
    if step >= 0:
        return slice(start, start + length)
    stop = start - length
    return slice(start, stop if stop >= 0 else None, -1)


def block_shape(spec: tuple, pieces: Sequence[Any]) -> tuple[int, ...]:
    """Shape ``(*others, C, *ext)`` of the block a gather ``spec`` makes of ``pieces``."""
    n_channels, grid, k0, _runs_, ext, _const = spec
    return (*pieces[0].shape[:k0], n_channels, *ext)


def gather(spec: tuple, pieces: Sequence[Any], out: Any = None) -> Any:
    """One halo-extended padded block with every channel: ``(*others, C, *ext)``, filled
    by one slice copy per run of the padding's index map (a reflection is a reversed
    slice): every pixel is written once, straight into ``out`` (a new float32 array of
    :func:`block_shape` when None; a reused or pinned buffer lets the caller skip the
    page faults of fresh memory, or a second copy on the way to a device)."""
    n_channels, grid, k0, runs, ext, const = spec
    per = len(pieces) // n_channels
    xp = _namespace(pieces[0])
    axes = tuple(range(k0, k0 + len(grid)))
    if out is None:
        out = xp.empty(block_shape(spec, pieces), dtype=xp.float32)
    for c in range(n_channels):
        x = _assemble(pieces[c * per:(c + 1) * per], grid, axes)
        for combo in itertools.product(*runs):
            dst = (slice(None),) * k0 + (c,) + tuple(slice(o, o + n) for o, n, _, _ in combo)
            if any(step == 0 for _, _, _, step in combo):
                out[dst] = const
            else:
                out[dst] = x[(slice(None),) * k0 + tuple(_src_slice(s, n, st)
                                                         for _, n, s, st in combo)]
    return out


def _gather(spec: tuple, *pieces: Any) -> Any:
    return gather(spec, pieces)


def block_sources(xs: Sequence[da.Array], plan: TiledPlan, boundary: Any
                  ) -> Iterator[tuple[tuple[int, ...], tuple, list[tuple]]]:
    """Per halo-extended block of the channels ``xs`` (same shape and chunks,
    ``(*others, *tile_axes)``): its block index ``(*others, *tile_blocks)``, the
    :func:`gather` spec, and the keys of the input chunks it reads (channel-major)."""
    k = len(plan.tile)
    x0 = xs[0]
    k0 = x0.ndim - k
    kw = pad_kwargs(boundary)
    mode = kw["mode"]
    const = float(kw.get("constant_values", 0.0))
    cums = [np.cumsum((0,) + tuple(c)) for c in x0.chunks[k0:]]
    nblocks = [len(b) - 1 for b in plan.bounds]
    per_block = []  # the tile axes' part of each block, the same for every other index
    for bidx in itertools.product(*(range(n) for n in nblocks)):
        runs, ranges = [], []
        for j, b in enumerate(bidx):
            lo, hi = plan.extent(j, b)
            src = padded_source_index(lo, hi, plan.pads[j].before, plan.shape[j], mode)
            valid = src[src >= 0]
            if valid.size == 0:  # only constant padding: read one chunk, replace all
                valid = np.zeros(1, np.int64)
            c0, c1 = _chunk_range(cums[j], int(valid.min()), int(valid.max()) + 1)
            ranges.append(range(c0, c1))
            base = int(cums[j][c0])
            runs.append(_runs(np.where(src >= 0, src - base, -1)))
        ext = tuple(plan.extent(j, b)[1] - plan.extent(j, b)[0] for j, b in enumerate(bidx))
        spec = (len(xs), tuple(len(r) for r in ranges), k0, tuple(runs), ext, const)
        per_block.append((bidx, spec, list(itertools.product(*ranges))))
    for o in itertools.product(*(range(len(c)) for c in x0.chunks[:k0])):
        for bidx, spec, tiles in per_block:
            yield (*o, *bidx), spec, [(x.name, *o, *t) for x in xs for t in tiles]


def _ext_chunks(xs: Sequence[da.Array], plan: TiledPlan, lead: int,
                cores: bool = False) -> tuple:
    k0 = xs[0].ndim - len(plan.tile)
    per_axis = plan.core_chunks if cores else plan.ext_chunks
    return xs[0].chunks[:k0] + ((lead,),) + tuple(per_axis(j) for j in range(len(plan.tile)))


def gather_blocks(xs: Sequence[da.Array], plan: TiledPlan, boundary: Any, name: str) -> da.Array:
    """Halo-extended padded blocks of the channels ``xs`` (same shape and chunks,
    ``(*others, *tile_axes)``), stacked: a ``(*others, C, *ext)`` array, one task each."""
    k0 = xs[0].ndim - len(plan.tile)
    layer = {(name, *idx[:k0], 0, *idx[k0:]): (_gather, spec, *keys)
             for idx, spec, keys in block_sources(xs, plan, boundary)}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=list(xs))  # type: ignore[arg-type]
    x0 = xs[0]
    meta = x0._meta.astype(np.float32) if hasattr(x0._meta, "astype") else x0._meta
    return da.Array(graph, name, _ext_chunks(xs, plan, len(xs)),
                    meta=meta.reshape((0,) * (x0.ndim + 1)))


def map_gathered(func: Callable[..., Any], xs: Sequence[da.Array], plan: TiledPlan,
                 boundary: Any, name: str, *, lead: int, meta: Any, cores: bool = False,
                 args: Sequence[Any] = (), **kwargs: Any) -> da.Array:
    """``func`` on every halo-extended block without materialising the block as a task.

    One task per block calls ``func(spec, index, *args, *pieces, **kwargs)`` with the
    :func:`gather` spec, the block index ``(*others, *tile_blocks)``, ``args`` (dask
    delayed objects among them become their values) and the input chunks, and returns
    ``(*others, lead, *ext)``, or only the block's core (``cores=True``: the ext range
    cut by :meth:`TiledPlan.core`, so halos never become task results). The gathered
    block is never a task result, so it is not held in dask's memory, never sent between
    workers, and can be assembled straight into a reused or pinned buffer; the graph has
    one task per block fewer than ``gather_blocks`` followed by ``map_blocks``.
    Annotations in effect apply to its tasks.
    """
    k0 = xs[0].ndim - len(plan.tile)
    deps = [a for a in args if is_dask_collection(a)]
    vals = [a.key if isinstance(a, Delayed) else a for a in args]
    if any(is_dask_collection(a) and not isinstance(a, Delayed) for a in args):
        raise TypeError("map_gathered: only dask.delayed objects may be passed in args")
    call = functools.partial(func, **kwargs)
    layer = {(name, *idx[:k0], 0, *idx[k0:]): (call, spec, idx, *vals, *keys)
             for idx, spec, keys in block_sources(xs, plan, boundary)}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[*xs, *deps])  # type: ignore[arg-type,list-item]
    return da.Array(graph, name, _ext_chunks(xs, plan, lead, cores),
                    meta=meta.reshape((0,) * (xs[0].ndim + 1)))


def _crop(spec: tuple, *pieces: Any) -> Any:
    """One output chunk from the cores of the predicted blocks it overlaps."""
    grid, axes, cuts, squeeze = spec
    parts = []
    for p, sl in zip(pieces, itertools.product(*cuts), strict=True):
        parts.append(p[(slice(None),) * axes[0] + tuple(slice(a, b) for a, b in sl)])
    x = _assemble(parts, grid, axes)
    return x[(slice(None),) * (axes[0] - 1) + (0,)] if squeeze else x


def crop_blocks(y: da.Array, plan: TiledPlan, in_chunks: Sequence[Sequence[int]], name: str,
                squeeze: bool, cores: bool = False) -> da.Array:
    """The predicted blocks ``y`` (``(*others, O, *ext)``, or their cores already when
    ``cores``) cropped to their cores and cut to the input's chunks ``in_chunks`` (of
    ``(*others, *tile_axes)``), one task per output chunk; ``squeeze`` drops the channel
    axis (one output channel)."""
    k = len(plan.tile)
    k0 = len(in_chunks) - k
    layer: dict = {}
    cums = [np.cumsum((0,) + tuple(c)) for c in in_chunks[k0:]]
    for o in itertools.product(*(range(len(c)) for c in in_chunks[:k0])):
        for i in itertools.product(*(range(len(c) - 1) for c in cums)):
            blocks, cuts = [], []
            for j, ij in enumerate(i):
                shift = plan.pads[j].before
                lo, hi = int(cums[j][ij]) + shift, int(cums[j][ij + 1]) + shift
                bnd = plan.bounds[j]
                b0, b1 = _chunk_range(np.asarray(bnd), lo, hi)
                blocks.append(range(b0, b1))
                axis_cuts = []
                for b in range(b0, b1):
                    ext_lo = bnd[b] if cores else plan.extent(j, b)[0]
                    a, z = max(lo, bnd[b]), min(hi, bnd[b + 1])
                    axis_cuts.append((a - ext_lo, z - ext_lo))
                cuts.append(axis_cuts)
            keys = [(y.name, *o, 0, *t) for t in itertools.product(*blocks)]
            spec = (tuple(len(b) for b in blocks), tuple(range(k0 + 1, k0 + 1 + k)),
                    tuple(cuts), squeeze)
            layer[(name, *o, *(() if squeeze else (0,)), *i)] = (_crop, spec, *keys)
    out_ch = () if squeeze else ((y.chunks[k0][0],),)
    chunks = tuple(tuple(c) for c in in_chunks[:k0]) + out_ch + tuple(
        tuple(c) for c in in_chunks[k0:])
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[y])  # type: ignore[list-item]
    return da.Array(graph, name, chunks, meta=y._meta.reshape((0,) * len(chunks)))


def n_tasks(plan: TiledPlan, n_other_blocks: int) -> int:
    """Gather plus predict tasks of a plan (for reports)."""
    return 2 * n_other_blocks * math.prod(len(b) - 1 for b in plan.bounds)
