"""Tile2Vec triplets from a cube, in physical units (issue 12, section 1).

A triplet is an *anchor* tile, a *neighbour* tile a given distance away (in km) at the same
time step, and a *distant* tile chosen by a declared rule: ``"other_time"`` (any tile of
another time step, document 004's "random different day") or ``"min_distance"`` (another
time step, or the same one at least ``min_distance_km`` away, centre to centre).

What this module guarantees
    * Anchors are uniform over the valid area: every tile position whose pixels all lie
      in the requested fold is equally likely (an anchor that has no such neighbour
      position at the drawn distance is redrawn, so isolated positions are rarer).
    * Triplets never straddle folds: all three tiles lie wholly inside one fold of the
      ``folds`` labels (``-1``: not usable, e.g. missing data or a buffer).
    * Triplet ``i`` of fold ``f`` is a function of ``(seed, f, i)`` only, so any
      partition of the indices over workers gives the same triplets.
    * Each triplet reports its neighbour's distance in km (after rounding to whole
      pixels) and the share of the anchor the neighbour overlaps.

Tiles are cut from the (dask-backed) cube per batch with one ``compute`` of the batch's
slices, so only the chunks the batch touches are read; nothing goes through image files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr

from engine.errors import CubeError, SpecError

__all__ = ["TripletSampler", "Triplets", "triplet_sampler", "tile_pixels", "read_tiles",
           "augment_tiles", "triplet_batches", "grid_spacing_km"]

DistantRule = Literal["other_time", "min_distance"]
_TRIES = 200


def grid_spacing_km(da: xr.DataArray, y: str = "y", x: str = "x") -> tuple[float, float]:
    """``(dy, dx)`` in km of a regular grid whose ``y``/``x`` coordinates are in km or m.

    >>> da = xr.DataArray(np.zeros((3, 4)), dims=("y", "x"),
    ...                   coords={"y": ("y", [0, 500, 1000], {"units": "m"}),
    ...                           "x": ("x", [0.0, 2, 4, 6], {"units": "km"})})
    >>> grid_spacing_km(da)
    (0.5, 2.0)
    """
    out = []
    for dim in (y, x):
        if dim not in da.coords or da.sizes[dim] < 2:
            raise CubeError(f"dim {dim!r} needs a coordinate of at least two values in km "
                            "to place tiles in physical units")
        c = np.asarray(da[dim].values, dtype=float)
        step = np.diff(c)
        if not np.allclose(step, step[0], rtol=1e-3):
            raise CubeError(f"coordinate {dim!r} is not regular: triplets need a grid of "
                            "constant spacing (regrid it first)")
        units = str(da[dim].attrs.get("units", "km"))
        scale = {"km": 1.0, "m": 1e-3, "metre": 1e-3, "meter": 1e-3, "metres": 1e-3}.get(units)
        if scale is None:
            raise CubeError(f"coordinate {dim!r} has units {units!r}: triplets need km or m")
        out.append(abs(float(step[0])) * scale)
    return out[0], out[1]


def tile_pixels(size: float, unit: Literal["px", "km"], spacing_km: float) -> int:
    """A tile size in pixels: ``size`` pixels, or ``size`` km on a grid of ``spacing_km``.

    >>> tile_pixels(64, "km", 2.0), tile_pixels(32, "px", 2.0)
    (32, 32)
    """
    if unit == "px":
        n = int(size)
    elif unit == "km":
        n = int(round(size / spacing_km))
    else:
        raise SpecError(f"tile unit {unit!r}: use 'px' or 'km'")
    if n < 2:
        raise SpecError(f"tile of {size} {unit} is {n} pixel(s) on a {spacing_km:g} km grid: "
                        "use a tile of at least 2 pixels")
    return n


@dataclass(frozen=True)
class Triplets:
    """Positions of ``n`` triplets: ``time``, ``y0``, ``x0`` are ``(n, 3)`` integer arrays
    (top-left pixel; columns anchor, neighbour, distant)."""

    index: np.ndarray
    fold: int
    time: np.ndarray
    y0: np.ndarray
    x0: np.ndarray
    #: Neighbour centre distance in km (as placed on the grid) and its overlap share.
    neighbour_km: np.ndarray
    overlap: np.ndarray
    #: Distant tile's centre distance in km when at the anchor's time step, else NaN.
    distant_km: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class TripletSampler:
    """Where triplets may lie: built by :func:`triplet_sampler`."""

    tile: int
    dy_km: float
    dx_km: float
    neighbour_km: tuple[float, float]
    distant: DistantRule
    min_distance_km: float
    seed: int
    #: Fold of every tile position ``(time, y0, x0)``; -1 where a tile is not in one fold.
    tile_fold: np.ndarray
    #: Flat positions into ``tile_fold`` per fold, sorted.
    positions: dict[int, np.ndarray]

    def n_positions(self, fold: int) -> int:
        """Tile positions wholly inside ``fold``."""
        return len(self.positions.get(fold, ()))

    def _tile_km(self, dy: int, dx: int) -> float:
        return math.hypot(dy * self.dy_km, dx * self.dx_km)

    def _one(self, fold: int, i: int) -> tuple[list[int], float, float, float]:
        pos = self.positions[fold]
        tf = self.tile_fold
        _, ny, nx = tf.shape
        rng = np.random.default_rng([self.seed, fold, i])
        lo, hi = self.neighbour_km
        # an anchor with no neighbour in its fold at the distance is redrawn (e.g. a small
        # island of valid pixels); both draws come from the triplet's own generator
        for _ in range(_TRIES):
            t, ya, xa = np.unravel_index(pos[rng.integers(len(pos))], tf.shape)
            for _ in range(_TRIES // 4):
                d = lo if lo == hi else float(rng.uniform(lo, hi))
                theta = float(rng.uniform(0.0, 2.0 * math.pi))
                oy = int(round(d * math.sin(theta) / self.dy_km))
                ox = int(round(d * math.cos(theta) / self.dx_km))
                yn, xn = ya + oy, xa + ox
                if (oy or ox) and 0 <= yn < ny and 0 <= xn < nx and tf[t, yn, xn] == fold:
                    break
            else:
                continue
            break
        else:
            raise CubeError(f"no neighbour tile in fold {fold} at {lo:g}-{hi:g} km from "
                            f"{_TRIES} anchors: give a smaller neighbour distance or larger "
                            "folds")
        h = self.tile
        overlap = max(0, h - abs(oy)) * max(0, h - abs(ox)) / (h * h)
        for _ in range(_TRIES):
            td, yd, xd = np.unravel_index(pos[rng.integers(len(pos))], tf.shape)
            if td != t:
                dist = math.nan
                break
            dist = self._tile_km(int(yd - ya), int(xd - xa))
            if self.distant == "min_distance" and dist >= self.min_distance_km:
                break
        else:
            raise CubeError(f"no distant tile in fold {fold} by rule {self.distant!r} in "
                            f"{_TRIES} tries: the fold needs more time steps or area")
        return ([int(t), int(t), int(td), int(ya), int(yn), int(yd), int(xa), int(xn), int(xd)],
                self._tile_km(oy, ox), overlap, dist)

    def sample(self, indices: Sequence[int] | np.ndarray, fold: int = 0) -> Triplets:
        """Triplets ``indices`` of ``fold``; triplet ``i`` depends on ``(seed, fold, i)``.

        >>> folds = np.zeros((2, 40, 40), np.int8)
        >>> s = triplet_sampler(folds, tile=8, neighbour_km=8.0, dx_km=1.0, seed=1)
        >>> tr = s.sample(range(5))
        >>> tr.time.shape, bool((tr.time[:, 0] != tr.time[:, 2]).all())
        ((5, 3), True)
        >>> bool(np.allclose(tr.neighbour_km, 8.0, atol=0.75))
        True
        >>> s.sample([3]).x0.tolist() == tr.x0[3:4].tolist()
        True
        """
        if self.n_positions(fold) == 0:
            raise CubeError(f"fold {fold} holds no whole {self.tile}-pixel tile: use smaller "
                            "tiles or larger folds")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = [self._one(fold, int(i)) for i in idx]
        pos = np.array([r[0] for r in rows], dtype=np.int64).reshape(-1, 3, 3)
        return Triplets(index=idx, fold=fold, time=pos[:, 0], y0=pos[:, 1], x0=pos[:, 2],
                        neighbour_km=np.array([r[1] for r in rows]),
                        overlap=np.array([r[2] for r in rows]),
                        distant_km=np.array([r[3] for r in rows]))


def _pure_tiles(folds: np.ndarray, tile: int) -> np.ndarray:
    """Fold of each tile position when all its pixels share it, else -1 (summed-area
    tables per fold)."""
    t, ny, nx = folds.shape
    out = np.full((t, ny - tile + 1, nx - tile + 1), -1, dtype=np.int32)
    for f in np.unique(folds):
        if f < 0:
            continue
        m = (folds == f).astype(np.int32)
        sat = np.zeros((t, ny + 1, nx + 1), dtype=np.int64)
        sat[:, 1:, 1:] = m.cumsum(1).cumsum(2)
        inside = (sat[:, tile:, tile:] - sat[:, :-tile, tile:] - sat[:, tile:, :-tile]
                  + sat[:, :-tile, :-tile])
        out[inside == tile * tile] = f
    return out


def triplet_sampler(folds: np.ndarray | xr.DataArray, *, tile: int,
                    neighbour_km: float | tuple[float, float],
                    distant: DistantRule = "other_time", min_distance_km: float | None = None,
                    seed: int = 0, dx_km: float | None = None,
                    dy_km: float | None = None) -> TripletSampler:
    """Plan triplets over fold labels ``folds`` ``(time, y, x)`` (integers; ``-1`` = not
    usable), or ``(time,)`` for whole time steps (needs ``dx_km``; ``dy_km`` defaults to
    it). A DataArray with ``y``/``x`` coordinates in km gives the spacing itself.

    ``neighbour_km``: a distance, or ``(low, high)`` to draw one uniformly per triplet.
    ``distant``: ``"other_time"`` or ``"min_distance"`` (``min_distance_km`` apart at the
    same step, or any tile of another step).
    """
    if isinstance(folds, xr.DataArray):
        if dx_km is None and "x" in folds.dims:
            dy_km, dx_km = grid_spacing_km(folds)
        arr = np.asarray(folds.values)
    else:
        arr = np.asarray(folds)
    if dx_km is None:
        raise SpecError("give dx_km (grid spacing in km) or folds with y/x coordinates in km")
    dy_km = dx_km if dy_km is None else dy_km
    if arr.ndim != 3:
        raise SpecError(f"folds must be (time, y, x), got {arr.ndim} dims")
    if isinstance(neighbour_km, (int, float)):
        lo = hi = float(neighbour_km)
    else:
        lo, hi = float(neighbour_km[0]), float(neighbour_km[1])
    if not 0 < lo <= hi:
        raise SpecError(f"neighbour_km must be > 0 (and low <= high), got {neighbour_km}")
    if distant not in ("other_time", "min_distance"):
        raise SpecError(f"distant {distant!r}: use 'other_time' or 'min_distance'")
    if distant == "min_distance":
        if min_distance_km is None or not min_distance_km > 0:
            raise SpecError("distant 'min_distance' needs min_distance_km > 0")
    elif arr.shape[0] < 2:
        raise SpecError("distant 'other_time' needs at least two time steps")
    if not 2 <= tile <= min(arr.shape[1:]):
        raise SpecError(f"tile {tile} px must be in [2, {min(arr.shape[1:])}] (the grid)")
    tf = _pure_tiles(arr.astype(np.int64), tile)
    flat = tf.reshape(-1)
    positions = {int(f): np.flatnonzero(flat == f) for f in np.unique(flat) if f >= 0}
    return TripletSampler(tile=tile, dy_km=float(dy_km), dx_km=float(dx_km),
                          neighbour_km=(lo, hi), distant=distant,
                          min_distance_km=float(min_distance_km or 0.0), seed=int(seed),
                          tile_fold=tf, positions=positions)


def read_tiles(da: xr.DataArray, time: np.ndarray, y0: np.ndarray, x0: np.ndarray,
               tile: int, scheduler: Any = "sync") -> np.ndarray:
    """Tiles ``(n, channel, tile, tile)`` float32 of ``da`` (``(time, y, x)`` or ``(time,
    channel, y, x)``) at top-left pixels ``(time, y0, x0)``: the slices of a dask-backed
    cube are computed together, so each chunk a batch touches is read once.

    ``scheduler`` (any ``dask.compute`` scheduler) reads the chunks; the default
    ``"sync"`` reads them in the calling (training) process, where the tiles are needed,
    so a batch costs no round trip through a distributed scheduler.

    >>> da = xr.DataArray(np.arange(2 * 4 * 4.0).reshape(2, 4, 4), dims=("time", "y", "x"))
    >>> read_tiles(da.chunk({"time": 1}), np.array([1]), np.array([2]), np.array([1]), 2)[0, 0]
    array([[25., 26.],
           [29., 30.]], dtype=float32)
    """
    data = da.data
    if da.ndim == 3:
        data = data[:, None]
    pieces = [data[int(t), :, int(y):int(y) + tile, int(x):int(x) + tile]
              for t, y, x in zip(time, y0, x0, strict=True)]
    if not pieces:
        return np.zeros((0, data.shape[1], tile, tile), np.float32)
    if hasattr(data, "dask"):
        import dask
        import dask.array as dsa

        with warnings.catch_warnings():  # many small slices across chunks, by design
            warnings.simplefilter("ignore", dsa.PerformanceWarning)
            (out,) = dask.compute(dsa.stack(pieces), scheduler=scheduler)
    else:
        out = np.stack(pieces)
    return np.asarray(out, dtype=np.float32)


def augment_tiles(tiles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each square tile of ``(n, ..., h, w)`` rotated by a random multiple of 90 degrees and
    flipped with probability 1/2 (the dihedral group: no pixel is interpolated).

    >>> t = np.arange(4.0).reshape(1, 1, 2, 2)
    >>> sorted(augment_tiles(t, np.random.default_rng(0)).ravel().tolist())
    [0.0, 1.0, 2.0, 3.0]
    """
    out = np.empty_like(tiles)
    k = rng.integers(0, 4, size=len(tiles))
    flip = rng.integers(0, 2, size=len(tiles))
    for j in range(len(tiles)):
        a = np.rot90(tiles[j], int(k[j]), axes=(-2, -1))
        out[j] = a[..., ::-1] if flip[j] else a
    return out


