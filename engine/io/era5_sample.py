"""The second real cube: ECMWF's ERA5 ensemble sample on pressure levels, as Zarr v3.

cfgrib's source distribution on PyPI ships ``tests/sample-data/era5-levels-members.nc``
(netCDF-4, made by cfgrib from ``era5-levels-members.grib``): 10 ensemble members
(``number``) x 4 analysis times x 2 pressure levels (``isobaricInhPa`` 850, 500) x
61 ``latitude`` x 120 ``longitude`` on a 3-degree grid, with geopotential ``z`` and
temperature ``t``. :func:`convert_era5_sample` turns it into a small float32 Zarr v3
store with CF attributes and provenance. Unlike the demo cube, the dims keep their
original names and order (latitude runs north to south, longitude 0..357), so the
engine's dims-by-role code is exercised by real data. The store is committed under
``catalogs/data/``; this module is how it was made and how to make it again::

    pip download --no-deps --no-binary :all: cfgrib==0.9.15.1 -d /tmp/cfgrib
    python -m engine.io.era5_sample /tmp/cfgrib/cfgrib-0.9.15.1.tar.gz \\
        catalogs/data/era5_levels_members.zarr --overwrite

``SRC`` is the sdist itself or the extracted ``.nc`` file. Reading netCDF-4 needs
``h5netcdf`` and ``h5py`` (both in the ``test`` extra).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import email.parser
import os
import re
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from engine._version import code_version
from engine.errors import EngineError, SpecError, StoreExistsError
from engine.io.demo import _du, _same_conversion, _sha256, _write_staged

__all__ = [
    "DEFAULT_ERA5_DEST",
    "ERA5_MEMBER",
    "ERA5_CHUNKS",
    "ERA5_LICENSE",
    "era5_dataset",
    "convert_era5_sample",
    "main",
]

DEFAULT_ERA5_DEST = "catalogs/data/era5_levels_members.zarr"
#: Path of the sample inside cfgrib's sdist (below ``cfgrib-VERSION/``).
ERA5_MEMBER = "tests/sample-data/era5-levels-members.nc"
#: Storage chunks: two or more per dim (but the 2 levels), so chunk-aware code has work.
ERA5_CHUNKS = {"number": 5, "time": 2, "isobaricInhPa": 2, "latitude": 31, "longitude": 60}
#: Bump when the conversion changes, so an existing store is known to be stale.
CONVERTER_VERSION = 1
ERA5_LICENSE = (
    "ERA5, Copernicus Climate Change Service (C3S) / ECMWF: Licence to use Copernicus "
    "Products, https://apps.ecmwf.int/datasets/licences/copernicus/ (ERA5 is offered "
    "under CC-BY-4.0 on the Climate Data Store since 2024). Attribution: contains "
    "modified Copernicus Climate Change Service information 2017. The sample file itself "
    "carries no licence attribute; cfgrib (Apache-2.0) redistributes it as test data."
)
_DIMS = ("number", "time", "isobaricInhPa", "latitude", "longitude")
# name -> (units in UDUNITS spelling, standard_name, long_name)
_VARIABLES = {
    "z": ("m2 s-2", "geopotential", "geopotential"),
    "t": ("K", "air_temperature", "air temperature"),
}


def era5_dataset(src: str) -> xr.Dataset:
    """Read the ERA5 sample (the cfgrib sdist or its ``.nc`` file) and return it converted.

    Parameters
    ----------
    src
        ``cfgrib-VERSION.tar.gz`` from PyPI, or ``era5-levels-members.nc`` (extracted from
        it, in which case the cfgrib version is read from the ``PKG-INFO`` above it).

    Returns
    -------
    xarray.Dataset
        dims ``number`` 10, ``time`` 4, ``isobaricInhPa`` 2, ``latitude`` 61,
        ``longitude`` 120; float32 ``z`` and ``t`` with CF attributes; provenance in attrs.
    """
    if not os.path.isfile(src):
        raise SpecError(
            f"ERA5 sample not found: {src}; get it with pip download --no-deps "
            "--no-binary :all: cfgrib -d DIR and pass DIR/cfgrib-VERSION.tar.gz"
        )
    with tempfile.TemporaryDirectory(prefix="era5-") as tmp:
        nc, cfgrib_version = _netcdf_file(src, tmp)
        try:
            with xr.open_dataset(nc, engine="h5netcdf") as raw:
                ds = raw.load()
        except ImportError as err:
            raise SpecError(
                f"reading {ERA5_MEMBER} (netCDF-4) needs h5netcdf and h5py: "
                f"pip install h5netcdf h5py ({err})"
            ) from None
        nc_sha256 = _sha256(nc)
    ds = _check_and_trim(ds)
    ds = _cf_attributes(ds)
    ds.attrs = _provenance(src, nc_sha256, cfgrib_version, ds.attrs)
    return ds


def convert_era5_sample(
    src: str, dest: str = DEFAULT_ERA5_DEST, *, overwrite: bool = False
) -> str:
    """Convert the ERA5 sample to a Zarr v3 store at ``dest`` and return ``dest``.

    Chunked as :data:`ERA5_CHUNKS` with Blosc-zstd and consolidated metadata (about
    3 MB). An existing store made from the same ``.nc`` by the same converter version is
    left as it is; any other existing path raises
    :class:`~engine.errors.StoreExistsError` unless ``overwrite=True``. The new store is
    staged beside ``dest`` and moved into place only when complete.

    Examples
    --------
    >>> convert_era5_sample("/tmp/cfgrib/cfgrib-0.9.15.1.tar.gz", "/tmp/era5.zarr")
    ... # doctest: +SKIP
    '/tmp/era5.zarr'
    """
    ds = era5_dataset(src)
    if os.path.exists(dest) and not overwrite:
        if _same_conversion(dest, _fingerprint(ds.attrs)):
            return dest
        raise StoreExistsError(
            f"{dest} exists and was not made from this source by this converter; "
            "pass overwrite=True (--overwrite) to replace it"
        )
    return _write_staged(ds, dest, _encoding(ds), prefix=".era5-")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: ``python -m engine.io.era5_sample SRC [DEST] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.io.era5_sample",
        description="Convert cfgrib's ERA5 sample (era5-levels-members) into a Zarr v3 store.",
    )
    parser.add_argument("src", help="cfgrib sdist (cfgrib-VERSION.tar.gz) or the .nc file")
    parser.add_argument("dest", nargs="?", default=DEFAULT_ERA5_DEST, help="store to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    args = parser.parse_args(argv)
    try:
        dest = convert_era5_sample(args.src, args.dest, overwrite=args.overwrite)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"ERA5 sample store ready: {dest} ({_du(dest) / 1e6:.2f} MB)")
    return 0


def _netcdf_file(src: str, tmp: str) -> tuple[str, str]:
    """The ``.nc`` path to read and the cfgrib version it came with."""
    if tarfile.is_tarfile(src):
        with tarfile.open(src) as tar:
            names = tar.getnames()
            member = next((n for n in names if n.endswith("/" + ERA5_MEMBER)), None)
            info = next((n for n in names if n.count("/") == 1 and n.endswith("/PKG-INFO")), None)
            if member is None:
                raise SpecError(f"{src} holds no {ERA5_MEMBER}; pass a cfgrib sdist")
            version = _pkg_version(_read_member(tar, info).decode()) if info else ""
            path = os.path.join(tmp, "era5-levels-members.nc")
            with open(path, "wb") as out:
                out.write(_read_member(tar, member))
        return path, version or _version_from_path(src)
    return src, _version_near(src)


def _read_member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    if f is None:
        raise SpecError(f"{name} in the archive is not a regular file; pass a cfgrib sdist")
    with f:
        return f.read()


def _pkg_version(pkg_info: str) -> str:
    return str(email.parser.Parser().parsestr(pkg_info).get("Version", "")).strip()


def _version_from_path(path: str) -> str:
    found = re.findall(r"cfgrib-(\d+(?:\.\d+)+)", os.path.abspath(path))
    return found[-1] if found else "unknown"


def _version_near(nc: str) -> str:
    """cfgrib version of an extracted sdist: its PKG-INFO, found above the ``.nc`` file."""
    here = os.path.dirname(os.path.abspath(nc))
    for _ in range(4):
        info = os.path.join(here, "PKG-INFO")
        if os.path.isfile(info):
            with open(info, encoding="utf-8") as f:
                return _pkg_version(f.read()) or _version_from_path(nc)
        here = os.path.dirname(here)
    return _version_from_path(nc)


def _check_and_trim(ds: xr.Dataset) -> xr.Dataset:
    """Keep z and t on the original dims; drop the coords that repeat ``time``."""
    missing = [v for v in _VARIABLES if v not in ds.data_vars]
    if missing or tuple(ds["t"].dims) != _DIMS:
        raise SpecError(
            f"not the ERA5 levels/members sample: variables {sorted(map(str, ds.data_vars))}, "
            f"dims {tuple(ds.dims)}; expected z, t on {_DIMS}"
        )
    # analyses: valid_time == time and step == 0, so both are redundant with time
    if "valid_time" in ds.coords and not np.array_equal(ds["valid_time"].values, ds["time"].values):
        raise SpecError("valid_time differs from time: not an analysis; conversion not defined")
    if "step" in ds.coords and float(ds["step"]) != 0.0:
        raise SpecError(f"step is {float(ds['step'])} h, not 0: conversion not defined")
    ds = ds.drop_vars([c for c in ("valid_time", "step") if c in ds.coords])
    out = xr.Dataset(
        {name: ds[name].astype(np.float32) for name in _VARIABLES},
        coords={d: ds[d] for d in _DIMS},
    )
    out.attrs = dict(ds.attrs)
    return out


def _cf_attributes(ds: xr.Dataset) -> xr.Dataset:
    for name, (units, standard_name, long_name) in _VARIABLES.items():
        src = ds[name].attrs
        ds[name].attrs = {
            "standard_name": standard_name,
            "long_name": long_name,
            "units": units,
            "source_units": src.get("GRIB_units", src.get("units", "")),
            "grib_param_id": int(src.get("GRIB_paramId", 0)),
            "grib_short_name": str(src.get("GRIB_shortName", name)),
        }
        ds[name].encoding = {}
    ds["number"].attrs = {
        "standard_name": "realization",
        "long_name": "ensemble member (ERA5 ensemble of data assimilations)",
        "units": "1",
    }
    ds["time"].attrs = {
        "standard_name": "time",
        "long_name": "analysis time",
        "axis": "T",
        "comment": "source: forecast_reference_time with step 0 (valid_time equal to it)",
    }
    ds["isobaricInhPa"].attrs = {
        "standard_name": "air_pressure",
        "long_name": "pressure level",
        "units": "hPa",
        "positive": "down",
        "axis": "Z",
    }
    ds["latitude"].attrs = {
        "standard_name": "latitude",
        "long_name": "latitude",
        "units": "degrees_north",
        "axis": "Y",
        "comment": "stored north to south, as in the source",
    }
    ds["longitude"].attrs = {
        "standard_name": "longitude",
        "long_name": "longitude",
        "units": "degrees_east",
        "axis": "X",
        "comment": "0..357, as in the source",
    }
    for d in _DIMS:
        ds[d].encoding = {}
    return ds


def _provenance(
    src: str, nc_sha256: str, cfgrib_version: str, source_attrs: Mapping[str, object]
) -> dict[str, object]:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    history = str(source_attrs.get("history", ""))
    steps = (
        "z and t cast to float32, units spelled as UDUNITS, CF axis attributes added, "
        "valid_time and step (equal to time, and 0) dropped, dims and order kept"
    )
    return {
        "title": "ERA5 ensemble of data assimilations on 850 and 500 hPa, 3-degree sample",
        "summary": (
            "Geopotential (z) and temperature (t) of the 10 ERA5 ensemble members at "
            "00 and 12 UTC on 2017-01-01 and 2017-01-02, on 850 and 500 hPa, global "
            "3-degree grid: the sample ECMWF's cfgrib ships for its tests."
        ),
        "Conventions": "CF-1.8",
        "institution": str(source_attrs.get("institution", "ECMWF")),
        "source": "ERA5 reanalysis (ECMWF, Copernicus Climate Change Service)",
        "license": ERA5_LICENSE,
        "history": f"{history}\n{now}: engine.io.era5_sample.convert_era5_sample: {steps}",
        "source_file": ERA5_MEMBER,
        **_archive(src),
        "source_package": f"cfgrib {cfgrib_version} (PyPI sdist)",
        "source_url": "https://pypi.org/project/cfgrib/" + cfgrib_version + "/",
        "cfgrib_version": cfgrib_version,
        "converter": "engine.io.era5_sample.convert_era5_sample",
        **_fingerprint({"source_sha256": nc_sha256}),
        "engine_version": code_version(),
        "date_created": now,
    }


def _archive(src: str) -> dict[str, str]:
    """Name and sha256 of the sdist when the conversion read it (not an extracted file)."""
    if not tarfile.is_tarfile(src):
        return {}
    return {"source_archive": os.path.basename(src), "source_archive_sha256": _sha256(src)}


def _fingerprint(attrs: Mapping[str, object]) -> dict[str, object]:
    """The attributes that decide whether an existing store is this conversion."""
    return {"source_sha256": attrs["source_sha256"], "converter_version": CONVERTER_VERSION}


def _encoding(ds: xr.Dataset) -> dict[str, dict]:
    from zarr.codecs import BloscCodec

    compressor = BloscCodec(cname="zstd", clevel=7, shuffle="shuffle")
    encoding: dict[str, dict] = {}
    for key, var in ds.variables.items():
        name = str(key)
        if var.ndim <= 1:  # coordinates: one chunk each
            encoding[name] = {"chunks": var.shape}
            if name == "time":
                encoding[name].update(units="hours since 2017-01-01", dtype="i4")
            continue
        encoding[name] = {
            "chunks": tuple(ERA5_CHUNKS[str(d)] for d in var.dims),
            "compressors": (compressor,),
        }
    return encoding


if __name__ == "__main__":
    sys.exit(main())
