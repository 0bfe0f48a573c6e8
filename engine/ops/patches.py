"""Chunk-aware patch generation: :func:`iter_patches`.

Two-level tiling. A dask chunk is the unit of work (one task per chunk); inside the task
a window grid cuts the patches as strided views and copies them once into a contiguous
``(n, variable, *size)`` float32 array. There is never one graph or one task per patch.

The window grid is global (anchored at index 0 of the cube, step ``stride``) and every
window is assigned to the chunk that holds its start, so each window is produced exactly
once and the *set* of ``(position, patch)`` pairs does not depend on the chunking. When
``stride < size`` the windows of a chunk reach into its neighbours: the task reads the
chunk's slice extended by that halo (pieces of the neighbouring chunks).

Padding (``pad=``) means what ``boundary=`` means in :func:`engine.ml.predict.predict`,
through the same kernel (:func:`engine.kernels.windows.pad_array`): ``"reflect"`` is
``np.pad(mode="reflect")`` (mirrored about the edge pixel, which is not repeated; wider
than the axis it keeps reflecting, numpy's rule), ``"nearest"`` is ``mode="edge"``,
``"constant"`` zeros and a number that constant. The grid starts at index 0, so no window
reaches before the start edge and padding is only ever added past the far edge; an edge
window equals the same window of ``np.pad(cube, mode=...)`` padded at the far end,
whatever the chunking (a task reads the pixels a reflection needs from its neighbours).

Each chunk task is named by a token of all it depends on: the source chunk keys (tokens
of the data), the pieces it reads, the window grid, padding, filter, shuffle seed and
epoch. Two iterators over different cubes, chunkings or parameters compose in one graph.

Units are computed ``prefetch`` at a time -- on the distributed cluster when a client is
active, otherwise in a small local thread pool that runs each unit's culled dask graph
synchronously -- so memory is bounded by ``prefetch`` units, not by the cube.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr

from engine import config
from engine.dims import cube_dims, resolve_keys
from engine.errors import CubeError, EngineWarning, SpecError
from engine.kernels.windows import WindowGrid, pad_array, pad_kwargs, window_view

__all__ = ["iter_patches", "PatchIterator", "PatchBatch"]

_CHANNEL_DIMS = ("variable", "channel", "band", "feature")
#: Bumped when the patches a chunk task gives for the same inputs change (part of its key).
_VERSION = 2
WhereLike = Callable[[np.ndarray], np.ndarray] | str | Mapping[str, str] | None
PadLike = Literal["reflect", "nearest", "constant"] | float | None
_DEFAULT_SIZE = 64


@dataclass(frozen=True)
class PatchBatch:
    """One batch of patches.

    Attributes
    ----------
    data
        ``(batch, variable, *size)`` float32 (numpy array, or torch tensor with ``as_torch``).
    positions
        ``(batch, ndim)`` int64 global index of each patch along :attr:`PatchIterator.dims`:
        the window start along patch dims, the index along the other dims (e.g. time);
        ``(batch, 0)`` when built with ``positions=False``.
    """

    data: Any
    positions: Any

    def __len__(self) -> int:
        return len(self.data)


class _Where:
    """Block-level keep mask built from the ``where=`` shortcuts (picklable for workers)."""

    def __init__(self, rules: list[tuple[int | None, str]]) -> None:
        self.rules = rules

    def __call__(self, data: np.ndarray) -> np.ndarray:
        keep = np.ones(len(data), bool)
        spatial = tuple(range(2, data.ndim))
        for iv, rule in self.rules:
            if rule == "no-nan":
                sub = data if iv is None else data[:, iv:iv + 1]
                keep &= ~np.isnan(sub).any(axis=(1, *spatial))
            else:  # "centre": the centre pixel is valid and non-zero (e.g. a label)
                centre = (slice(None), iv) + tuple(s // 2 for s in data.shape[2:])
                c = data[centre]
                keep &= np.isfinite(c) & (c != 0)
        return keep


@dataclass(frozen=True)
class _Unit:
    """Everything a chunk task needs to cut its patches (small; shipped with the task)."""

    number: int
    block_shape: tuple[int, ...]            # fetched extent per dim (before padding)
    pad_after: tuple[int, ...]              # padding past the array end, per dim
    pieces: tuple[tuple[tuple[tuple[slice, ...], tuple[slice, ...]], ...], ...]  # per var
    patch_axes: tuple[int, ...]
    offset: tuple[int, ...]                 # first window start in the padded block
    counts: tuple[int, ...]                 # windows (patch dims) or indices (others) per dim
    origin: tuple[int, ...]                 # global index of the first position per dim
    steps: tuple[int, ...]                  # global step between positions per dim
    size: tuple[int, ...]
    stride: tuple[int, ...]
    pad: Any
    where: Callable[[np.ndarray], np.ndarray] | None
    shuffle: bool
    seed: int
    epoch: int
    positions: bool = True


def _assemble(unit: _Unit, pieces: tuple[tuple, ...], values: Sequence[np.ndarray]) -> np.ndarray:
    """The unit's block of one variable: a view when one chunk holds it, else a copy."""
    if len(values) == 1 and all(s.stop - s.start == n for s, n in
                                zip(pieces[0][1], unit.block_shape, strict=True)):
        block = np.asarray(values[0])[pieces[0][0]]
    else:
        block = np.empty(unit.block_shape, np.result_type(*[np.asarray(v) for v in values]))
        for (src, dst), v in zip(pieces, values, strict=True):
            block[dst] = np.asarray(v)[src]
    if any(unit.pad_after):
        # float32 first (a NaN constant on integer data), then predict's padding rule
        block = pad_array(block.astype(np.float32, copy=False),
                          [(0, p) for p in unit.pad_after], unit.pad)
    return block


