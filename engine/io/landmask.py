"""Land fraction and ocean mask on a regular lat/lon grid, from the global-land-mask data.

The ``global-land-mask`` package ships a 30-arc-second land/ocean mask (21600 x 43200,
True = ocean, derived from the GLOBE DEM; most lakes count as land) as a compressed
``.npz``. Importing the package decompresses all of it (933 MB) at import time, so this
module never imports it: it finds the file with :func:`importlib.util.find_spec` and
streams the mask out of the zip archive one band of rows at a time, which keeps the
peak memory near 50 MB whatever the target grid.

The npz grid (checked against ``global_land_mask.globe.lat_to_index``): ``lat`` runs
*down* from 90.0 in steps of -1/120 and ``lon`` up from -180.0 in steps of 1/120, and
each value is the edge of its pixel nearest to (90, -180); the pixel centre is half a
step further.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import numpy as np
import xarray as xr

from engine.dims import LAT, LON
from engine.errors import MissingExtraError, SpecError

__all__ = ["land_fraction", "ocean_mask", "landmask_source"]

Source = Literal["global-land-mask"]

_NPZ_NAME = "globe_combined_mask_compressed.npz"
_ROWS_PER_BAND = 480  # 480 x 43200 bool = 20 MB per band read from the archive


def landmask_source(source: Source = "global-land-mask") -> str:
    """Return the path of the mask file of ``source`` without importing its package.

    Raises
    ------
    MissingExtraError
        If the package is not installed (names the ``landmask`` extra).
    SpecError
        If ``source`` is not a supported source.
    """
    if source != "global-land-mask":
        raise SpecError(f"land mask source {source!r} is not supported; use 'global-land-mask'")
    spec = importlib.util.find_spec("global_land_mask")
    locations = spec.submodule_search_locations if spec is not None else None
    path = os.path.join(locations[0], _NPZ_NAME) if locations else ""
    if not path or not os.path.exists(path):
        raise MissingExtraError(
            "global_land_mask is not installed: install it with pip install 'cube-engine[landmask]'"
        )
    return path


def land_fraction(
    lat: np.ndarray | xr.DataArray,
    lon: np.ndarray | xr.DataArray,
    *,
    source: Source = "global-land-mask",
) -> xr.DataArray:
    """Fraction of land in each cell of a regular lat/lon grid.

    Cells are centred on ``lat``/``lon`` with edges half-way between neighbouring centres.
    Each 30-arc-second pixel counts for the cell that contains its centre, weighted by
    the cosine of its latitude (area weighting). Longitudes may use any convention
    (-180..180 or 0..360) and any start; latitudes and longitudes may be ascending or
    descending.

    Parameters
    ----------
    lat, lon
        1-D regular arrays of cell centres in degrees (at least two values each, cells at
        least 30 arc-seconds wide).
    source
        Where the mask comes from; only ``"global-land-mask"``.

    Returns
    -------
    xarray.DataArray
        float32, dims ``(lat, lon)``, values in [0, 1]; in memory (no dask).

    Examples
    --------
    >>> lat = np.arange(-89.0, 90.0, 2.0); lon = np.arange(-179.0, 180.0, 2.0)
    >>> frac = land_fraction(lat, lon)  # doctest: +SKIP
    """
    path = landmask_source(source)
    lat_grid = _regular_axis(lat, "lat")
    lon_grid = _regular_axis(lon, "lon")
    if abs(lat_grid[1]) * lat_grid[2] > 180 + 1e-6 or abs(lon_grid[1]) * lon_grid[2] > 360 + 1e-6:
        raise SpecError("land_fraction: the grid covers more than the globe; check lat/lon")
    ocean = _ocean_fraction_cached(path, lat_grid, lon_grid)
    return xr.DataArray(
        np.clip(1.0 - ocean, 0.0, 1.0).astype(np.float32),
        dims=(LAT, LON),
        coords={LAT: np.asarray(lat, dtype=float), LON: np.asarray(lon, dtype=float)},
        name="land_fraction",
        attrs={
            "long_name": "land fraction of grid cell",
            "units": "1",
            "valid_range": [0.0, 1.0],
            **_source_attrs(),
        },
    )


def ocean_mask(
    lat: np.ndarray | xr.DataArray,
    lon: np.ndarray | xr.DataArray,
    threshold: float = 0.5,
    *,
    source: Source = "global-land-mask",
) -> xr.DataArray:
    """Ocean mask of a regular lat/lon grid: 1 where the ocean fraction is >= ``threshold``.

    Returns an int8 :class:`xarray.DataArray` with dims ``(lat, lon)``, 1 = ocean and
    0 = land, with CF ``flag_values``/``flag_meanings``. See :func:`land_fraction` for the
    grid rules.
    """
    if not 0.0 <= threshold <= 1.0:
        raise SpecError(f"ocean_mask: threshold must be in [0, 1], got {threshold}")
    ocean = 1.0 - land_fraction(lat, lon, source=source)
    mask = (ocean >= threshold).astype(np.int8)
    mask.name = "ocean_mask"
    mask.attrs = {
        "long_name": "ocean mask",
        "flag_values": np.array([0, 1], dtype=np.int8),
        "flag_meanings": "land ocean",
        "threshold": f"ocean where the area-weighted ocean fraction >= {threshold}",
        **_source_attrs(),
    }
    return mask


def _source_attrs() -> dict[str, str]:
    try:
        pkg = f"global-land-mask {version('global-land-mask')}"
    except PackageNotFoundError:
        pkg = "global-land-mask"
    return {
        "source": (
            f"{pkg} ({_NPZ_NAME}: GLOBE DEM 30-arc-second land/ocean mask, most lakes "
            "count as land), aggregated with cos(lat) pixel weights by engine.io.landmask"
        ),
    }


def _regular_axis(values: np.ndarray | xr.DataArray, name: str) -> tuple[float, float, int]:
    """Return ``(first centre, step, size)`` of a regular 1-D axis or raise SpecError."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size < 2:
        raise SpecError(f"land_fraction: {name} must be a 1-D array of at least 2 cell centres")
    steps = np.diff(arr)
    step = float(steps.mean())
    if not np.allclose(steps, step, rtol=1e-6, atol=1e-9) or step == 0:
        raise SpecError(f"land_fraction: {name} must be regularly spaced and strictly monotonic")
    if abs(step) < 1 / 120 - 1e-9:
        raise SpecError(
            f"land_fraction: {name} spacing {abs(step)} is finer than the 30-arc-second mask"
        )
    # rounding keeps the lru_cache key stable against float noise in recomputed grids
    return round(float(arr[0]), 9), round(step, 12), int(arr.size)