def triplet_batches(da: xr.DataArray, sampler: TripletSampler, indices: Sequence[int] |
                    np.ndarray, *, fold: int = 0, batch_size: int = 32,
                    augment: bool = True, epoch: int = 0,
                    scheduler: Any = "sync") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``(x, y)`` for :func:`engine.ml.fit.fit`: ``x`` is ``(B, 3, channel, tile,
    tile)`` float32 (anchor, neighbour, distant stacked on axis 1); ``y`` holds each
    triplet's neighbour overlap (the triplet loss does not use it). With ``augment`` each
    tile gets its own flip/rotation from ``(seed, fold, index, epoch)``."""
    idx = np.asarray(indices, dtype=np.int64)
    h = sampler.tile
    for start in range(0, len(idx), batch_size):
        part = idx[start:start + batch_size]
        tr = sampler.sample(part, fold)
        tiles = read_tiles(da, tr.time.ravel(), tr.y0.ravel(), tr.x0.ravel(), h, scheduler)
        tiles = tiles.reshape(len(part), 3, *tiles.shape[1:])
        if augment:
            for j, i in enumerate(part):
                rng = np.random.default_rng([sampler.seed, fold, int(i), epoch, 1])
                tiles[j] = augment_tiles(tiles[j], rng)
        yield tiles, tr.overlap.astype(np.float32)