def _cut_unit(unit: _Unit, *values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut one unit into ``(data (n, var, *size) float32, positions (n, ndim) int64)``."""
    n_var = len(unit.pieces)
    counts = unit.counts
    n = math.prod(counts)
    out = np.empty((n, n_var, *unit.size), np.float32)
    shaped = out.reshape(*counts, n_var, *unit.size)
    lead = (slice(None),) * len(counts)
    i = 0
    for v, pieces in enumerate(unit.pieces):
        block = _assemble(unit, pieces, values[i:i + len(pieces)])
        i += len(pieces)
        win = window_view(block, unit.patch_axes, unit.size, unit.stride, unit.offset,
                          [counts[a] for a in unit.patch_axes])
        # The one copy of the pipeline: strided windows -> contiguous float32 patches.
        np.copyto(shaped[lead + (v,)], win, casting="unsafe")
    if unit.positions and n:
        axes = [o + s * np.arange(c, dtype=np.int64)
                for o, s, c in zip(unit.origin, unit.steps, counts, strict=True)]
        positions = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)
    else:  # zero-width: filtering and shuffling cost nothing
        positions = np.empty((n, len(counts) if unit.positions else 0), np.int64)
    if unit.where is not None and n:
        keep = np.asarray(unit.where(out), dtype=bool)
        if keep.shape != (n,):
            raise SpecError(f"where= returned a mask of shape {keep.shape}, expected ({n},): "
                            "return one boolean per patch")
        if not keep.all():
            out, positions = out[keep], positions[keep]
    if unit.shuffle:
        out, positions = _shuffle_unit(out, positions, unit.seed, unit.epoch, unit.number)
    return out, positions


def _run_unit(unit: _Unit, graph: dict, keys: list) -> tuple[np.ndarray, np.ndarray]:
    """Read the unit's source chunks by running its culled graph here, then cut it."""
    from dask.core import get

    from engine import meter

    t0 = time.perf_counter()
    values = get(graph, keys)
    out = _cut_unit(unit, *values)
    meter.record("patches", items=len(out[0]), bytes_read=sum(getattr(v, "nbytes", 0)
                                                             for v in values),
                 seconds=time.perf_counter() - t0)
    return out


def _shuffle_unit(data: np.ndarray, positions: np.ndarray, seed: int, epoch: int,
                  number: int) -> tuple[np.ndarray, np.ndarray]:
    """The within-chunk permutation of unit ``number`` for ``(seed, epoch)``."""
    if len(data) < 2:
        return data, positions
    perm = np.random.default_rng([seed, epoch, number]).permutation(len(data))
    # np.take on axis 0: several times faster than fancy indexing for large row groups
    return np.take(data, perm, axis=0), np.take(positions, perm, axis=0)


def _axis_pieces(bounds: np.ndarray, lo: int, hi: int) -> list[tuple[int, slice, slice]]:
    """``(chunk index, slice in chunk, slice in block)`` for ``[lo, hi)``; ``bounds`` = cumsum."""
    out = []
    j = int(np.searchsorted(bounds, lo, side="right")) - 1
    while j < len(bounds) - 1 and bounds[j] < hi:
        start, stop = int(bounds[j]), int(bounds[j + 1])
        a, b = max(lo, start), min(hi, stop)
        if a < b:
            out.append((j, slice(a - start, b - start), slice(a - lo, b - lo)))
        j += 1
    return out


def _in_dataloader_worker() -> tuple[int, int] | None:
    """``(worker id, num workers)`` inside a torch DataLoader worker, without importing torch."""
    data = sys.modules.get("torch.utils.data")
    if data is None:
        return None
    info = data.get_worker_info()
    return None if info is None else (info.id, info.num_workers)


def _active_client(client: Any) -> Any:
    if client is not None:
        return client
    if "distributed" not in sys.modules:  # no client can exist without distributed imported
        return None
    try:
        from distributed import default_client

        return default_client()
    except ValueError:
        return None


class PatchIterator:
    """Iterable of :class:`PatchBatch` over a cube; see :func:`iter_patches`.

    The plan (window grid, units, coverage) is computed from metadata when the iterator
    is built; data is read only while iterating. Iterating again replays the same epoch;
    :meth:`set_epoch` changes the shuffle order.
    """

    def __init__(self, ds: xr.Dataset | xr.DataArray, size: Mapping[str, int] | None,
                 stride: Mapping[str, int] | int | None, variables: Sequence[str] | None,
                 batch_size: int, where: WhereLike, shuffle: bool, seed: int, epoch: int,
                 pad: PadLike, as_torch: bool, shard: tuple[int, int] | None, client: Any,
                 prefetch: int | None, shuffle_buffer: int | None, cache: bool = False,
                 positions: bool = True) -> None:
        if isinstance(ds, xr.DataArray):
            ch = next((d for d in _CHANNEL_DIMS if d in ds.dims), None)
            # a channel-like dim becomes the patch channels, one variable per label
            ds = ds.to_dataset(dim=ch) if ch else ds.to_dataset(name=ds.name or "data")
        names = list(variables) if variables is not None else list(ds.data_vars)
        missing = [v for v in names if v not in ds.data_vars]
        if missing or not names:
            raise CubeError(f"variables {missing or names} are not in the cube (it has "
                            f"{list(ds.data_vars)}): pass variables= that exist")
        dims = tuple(str(d) for d in ds[names[0]].dims)
        for v in names[1:]:
            if set(ds[v].dims) != set(dims):
                raise CubeError(f"variable {v!r} has dims {ds[v].dims}, {names[0]!r} has {dims}: "
                                "select variables with the same dims")
        if size is None:
            ydim, xdim = cube_dims(ds[names]).horizontal
            size = {ydim: _DEFAULT_SIZE, xdim: _DEFAULT_SIZE}
        if not size:
            raise SpecError("size= needs at least one dim, e.g. {'lat': 64, 'lon': 64}")
        size = resolve_keys(ds[names], size, "size")
        unknown = [d for d in size if d not in dims]
        if unknown:
            raise CubeError(f"patch dims {unknown} are not dims of the variables {dims}")
        for d, n in size.items():
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise SpecError(f"size.{d}={n!r} must be a positive integer")
        if isinstance(stride, (int, np.integer)) and not isinstance(stride, bool):
            given: Mapping[str, Any] = dict.fromkeys(size, int(stride))
        elif stride is None or isinstance(stride, Mapping):
            given = resolve_keys(ds[names], stride or {}, "stride")
        else:
            raise SpecError(f"stride={stride!r}: use an integer or {{dim: integer}}")
        extra = [d for d in given if d not in size]
        if extra:
            raise SpecError(f"stride names {extra}, which are not patch dims {list(size)}: "
                            "give a stride only for dims in size=")
        stride = {d: given.get(d, size[d]) for d in size}
        for d, n in stride.items():
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
                raise SpecError(f"stride.{d}={n!r} must be a positive integer")
        if batch_size < 1:
            raise SpecError(f"batch_size={batch_size} must be >= 1")
        if pad is not None:
            try:
                pad_kwargs(pad)
            except ValueError:
                raise SpecError(f"pad={pad!r}: use None, 'reflect', 'nearest', 'constant' or "
                                "a number") from None
        if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
            raise SpecError(f"shard={shard!r}: use (rank, world_size) with 0 <= rank < world_size")

        if pad is None:
            for d, n in size.items():
                if int(n) > int(ds.sizes[d]):
                    raise SpecError(
                        f"size.{d}={n} is larger than the cube ({d} has {ds.sizes[d]} cells), "
                        "so no patch fits: use a smaller size or pad='reflect'")
        self.variables = tuple(names)
        self.dims = dims
        self.patch_dims = tuple(d for d in dims if d in size)
        self.size = tuple(int(size[d]) for d in self.patch_dims)
        self.stride = tuple(int(stride[d]) for d in self.patch_dims)
        self.shape = tuple(int(ds.sizes[d]) for d in dims)
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), int(epoch)
        self.pad, self.as_torch, self.shard = pad, bool(as_torch), shard
        self._client = client
        self.prefetch = max(1, int(config.get("train.prefetch-chunks", prefetch)))
        self.shuffle_buffer = max(1, int(config.get("train.shuffle-buffer-chunks",
                                                    shuffle_buffer)))
        self.where = self._resolve_where(where)
        self.grid = WindowGrid(tuple(int(ds.sizes[d]) for d in self.patch_dims), self.size,
                               self.stride, partial=pad is not None)
        arrays = []
        for v in names:
            x = ds[v].transpose(*dims)
            if not isinstance(x.data, da.Array):  # numpy or lazily indexed backend arrays
                x = x.chunk("auto")
            arrays.append(x.data)
        self._arrays = arrays
        self._bounds = [[np.concatenate([[0], np.cumsum(c)]).astype(np.int64) for c in a.chunks]
                        for a in arrays]
        self._axes = self._plan_axes()
        self._dsk: dict | None = None
        self._plans: dict[int, tuple[_Unit, list, dict]] = {}
        self.cache = bool(cache)
        self.positions = bool(positions)
        self._cache: dict[int, Any] = {}  # unit -> future on the cluster, or local result

    # -- plan ---------------------------------------------------------------------------
    def _resolve_where(self, where: WhereLike) -> Callable[[np.ndarray], np.ndarray] | None:
        if where is None or callable(where):
            return where
        if where == "no-nan":
            return _Where([(None, "no-nan")])
        if isinstance(where, Mapping):
            rules: list[tuple[int | None, str]] = []
            for var, rule in where.items():
                if var not in self.variables:
                    raise CubeError(f"where= names {var!r}, which is not one of the patch "
                                    f"variables {self.variables}: add it to variables=")
                if rule not in ("no-nan", "centre"):
                    raise SpecError(f"where={{{var!r}: {rule!r}}}: use 'no-nan' or 'centre'")
                rules.append((self.variables.index(var), rule))
            return _Where(rules)
        raise SpecError(f"where={where!r}: use a callable, 'no-nan' or {{var: 'no-nan'|'centre'}}")

    def _plan_axes(self) -> list[list[tuple]]:
        """Per dim, the non-empty blocks: ``(lo, hi, k0, k1)`` (window numbers for patch dims)."""
        out = []
        chunks = self._arrays[0].chunks
        for dim, c in zip(self.dims, chunks, strict=True):
            bounds = np.concatenate([[0], np.cumsum(c)]).astype(int)
            entries = []
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                if dim in self.patch_dims:
                    k0, k1 = self.grid.block_range(self.patch_dims.index(dim), lo, hi)
                    if k1 > k0:
                        entries.append((lo, hi, k0, k1))
                elif hi > lo:
                    entries.append((lo, hi, lo, hi))
            out.append(entries)
        return out

    @property
    def n_units(self) -> int:
        """Chunk tasks holding at least one window start."""
        return math.prod(len(a) for a in self._axes)

    @property
    def n_windows(self) -> int:
        """Patches in one epoch over all shards, before ``where`` filtering (no compute)."""
        return self.grid.n_windows * self._n_other

    @property
    def _n_other(self) -> int:
        """Positions along the iterated (non-patch) dims."""
        return math.prod(n for d, n in zip(self.dims, self.shape, strict=True)
                         if d not in self.patch_dims)

    @property
    def coverage(self) -> dict[str, Any]:
        """``n_windows``, ``n_partial_dropped`` and ``uncovered_pixel_share`` of the grid."""
        dropped = 0 if self.grid.partial else self.grid.n_partial * self._n_other
        return {
            "n_windows": self.n_windows,
            "n_partial_dropped": dropped,
            "uncovered_pixel_share": float(1.0 - self.grid.covered_share),
            "padded": self.grid.partial,
        }

    def report(self, warn: bool = False) -> dict[str, Any]:
        """The :attr:`coverage` dict; ``warn=True`` also warns if windows were dropped."""
        cov = self.coverage
        if warn and cov["n_partial_dropped"]:
            warnings.warn(
                f"{cov['n_partial_dropped']} partial edge windows dropped, "
                f"{cov['uncovered_pixel_share']:.1%} of pixels in no patch: pass pad='reflect' "
                "to produce them", EngineWarning, stacklevel=2)
        return cov

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order of the next iteration."""
        self.epoch = int(epoch)

    def _unit(self, number: int) -> tuple[_Unit, list]:
        """The task payload of unit ``number`` and the source chunk keys it reads."""
        idx = np.unravel_index(number, [len(a) for a in self._axes])
        fetch, pad_after, offset, counts, origin, steps = [], [], [], [], [], []
        for d, (dim, i) in enumerate(zip(self.dims, idx, strict=True)):
            lo, hi, k0, k1 = self._axes[d][i]
            if dim in self.patch_dims:
                p = self.patch_dims.index(dim)
                a, b = self.grid.span(p, k0, k1)
                n = self.shape[d]
                f_lo, f_hi = a, min(b, n)
                if b > n and self.pad in ("reflect", "nearest"):
                    # reflect/nearest need the pixels before the edge: read them so the
                    # padding equals the padding of the whole array, whatever the chunking
                    # (a reflection wider than the axis reads the whole axis)
                    reach = b - n if self.pad == "reflect" else 0
                    f_lo = max(0, min(a, n - 1 - reach))
                fetch.append((f_lo, f_hi))
                pad_after.append(b - f_hi)
                offset.append(a - f_lo)
                counts.append(k1 - k0)
                origin.append(a)
                steps.append(self.stride[p])
            else:
                fetch.append((lo, hi))
                pad_after.append(0)
                counts.append(hi - lo)
                origin.append(lo)
                steps.append(1)
        pieces_all, keys = [], []
        for arr, bounds in zip(self._arrays, self._bounds, strict=True):
            per_axis = [_axis_pieces(c, a, b) for c, (a, b) in zip(bounds, fetch, strict=True)]
            pieces = []
            for combo in itertools.product(*per_axis):
                keys.append((arr.name, *[j for j, _, _ in combo]))
                pieces.append((tuple(s for _, s, _ in combo), tuple(t for _, _, t in combo)))
            pieces_all.append(tuple(pieces))
        unit = _Unit(
            number=int(number), block_shape=tuple(b - a for a, b in fetch),
            pad_after=tuple(pad_after), pieces=tuple(pieces_all),
            patch_axes=tuple(self.dims.index(d) for d in self.patch_dims),
            offset=tuple(offset), counts=tuple(counts), origin=tuple(origin),
            steps=tuple(steps), size=self.size, stride=self.stride, pad=self.pad,
            where=self.where, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
            positions=self.positions,
        )
        return unit, keys

    def _graph(self) -> dict:
        """The optimised graph of every source chunk, materialised once and reused."""
        if self._dsk is None:
            from dask.array.optimization import optimize
            from dask.highlevelgraph import HighLevelGraph

            hlg = HighLevelGraph.merge(*[a.__dask_graph__() for a in self._arrays])
            keys = [k for a in self._arrays for k in da.core.flatten(a.__dask_keys__())]
            self._dsk = dict(optimize(hlg, keys))
        return self._dsk

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_dsk"] = None  # rebuilt where it is used (e.g. in a DataLoader worker)
        state["_plans"] = {}
        state["_client"] = None
        state["_cache"] = {}
        return state

    def release(self) -> None:
        """Drop the cached unit results (``cache=True``) from the workers or this process."""
        for held in self._cache.values():
            if hasattr(held, "release"):
                held.release()
        self._cache = {}

    # -- execution ----------------------------------------------------------------------
    def _order(self) -> list[int]:
        order = np.arange(self.n_units)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_units)
        if self.shard is not None:
            order = order[self.shard[0]::self.shard[1]]
        worker = _in_dataloader_worker()
        if worker is not None:
            order = order[worker[0]::worker[1]]
        return [int(u) for u in order]

    def _planned(self, number: int) -> tuple[_Unit, list, dict]:
        """Unit payload, source keys and culled source graph of unit ``number`` (cached:
        epochs only change the shuffle seed). With ``cache=True`` the unit is cut
        unshuffled: its result is reused by every epoch and permuted where it is consumed."""
        hit = self._plans.get(number)
        if hit is None:
            from dask.optimization import cull

            unit, keys = self._unit(number)
            sub, _ = cull(self._graph(), keys)
            hit = self._plans[number] = (unit, keys, sub)
        unit, keys, sub = hit
        if self.cache:
            unit = replace(unit, shuffle=False, epoch=0)
        elif unit.epoch != self.epoch:
            unit = replace(unit, epoch=self.epoch)
        return unit, keys, sub

    def _compute_local(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        unit, keys, sub = self._planned(number)
        return _run_unit(unit, sub, list(keys))

    def _delayed(self, number: int) -> Any:
        """Unit ``number`` as one task that reads its source chunks and cuts them.

        The culled source graph travels inside the task instead of being merged into the
        scheduler's graph: the only key submitted is the unit's own, so it can never
        collide with the same source keys submitted (optimised differently) by another
        computation on the same cube, and no intermediate chunk outlives the task.
        """
        from dask.delayed import Delayed

        unit, keys, sub = self._planned(number)
        name = "patches-" + dask.base.tokenize(_VERSION, self.dims, self.patch_dims, unit, keys)
        # a partial keeps the graph and keys opaque: dask must not read them as dependencies
        return Delayed(name, {name: (functools.partial(_run_unit, unit, sub, list(keys)),)})

    def to_delayed(self) -> list[Any]:
        """One :class:`dask.delayed.Delayed` per chunk task, in unit order, each computing
        the unit's ``(data, positions)`` for the current epoch (before batching and
        sharding). The keys are tokens of everything a unit depends on, so units of
        different iterators -- other cubes, chunkings or parameters -- compute together in
        one graph, and the same unit built twice has the same key."""
        return [self._delayed(u) for u in range(self.n_units)]

    def _results(self, order: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Unit results in ``order``, with ``prefetch`` units in flight.

        With ``cache=True`` a unit is computed once: its result stays on the cluster (a
        future held by this iterator) or, without a client, in this process, and later
        epochs only permute it.
        """
        client = None if _in_dataloader_worker() else _active_client(self._client)
        self._graph()  # build once here, not racing in the pool threads
        pending: deque = deque()
        it = iter(order)
        pool = None
        if client is not None:
            def compute(u: int) -> Any:
                return client.compute(self._delayed(u))
        else:
            nthreads = min(self.prefetch, int(dask.config.get("num_workers", None)
                                              or os.cpu_count() or 1))
            pool = ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="patches")

            def compute(u: int) -> Any:
                return pool.submit(self._compute_local, u)

        def submit(u: int) -> tuple[int, Any]:
            if not self.cache:
                return u, compute(u)
            held = self._cache.get(u)
            if held is None:
                held = self._cache[u] = compute(u)
            return u, held

        try:
            for u in itertools.islice(it, self.prefetch):
                pending.append(submit(u))
            while pending:
                u, fut = pending.popleft()
                data, pos = fut.result()  # a finished future keeps its result for the cache
                del fut
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(submit(nxt))
                if self.cache and self.shuffle:
                    data, pos = _shuffle_unit(data, pos, self.seed, self.epoch, u)
                yield data, pos
        finally:
            for _, f in pending:
                if not self.cache:
                    f.cancel()
            if pool is not None:  # cached units still queued run to completion
                pool.shutdown(wait=True, cancel_futures=not self.cache)

    def _mixed(self, results: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple]:
        """Cross-chunk shuffle: permute the patches of ``shuffle_buffer`` units together."""
        stream = (self.shard or (0, 1))[0], (_in_dataloader_worker() or (0, 1))[0]
        group: list = []
        for g, res in enumerate(itertools.chain(results, [None])):
            if res is not None:
                group.append(res)
            if group and (res is None or len(group) == self.shuffle_buffer):
                data = np.concatenate([r[0] for r in group])
                pos = np.concatenate([r[1] for r in group])
                rng = np.random.default_rng([self.seed, self.epoch, *stream, g])
                perm = rng.permutation(len(data))
                group = []
                yield np.take(data, perm, axis=0), np.take(pos, perm, axis=0)

    def _batches(self, results: Iterator[tuple]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Exactly ``batch_size`` patches per batch across unit boundaries (views when possible)."""
        bs = self.batch_size
        held_d: list = []
        held_p: list = []
        have = 0
        for data, pos in results:
            start, n = 0, len(data)
            if have:
                take = min(bs - have, n)
                held_d.append(data[:take])
                held_p.append(pos[:take])
                have += take
                start = take
                if have == bs:
                    yield np.concatenate(held_d), np.concatenate(held_p)
                    held_d, held_p, have = [], [], 0
            while n - start >= bs:
                yield data[start:start + bs], pos[start:start + bs]
                start += bs
            if start < n:
                held_d.append(data[start:])
                held_p.append(pos[start:])
                have += n - start
        if have:
            yield np.concatenate(held_d), np.concatenate(held_p)

    def __iter__(self) -> Iterator[PatchBatch]:
        results = self._results(self._order())
        if self.shuffle and self.shuffle_buffer > 1:
            results = self._mixed(results)
        if self.as_torch:
            from engine.errors import require

            torch = require("torch", "ml")
            for d, p in self._batches(results):
                yield PatchBatch(torch.from_numpy(d), torch.from_numpy(p))
        else:
            for d, p in self._batches(results):
                yield PatchBatch(d, p)

    def __repr__(self) -> str:
        size = dict(zip(self.patch_dims, self.size, strict=True))
        stride = dict(zip(self.patch_dims, self.stride, strict=True))
        return (f"<PatchIterator {len(self.variables)} variables x {size} stride {stride}: "
                f"{self.n_windows} windows in {self.n_units} chunk tasks, "
                f"batch_size={self.batch_size}>")


def iter_patches(
    ds: xr.Dataset | xr.DataArray,
    size: Mapping[str, int] | None = None,
    stride: Mapping[str, int] | int | None = None,
    variables: Sequence[str] | None = None,
    batch_size: int = 256,
    where: WhereLike = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    pad: PadLike = None,
    as_torch: bool = False,
    shard: tuple[int, int] | None = None,
    client: Any = None,
    prefetch: int | None = None,
    shuffle_buffer: int | None = None,
    cache: bool = False,
    positions: bool = True,
) -> PatchIterator:
    """Iterate over patches of a dask-backed cube in batches, one task per chunk.

    Parameters
    ----------
    ds
        Cube; all selected variables must share their dims. A DataArray with a
        variable/channel/band/feature dim gives one channel per label along it.
    size
        Patch size per dim (default 64 x 64 over the cube's horizontal dims, found by
        :func:`engine.dims.cube_dims`). Keys are the cube's dim names or the aliases
        ``lat``/``latitude``/``y`` and ``lon``/``longitude``/``x``. Dims not listed (e.g.
        time, depth) are iterated: each patch is one index along them.
    stride
        Window step per patch dim (int or dict, keys as for ``size``); default ``size``
        (non-overlapping). Windows start on a global grid ``0, stride, 2*stride, ...``.
    variables
        Variables stacked as the patch channels (default: all data variables).
    batch_size
        Patches per batch; batches span chunk boundaries, only the last may be smaller.
    where
        Patch filter applied inside each chunk task: a function of the chunk's patches
        ``(n, variable, *size)`` returning a boolean keep mask ``(n,)``; ``"no-nan"``; or
        ``{var: "no-nan" | "centre"}`` ("centre": centre pixel finite and non-zero).
    shuffle, seed, epoch
        Seeded, epoch-aware shuffling: chunk order permuted by ``(seed, epoch)``, patches
        permuted inside each chunk, and ``shuffle_buffer`` chunks mixed together.
    pad
        None: partial edge windows are dropped and reported (:attr:`PatchIterator.coverage`).
        Otherwise they are padded past the far edge and produced, with the padding of
        ``predict(boundary=...)``: ``"reflect"`` (``np.pad(mode="reflect")``, the edge
        pixel not repeated), ``"nearest"`` (``mode="edge"``), ``"constant"`` (zeros) or a
        number. The grid starts at index 0, so nothing is padded before the start edge.
    as_torch
        Yield torch tensors (zero-copy) instead of numpy arrays.
    shard
        ``(rank, world_size)``: this rank gets every ``world_size``-th chunk of the
        (permuted) order. Inside a torch DataLoader worker the chunks are further dealt
        across workers, so an epoch yields every patch exactly once.
    client
        Distributed client (default: the active one, if any); else a local thread pool.
    prefetch
        Chunk tasks in flight (default config ``train.prefetch-chunks``).
    shuffle_buffer
        Chunks mixed by the shuffle (default config ``train.shuffle-buffer-chunks``).
    cache
        Compute each chunk's (filtered) patches once and reuse them in every epoch: kept
        on the cluster's workers when a client is active (call
        :meth:`PatchIterator.release` to free them), else in this process. For training
        sets that fit in the cluster's memory after ``where`` filtering.
    positions
        Return each patch's global index; False gives zero-width positions ``(n, 0)``
        and saves their memory (24 bytes per patch of a 3-D cube).

    Returns
    -------
    PatchIterator
        Iterable of :class:`PatchBatch`; ``n_windows`` and ``coverage`` need no compute.

    Examples
    --------
    >>> from engine.testing.cubes import synthetic_cube
    >>> ds = synthetic_cube({"time": 2, "lat": 64, "lon": 96}, chunks={"lat": 32})
    >>> it = iter_patches(ds, size={"lat": 32, "lon": 32}, batch_size=8)
    >>> it.n_windows, next(iter(it)).data.shape
    (12, (8, 3, 32, 32))
    """
    return PatchIterator(ds, size, stride, variables, batch_size,
                         where, shuffle, seed, epoch, pad, as_torch, shard, client, prefetch,
                         shuffle_buffer, cache, positions)
