"""Dimension names: the canonical ones, defined once, and how to find them in any cube.

Cubes opened through a catalog are normalised to the canonical names where an alias is
unambiguous (``latitude`` -> ``lat``). Cubes built by hand keep their names: every op finds
its dims with :func:`cube_dims`, by name or by CF attributes (``axis``, ``standard_name``,
``units``) of the dimension coordinate, so ``COADSX``/``COADSY``, ``x``/``y`` or
``rlat``/``rlon`` work as well as ``lat``/``lon``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import CubeError

__all__ = [
    "TIME",
    "LAT",
    "LON",
    "SPATIAL",
    "ALIASES",
    "CubeDims",
    "cube_dims",
    "resolve_dim",
    "resolve_keys",
    "horizontal_dims",
]

TIME = "time"
LAT = "lat"
LON = "lon"
SPATIAL = (LAT, LON)

#: Names seen in the wild that are renamed to the canonical ones.
ALIASES = {
    "latitude": LAT,
    "y_lat": LAT,
    "coadsy": LAT,
    "longitude": LON,
    "coadsx": LON,
    "t": TIME,
}

# role -> (names, CF axis, standard_names, units)
_Y_NAMES = ("lat", "latitude", "y", "rlat", "nav_lat", "yc", "j", "south_north", "coadsy",
            "y_lat", "northing")
_X_NAMES = ("lon", "longitude", "x", "rlon", "nav_lon", "xc", "i", "west_east", "coadsx",
            "x_lon", "easting")
_T_NAMES = ("time", "t", "valid_time", "date", "month", "step")
_Z_NAMES = ("depth", "level", "lev", "height", "plev", "pressure", "isobaricinhpa", "z",
            "altitude", "deptht", "depthu", "depthv", "model_level_number", "sigma")
_Y_STD = ("latitude", "grid_latitude", "projection_y_coordinate")
_X_STD = ("longitude", "grid_longitude", "projection_x_coordinate")
_Z_STD = ("depth", "height", "altitude", "air_pressure", "model_level_number",
          "atmosphere_hybrid_sigma_pressure_coordinate", "atmosphere_sigma_coordinate",
          "ocean_sigma_coordinate")
_Y_UNITS = ("degrees_north", "degree_north", "degree_n", "degrees_n", "degreen", "degreesn")
_X_UNITS = ("degrees_east", "degree_east", "degree_e", "degrees_e", "degreee", "degreese")


@dataclass(frozen=True)
class CubeDims:
    """The roles of a cube's dimensions; ``None`` where the cube has no such dim."""

    y: str | None
    x: str | None
    time: str | None = None
    vertical: str | None = None

    @property
    def horizontal(self) -> tuple[str, str]:
        """``(y, x)``; raises :class:`CubeError` when either cannot be found."""
        if self.y is None or self.x is None:
            missing = "y (latitude)" if self.y is None else "x (longitude)"
            raise CubeError(f"cannot tell which dimension is {missing}: give the dimension "
                            "coordinate CF attributes (axis, standard_name or units) or name "
                            "the dims in the job (input.dims: {y: NAME, x: NAME})")
        return self.y, self.x


def _attrs(obj: Any, dim: Hashable) -> Mapping[str, Any]:
    coords = getattr(obj, "coords", {})
    if dim in coords:
        return coords[dim].attrs
    return {}


def _role(obj: Any, dim: Hashable) -> str | None:
    name = str(dim).lower()
    attrs = _attrs(obj, dim)
    axis = str(attrs.get("axis", "")).upper()
    std = str(attrs.get("standard_name", "")).lower()
    units = str(attrs.get("units", "")).lower().replace(" ", "_")
    positive = str(attrs.get("positive", "")).lower()
    if axis in ("Y", "X", "T", "Z"):
        return axis.lower() if axis != "T" else "time"
    if std in _Y_STD or units in _Y_UNITS:
        return "y"
    if std in _X_STD or units in _X_UNITS:
        return "x"
    if std == "time" or " since " in str(attrs.get("units", "")):
        return "time"
    if std in _Z_STD or positive in ("up", "down"):
        return "z"
    if name in _Y_NAMES:
        return "y"
    if name in _X_NAMES:
        return "x"
    if name in _T_NAMES:
        return "time"
    if name in _Z_NAMES:
        return "z"
    return None