@lru_cache(maxsize=8)
def _ocean_fraction_cached(
    path: str, lat_grid: tuple[float, float, int], lon_grid: tuple[float, float, int]
) -> np.ndarray:
    out = _ocean_fraction(path, lat_grid, lon_grid)
    out.flags.writeable = False  # shared by every caller of the cache
    return out


def _ocean_fraction(
    path: str, lat_grid: tuple[float, float, int], lon_grid: tuple[float, float, int]
) -> np.ndarray:
    """Area-weighted ocean fraction (nlat, nlon) float64, streaming the mask by row bands."""
    with zipfile.ZipFile(path) as archive:
        pix_lat = np.load(archive.open("lat.npy"))
        pix_lon = np.load(archive.open("lon.npy"))
        # pixel centres: the stored values are the pixel edges nearest to (90, -180)
        lat_centres = pix_lat + (pix_lat[1] - pix_lat[0]) / 2
        lon_centres = pix_lon + (pix_lon[1] - pix_lon[0]) / 2
        row_cell = _cell_index(lat_centres, *lat_grid, periodic=False)
        col_cell = _cell_index(lon_centres, *lon_grid, periodic=True)
        n_lat, n_lon = lat_grid[2], lon_grid[2]
        cols_per_cell = np.bincount(col_cell[col_cell >= 0], minlength=n_lon)
        if (cols_per_cell == 0).any() or (
            np.bincount(row_cell[row_cell >= 0], minlength=n_lat) == 0
        ).any():
            raise SpecError("land_fraction: some cells hold no mask pixel; use a coarser grid")
        grouping = _column_grouping(col_cell)
        weights = np.cos(np.deg2rad(lat_centres))

        ocean = np.zeros((n_lat, n_lon))
        weight_sum = np.zeros(n_lat)
        with archive.open("mask.npy") as stream:
            n_rows, n_cols = _npy_bool_shape(stream)
            for start in range(0, n_rows, _ROWS_PER_BAND):
                rows = min(_ROWS_PER_BAND, n_rows - start)
                band = np.frombuffer(_read_exact(stream, rows * n_cols), dtype=bool)
                cell = row_cell[start : start + rows]
                keep = cell >= 0
                if not keep.any():
                    continue
                counts = _count_by_cell(band.reshape(rows, n_cols)[keep], grouping)
                w = weights[start : start + rows][keep]
                np.add.at(ocean, cell[keep], counts * w[:, None])
                np.add.at(weight_sum, cell[keep], w)
    return ocean / (weight_sum[:, None] * cols_per_cell[None, :])


