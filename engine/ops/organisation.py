"""Cloud-organisation metrics as a cube operator: per tile and time step, lazily.

:func:`organisation_metrics` thresholds a variable into a cloud mask, cuts the horizontal
plane into tiles of ``tile`` pixels (or km), and applies the kernels of
:mod:`engine.kernels.organisation` to every tile of every time step (and any other dim)
with :func:`xarray.apply_ufunc` (``dask="parallelized"``): one task per input chunk, each
looping over the tiles it holds. The result is a Dataset with one variable per metric,
dims ``(..., tile_y, tile_x)``, the tile centres as coordinates, lengths in km.

Pixel sizes come from the cube's horizontal coordinates: latitude/longitude in degrees
(``dy = R dlat``, ``dx = R dlon`` times the mean of ``cos(latitude)`` over the tile's
rows, R = 6371.0088 km) or projected coordinates in m or km (any other unit is one line
asking for ``dx``/``dy``);
``dx``/``dy`` in km override them. Rows and columns left over after the last whole tile
are dropped (``engine_tiles_trimmed`` says how many).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from engine.dims import CubeDims, cube_dims, resolve_keys
from engine.errors import CubeError, SpecError
from engine.kernels import organisation as K

__all__ = ["organisation_metrics", "pixel_size_km", "tile_pixels", "EARTH_RADIUS_KM",
           "METRIC_NAMES"]

EARTH_RADIUS_KM = 6371.0088

#: Every metric, in the order of :data:`engine.kernels.organisation.METRICS`.
METRIC_NAMES = K.METRICS

_LONG_NAMES = {
    "cloud_fraction": "cloud fraction of the tile",
    "object_count": "number of cloud objects",
    "mean_length": "mean object length sqrt(area)",
    "max_length": "largest object length sqrt(area)",
    "mean_perimeter": "mean object perimeter",
    "size_exponent": "power-law exponent of the object size distribution (ML, x_min)",
    "spectral_length": "spectral length scale (power-weighted mean wavelength of the mask)",
    "cop": "convective organisation potential (White et al. 2018)",
    "scai": "simple convective aggregation index (Tobin et al. 2012)",
    "iorg": "organisation index Iorg (Tompkins and Semie 2017)",
    "fractal_dimension": "perimeter-area fractal dimension",
    "open_sky": "mean open-sky area fraction (Antonissen 2019)",
    "open_sky_max": "largest open-sky area fraction (Antonissen 2019)",
    "orientation": "directional alignment sqrt(1 - lambda_min / lambda_max)",
    "orientation_angle": "principal-axis angle from +x towards +y (increasing index)",
}

_DEG = ("degrees_north", "degree_north", "degrees_n", "degree_n", "degrees_east",
        "degree_east", "degrees_e", "degree_e", "degrees", "degree")
_GEO_NAMES = ("lat", "latitude", "lon", "longitude")


def _step(c: xr.DataArray, dim: str) -> float:
    v = np.asarray(c.values, dtype=float)
    if v.size < 2:
        raise CubeError(f"dimension {dim!r} has fewer than two points: cannot tell its "
                        "spacing; give dx and dy (km)")
    d = np.abs(np.diff(v))
    step = float(np.median(d))
    if not step > 0 or np.abs(d - step).max() > 0.01 * step:
        raise CubeError(f"coordinate {dim!r} is not evenly spaced (steps {d.min():g} to "
                        f"{d.max():g}); regrid, or give dx and dy (km)")
    return step


def _is_geographic(c: xr.DataArray, dim: str) -> bool:
    units = str(c.attrs.get("units", "")).lower().replace(" ", "_")
    return units in _DEG or (not units and dim.lower() in _GEO_NAMES)


def pixel_size_km(obj: xr.DataArray | xr.Dataset, y: str, x: str) -> tuple[np.ndarray, float]:
    """``(dx per row, dy)`` in km from the coordinates of dims ``y`` and ``x``.

    Degrees: ``dy = R dlat``, ``dx = R dlon cos(lat)`` per row (``R`` =
    :data:`EARTH_RADIUS_KM`); metres or km: constant. Any other unit raises
    :class:`CubeError`.

    >>> da = xr.DataArray(np.zeros((3, 4)), dims=("lat", "lon"),
    ...                   coords={"lat": [0.0, 1.0, 2.0],
    ...                           "lon": [0.0, 1.0, 2.0, 3.0]})
    >>> dxs, dy = pixel_size_km(da, "lat", "lon")
    >>> round(dy, 3), round(float(dxs[0]), 3)
    (111.195, 111.195)
    """
    for d in (y, x):
        if d not in obj.coords:
            raise CubeError(f"dimension {d!r} has no coordinate: cannot tell the pixel size; "
                            "give dx and dy (km)")
    cy, cx = obj[y], obj[x]
    geo_y, geo_x = _is_geographic(cy, y), _is_geographic(cx, x)
    if geo_y and geo_x:
        dlat, dlon = _step(cy, y), _step(cx, x)
        lat = np.asarray(cy.values, dtype=float)
        dy = EARTH_RADIUS_KM * np.radians(dlat)
        return EARTH_RADIUS_KM * np.radians(dlon) * np.cos(np.radians(lat)), float(dy)
    scale = []
    for c, d in ((cy, y), (cx, x)):
        units = str(c.attrs.get("units", "")).lower()
        if units in ("m", "metre", "metres", "meter", "meters"):
            scale.append(1e-3)
        elif units in ("km", "kilometre", "kilometres", "kilometer", "kilometers"):
            scale.append(1.0)
        else:
            raise CubeError(f"coordinate {d!r} has units {units or 'none'!r}: expected "
                            "degrees, m or km; give dx and dy (km)")
    dy = _step(cy, y) * scale[0]
    dx = _step(cx, x) * scale[1]
    return np.full(obj.sizes[y], dx), float(dy)


def tile_pixels(size: int | str, spacing_km: float, dim: str) -> int:
    """Pixels per tile along ``dim``: an int is pixels, ``"100km"``/``"5000m"`` a length
    turned into the nearest whole number of pixels of ``spacing_km``.

    >>> tile_pixels(8, 2.0, "x"), tile_pixels("100km", 2.0, "x"), tile_pixels("9 km", 2.0, "y")
    (8, 50, 4)
    """
    if isinstance(size, bool):
        raise SpecError(f"tile.{dim}: give a number of pixels or a length like '100km'")
    if isinstance(size, int | np.integer):
        n = int(size)
    elif isinstance(size, str):
        s = size.strip().lower().replace(" ", "")
        try:
            if s.endswith("km"):
                km = float(s[:-2])
            elif s.endswith("m"):
                km = float(s[:-1]) / 1000.0
            else:
                n = int(s)
                km = float("nan")
        except ValueError:
            raise SpecError(f"tile.{dim}={size!r}: give pixels (32) or a length ('100km', "
                            "'5000m')") from None
        if s.endswith("m"):
            n = int(round(km / spacing_km))
    else:
        raise SpecError(f"tile.{dim}={size!r}: give pixels (32) or a length ('100km')")
    if n < 2:
        raise SpecError(f"tile.{dim}={size!r} is {n} pixel(s); a tile needs at least 2 per "
                        "side")
    return n


def _kernel(block: np.ndarray, dx: np.ndarray, dy: np.ndarray, *, metrics: Sequence[str],
            connectivity: K.Connectivity, min_objects: int) -> np.ndarray:
    """Metrics of every tile in ``block`` (``(..., py, px)``, values 1 cloud, 0 clear, NaN
    missing): ``(..., n_metrics)``; a tile with a missing pixel gives NaN."""
    lead = block.shape[:-2]
    dxs = np.broadcast_to(np.asarray(dx, float), lead)
    dys = np.broadcast_to(np.asarray(dy, float), lead)
    out = np.full((*lead, len(metrics)), np.nan)
    for idx in np.ndindex(*lead):
        tile = block[idx]
        if np.isnan(tile).any():
            continue
        out[idx] = K.tile_metrics(tile > 0.5, float(dxs[idx]), float(dys[idx]), metrics,
                                  connectivity=connectivity, min_objects=min_objects)
    return out


def organisation_metrics(
    obj: xr.DataArray | xr.Dataset,
    variable: str | None = None,
    *,
    threshold: float,
    above: bool = True,
    tile: Mapping[Any, int | str],
    metrics: Sequence[str] | None = None,
    dx: float | None = None,
    dy: float | None = None,
    connectivity: K.Connectivity = 4,
    min_objects: int = 50,
    dims: Mapping[str, str | None] | None = None,
) -> xr.Dataset:
    """Cloud-organisation metrics per tile and time step, lazily.

    Parameters
    ----------
    obj
        A DataArray, or a Dataset with ``variable``.
    threshold, above
        Cloud where ``value > threshold`` (``above=True``) or ``value < threshold``
        (``above=False``: cold brightness temperatures). A tile with a missing value
        (NaN) gives NaN for every metric.
    tile
        Tile size per horizontal dim (``lat``/``lon``/``y``/``x`` aliases work): pixels
        (``{"lat": 32, "lon": 48}``) or lengths (``{"y": "100km", "x": "150km"}``).
    metrics
        Names from :data:`METRIC_NAMES` (default: all).
    dx, dy
        Pixel sizes in km; default from the coordinates (:func:`pixel_size_km`).
    connectivity, min_objects
        Object labelling (4 or 8 neighbours) and the fewest objects for
        ``size_exponent``.

    Returns
    -------
    xarray.Dataset
        One variable per metric, dims ``(<other dims>, tile_y, tile_x)``, the tile-centre
        values of the horizontal coordinates (and of 2-D coordinates such as ``lat`` and
        ``lon`` on projected grids) as coordinates; ``units`` per variable (lengths in km).
        Dask-backed when ``obj`` is.

    Examples
    --------
    >>> m = np.zeros((1, 8, 12)); m[0, 1:3, 1:4] = 1.0; m[0, 5:7, 7:11] = 1.0
    >>> da = xr.DataArray(m, dims=("time", "y", "x"),
    ...                   coords={"y": ("y", np.arange(8) * 2000.0, {"units": "m"}),
    ...                           "x": ("x", np.arange(12) * 1000.0, {"units": "m"})})
    >>> out = organisation_metrics(da, threshold=0.5, tile={"y": 8, "x": 6},
    ...                            metrics=["object_count", "mean_perimeter"])
    >>> out.object_count.values.tolist(), out.mean_perimeter.values.tolist()
    ([[[1.0, 1.0]]], [[[14.0, 16.0]]])
    >>> out.mean_perimeter.attrs["units"], out.x.values.tolist()
    ('km', [2500.0, 8500.0])
    """
    if isinstance(obj, xr.Dataset):
        if variable is None:
            if len(obj.data_vars) != 1:
                raise CubeError("the cube has several variables: name the one to threshold "
                                f"(variable=...; one of {', '.join(map(str, obj.data_vars))})")
            variable = str(next(iter(obj.data_vars)))
        if variable not in obj.data_vars:
            raise CubeError(f"variable {variable!r} is not in the cube (variables: "
                            f"{', '.join(map(str, obj.data_vars))})")
        da = obj[variable]
    else:
        da = obj
    names = list(METRIC_NAMES if metrics is None else metrics)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown or not names:
        raise SpecError(f"unknown metrics {unknown or '[]'}: choose from "
                        f"{', '.join(METRIC_NAMES)}")
    if connectivity not in (4, 8):
        raise SpecError(f"connectivity must be 4 or 8, got {connectivity!r}")
    cd: CubeDims = cube_dims(da, dims)
    y, x = cd.horizontal
    sizes = resolve_keys(da, {str(k): v for k, v in tile.items()}, "tile")
    if set(sizes) != {y, x}:
        raise SpecError(f"tile must give both horizontal dims {y!r} and {x!r}, got "
                        f"{list(tile)}")
    if dx is None or dy is None:
        dxs_row, dy_c = pixel_size_km(da, y, x)
    if dx is not None:
        dxs_row = np.full(da.sizes[y], float(dx))
    if dy is not None:
        dy_c = float(dy)
    ty = tile_pixels(sizes[y], dy_c, "y")
    tx = tile_pixels(sizes[x], float(np.median(dxs_row)), "x")
    ny, nx = da.sizes[y], da.sizes[x]
    if ty > ny or tx > nx:
        raise SpecError(f"tile {ty} x {tx} pixels is larger than the cube's {y} x {x} = "
                        f"{ny} x {nx}; use a smaller tile")
    n_ty, n_tx = ny // ty, nx // tx
    trimmed = {y: ny - n_ty * ty, x: nx - n_tx * tx}

    # 1 cloud, 0 clear, NaN missing: the mask keeps the input's missing values
    cloud = (da > threshold) if above else (da < threshold)
    mask = cloud.astype(np.float32).where(da.notnull())
    mask = mask.isel({y: slice(0, n_ty * ty), x: slice(0, n_tx * tx)})
    aux = {k: v for k, v in mask.coords.items() if set(v.dims) == {y, x}}
    # coordinates on the pixel grid do not survive tiling (2-D ones come back as centres)
    mask = mask.drop_vars([k for k in mask.coords
                           if k not in mask.dims and set(mask[k].dims) & {y, x}])
    blocks = mask.coarsen({y: ty, x: tx}).construct({y: ("tile_y", "py"),
                                                    x: ("tile_x", "px")})
    if blocks.chunks is not None:
        blocks = blocks.chunk({"py": -1, "px": -1})
    # one dx per row of tiles: the mean pixel width over its rows (cos-latitude)
    dx_tile = np.asarray(dxs_row[: n_ty * ty], float).reshape(n_ty, ty).mean(axis=1)
    dx_da = xr.DataArray(dx_tile, dims=("tile_y",))
    dy_da = xr.DataArray(np.float64(dy_c))
    out = xr.apply_ufunc(
        _kernel, blocks, dx_da, dy_da,
        input_core_dims=[["py", "px"], [], []],
        output_core_dims=[["metric"]],
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"metric": len(names)}},
        kwargs={"metrics": tuple(names), "connectivity": connectivity,
                "min_objects": min_objects},
    )
    def centre(d: str, n: int, t: int) -> np.ndarray:
        if d not in da.coords:
            return np.arange(n)
        return np.asarray(da[d].values[: n * t]).reshape(n, t).mean(axis=1)

    centres: dict[str, tuple[Any, Any]] = {y: ("tile_y", centre(y, n_ty, ty)),
                                           x: ("tile_x", centre(x, n_tx, tx))}
    for k, c in aux.items():  # 2-D coordinates (lat, lon of a projected grid), lazily
        mean = c.transpose(y, x).coarsen({y: ty, x: tx}).mean()
        centres[str(k)] = (("tile_y", "tile_x"), mean.data)
    ds = xr.Dataset()
    for i, name in enumerate(names):
        unit = K.UNITS[name]
        v = out.isel(metric=i, drop=True)
        v.attrs = {"long_name": _LONG_NAMES[name], "units": "km" if unit == "L" else unit}
        ds[name] = v
    for k, (d, vals) in centres.items():
        attrs = dict(da[k].attrs) if k in da.coords else {}
        ds = ds.assign_coords({k: (d, vals, attrs)})
    ds["tile_dx"] = xr.DataArray(dx_tile, dims=("tile_y",),
                                 attrs={"long_name": "pixel size along x", "units": "km"})
    ds["tile_dy"] = xr.DataArray(np.float64(dy_c),
                                 attrs={"long_name": "pixel size along y", "units": "km"})
    ds.attrs.update({
        "engine_mask": f"{da.name or 'value'} {'>' if above else '<'} {threshold:g}",
        "engine_tile_pixels": [ty, tx],
        "engine_tile_km": [round(ty * dy_c, 6), round(float(tx * np.median(dx_tile)), 6)],
        "engine_tiles_trimmed": f"{trimmed[y]} rows, {trimmed[x]} columns",
        "engine_connectivity": connectivity,
        "engine_horizontal_dims": [y, x],
    })
    return ds