def cube_dims(obj: Any, dims: Mapping[str, str | None] | None = None) -> CubeDims:
    """Find the y, x, time and vertical dims of ``obj`` (a Dataset or DataArray).

    Explicit ``dims`` (keys ``y``, ``x``, ``time``, ``vertical``) win; the rest is found by
    CF attributes of the dimension coordinates, then by name. Two dims claiming one role
    is an error that asks for explicit names.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"sst": (("T", "COADSY", "COADSX"), np.zeros((1, 2, 3)))},
    ...                 coords={"COADSY": ("COADSY", [0.0, 1.0], {"units": "degrees_north"}),
    ...                         "COADSX": ("COADSX", [0.0, 1.0, 2.0], {"units": "degrees_east"})})
    >>> cube_dims(ds)
    CubeDims(y='COADSY', x='COADSX', time='T', vertical=None)
    """
    given = dict(dims or {})
    unknown = [k for k in given if k not in ("y", "x", "time", "vertical")]
    if unknown:
        raise CubeError(f"dims keys {unknown}: use y, x, time, vertical")
    all_dims = [str(d) for d in obj.dims]
    for role, name in given.items():
        if name is not None and name not in all_dims:
            raise CubeError(f"dims.{role}={name!r} is not a dimension of the cube; dims: "
                            + ", ".join(all_dims))
    found: dict[str, list[str]] = {"y": [], "x": [], "time": [], "z": []}
    taken = {v for v in given.values() if v}
    for d in all_dims:
        if d in taken:
            continue
        found_role = _role(obj, d)
        if found_role is not None:
            found[found_role].append(d)
    out: dict[str, str | None] = {}
    for role, key in (("y", "y"), ("x", "x"), ("time", "time"), ("z", "vertical")):
        if key in given:
            out[key] = given[key]
            continue
        cands = found[role]
        if len(cands) > 1:
            raise CubeError(f"dims {cands} could each be the {key} dimension: name it in the "
                            f"job (input.dims: {{{key}: NAME}})")
        out[key] = cands[0] if cands else None
    return CubeDims(y=out["y"], x=out["x"], time=out["time"], vertical=out["vertical"])


def horizontal_dims(obj: Any, dims: Mapping[str, str | None] | None = None) -> tuple[str, str]:
    """``(y, x)`` dims of ``obj``; see :func:`cube_dims`."""
    return cube_dims(obj, dims).horizontal


_ROLE_OF_ALIAS = {
    "lat": "y", "latitude": "y", "y": "y",
    "lon": "x", "longitude": "x", "x": "x",
    "time": "time", "t": "time",
    "level": "vertical", "lev": "vertical", "depth": "vertical", "z": "vertical",
    "height": "vertical", "plev": "vertical", "vertical": "vertical",
}


def resolve_dim(obj: Any, name: str, what: str = "dimension") -> str:
    """The dim of ``obj`` that ``name`` means: itself, or the dim with the same role as an
    alias (``lat``/``latitude``/``y`` -> the cube's y dim, ``lon``/... -> x, ``t`` -> time).

    Raises :class:`CubeError` naming ``what`` and the cube's dims when nothing matches.
    """
    all_dims = [str(d) for d in obj.dims]
    if name in all_dims:
        return name
    low = str(name).lower()
    for d in all_dims:
        if d.lower() == low:
            return d
    role = _ROLE_OF_ALIAS.get(low) or _ROLE_OF_ALIAS.get(ALIASES.get(low, ""), None)
    if role is not None:
        try:
            found = getattr(cube_dims(obj), role)
        except CubeError:
            found = None
        if found is not None:
            return found
    raise CubeError(f"{what} {name!r} is not a dimension of the cube; dims: "
                    + ", ".join(all_dims))


def resolve_keys(obj: Any, mapping: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``mapping`` with every key replaced by :func:`resolve_dim`; two keys meaning the same
    dim are an error."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dim = resolve_dim(obj, str(key), f"{what} dimension")
        if dim in out:
            raise CubeError(f"{what} names dimension {dim!r} twice (as {key!r} too)")
        out[dim] = value
    return out