def _cell_index(
    centres: np.ndarray, first: float, step: float, size: int, *, periodic: bool
) -> np.ndarray:
    """Index of the target cell holding each pixel centre, -1 outside the grid."""
    offset = centres - (first - step / 2)
    if periodic:
        # longitudes: measure every pixel in the direction of the axis, modulo 360
        offset = np.mod(offset * np.sign(step), 360.0)
        idx = np.floor(offset / abs(step))
    else:
        idx = np.floor(offset / step)
    idx = idx.astype(np.int64)
    idx[(idx < 0) | (idx >= size)] = -1
    return idx


def _column_grouping(col_cell: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Columns to take (None: all, in order), group starts and the cell of each group."""
    valid = np.flatnonzero(col_cell >= 0)
    order = valid[np.argsort(col_cell[valid], kind="stable")]
    cells = col_cell[order]
    starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
    take = None if np.array_equal(order, np.arange(col_cell.size)) else order
    return take, starts, cells[starts]


def _count_by_cell(
    band: np.ndarray, grouping: tuple[np.ndarray | None, np.ndarray, np.ndarray]
) -> np.ndarray:
    """Ocean pixels per (row, target lon cell) for one band of mask rows."""
    take, starts, cells = grouping
    if take is not None:
        band = band[:, take]
    sums = np.add.reduceat(band.view(np.uint8), starts, axis=1, dtype=np.int32)
    out = np.zeros((band.shape[0], int(cells.max()) + 1), dtype=np.int32)
    out[:, cells] = sums
    return out


def _npy_bool_shape(stream) -> tuple[int, int]:
    """Read the .npy header of the streamed mask and check it is a C-ordered 2-D bool."""
    major, minor = np.lib.format.read_magic(stream)
    if (major, minor) == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if fortran or dtype != np.dtype(bool) or len(shape) != 2:
        raise MissingExtraError(
            f"{_NPZ_NAME} has an unexpected layout ({dtype}, {shape}); "
            "reinstall it with pip install 'cube-engine[landmask]'"
        )
    return int(shape[0]), int(shape[1])


def _read_exact(stream, n: int) -> bytes:
    buf = stream.read(n)
    if len(buf) != n:
        raise MissingExtraError(
            f"{_NPZ_NAME} is truncated; reinstall it with pip install 'cube-engine[landmask]'"
        )
    return buf
