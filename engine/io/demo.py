"""The real demo cube: the COADS 2-degree monthly climatology, converted to Zarr v3.

Debian's ``ferret-datasets`` package ships ``coads_climatology.cdf`` (netCDF-3, NOAA
PMEL Ferret demo data). :func:`convert_coads` turns it into a CF-1.8 Zarr v3 store with
canonical dims, longitudes in [-180, 180), NaN for missing values, an ocean mask from
``global-land-mask`` and provenance attributes. The store is committed under
``catalogs/data/``, so the demo needs neither Debian nor the land-mask package; this
module is how it was made and how to make it again::

    python -m engine.io.demo [--src PATH] [--dest PATH] [--overwrite]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from engine._version import code_version
from engine.dims import ALIASES, LAT, LON, TIME
from engine.errors import EngineError, SpecError, StoreExistsError

__all__ = [
    "DEFAULT_COADS_PATH",
    "DEFAULT_COADS_DEST",
    "COADS_CHUNKS",
    "coads_dataset",
    "convert_coads",
    "main",
]

DEFAULT_COADS_PATH = "/usr/share/ferret-vis/data/coads_climatology.cdf"
DEFAULT_COADS_DEST = "catalogs/data/coads_climatology.zarr"
#: Storage chunks: several per dim so that split and chunking tests have work to do.
COADS_CHUNKS = {TIME: 3, LAT: 45, LON: 90}
#: Bump when the conversion changes, so an existing store is known to be stale.
CONVERTER_VERSION = 1
NOMINAL_YEAR = 2000  # a leap year, like the year 0 of the source's time axis

# name -> (units, standard_name) with units normalised to UDUNITS/CF spellings
_VARIABLES = {
    "SST": ("degC", "sea_surface_temperature"),
    "AIRT": ("degC", "air_temperature"),
    "SPEH": ("g kg-1", "specific_humidity"),
    "WSPD": ("m s-1", "wind_speed"),
    "UWND": ("m s-1", "eastward_wind"),
    "VWND": ("m s-1", "northward_wind"),
    "SLP": ("hPa", "air_pressure_at_mean_sea_level"),
}


def coads_dataset(src: str = DEFAULT_COADS_PATH, *, land_mask: bool = True) -> xr.Dataset:
    """Read ``coads_climatology.cdf`` and return the converted, in-memory Dataset.

    Parameters
    ----------
    src
        Path of the netCDF-3 file from Debian's ``ferret-datasets``.
    land_mask
        Add ``ocean_mask`` (int8, 1 = ocean) and ``ocean_fraction`` from global-land-mask.

    Returns
    -------
    xarray.Dataset
        dims ``time`` 12, ``lat`` 90, ``lon`` 180; seven float32 variables with NaN gaps.
    """
    if not os.path.isfile(src):
        raise SpecError(
            f"COADS source not found: {src}; install it with "
            "apt-get install ferret-datasets, or pass --src PATH"
        )
    with xr.open_dataset(src, engine="scipy", decode_times=False) as raw:
        ds = raw.load()
    ds = _canonical_dims(ds)
    ds = _wrap_longitudes(ds)
    ds = _climatological_time(ds)
    ds = _cf_variables(ds)
    if land_mask:
        ds = _add_ocean_mask(ds)
    ds.attrs = _provenance(src, ds.attrs.get("history", ""), land_mask)
    return ds


def convert_coads(
    src: str = DEFAULT_COADS_PATH,
    dest: str = DEFAULT_COADS_DEST,
    *,
    land_mask: bool = True,
    overwrite: bool = False,
) -> str:
    """Convert the COADS climatology to a Zarr v3 store at ``dest`` and return ``dest``.

    The store is chunked ``{"time": 3, "lat": 45, "lon": 90}`` with Blosc-zstd and
    consolidated metadata (about 3 MB). An existing store made from the same source file
    by the same converter version is left as it is; any other existing path raises
    :class:`~engine.errors.StoreExistsError` unless ``overwrite=True``. The new store is
    written beside ``dest`` and moved into place only when complete, so a failed run
    never destroys the old one.

    Examples
    --------
    >>> convert_coads(dest="/tmp/coads.zarr")  # doctest: +SKIP
    '/tmp/coads.zarr'
    """
    if os.path.exists(dest) and not overwrite:
        if os.path.isfile(src) and _same_conversion(dest, _fingerprint(src, land_mask)):
            return dest
        raise StoreExistsError(
            f"{dest} exists and was not made from this source by this converter; "
            "pass overwrite=True (--overwrite) to replace it"
        )
    ds = coads_dataset(src, land_mask=land_mask)
    return _write_staged(ds, dest, _encoding(ds), prefix=".coads-")


def _write_staged(ds: xr.Dataset, dest: str, encoding: dict, prefix: str) -> str:
    """Write a converted cube beside ``dest`` first, then move it into place: a failed
    conversion never leaves half a store, and an old store goes only once the new one is
    complete."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        staged = os.path.join(tmp, "store.zarr")
        with warnings.catch_warnings():
            # consolidated metadata is deliberate: one read opens the whole cube
            warnings.filterwarnings("ignore", message="Consolidated metadata", module="zarr")
            ds.to_zarr(staged, mode="w-", zarr_format=3, consolidated=True, encoding=encoding)
        _replace(staged, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: ``python -m engine.io.demo [--src] [--dest] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.io.demo",
        description="Convert Ferret's COADS climatology into the demo Zarr v3 store.",
    )
    parser.add_argument("--src", default=DEFAULT_COADS_PATH, help="netCDF-3 source file")
    parser.add_argument("--dest", default=DEFAULT_COADS_DEST, help="Zarr store to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("--no-land-mask", action="store_true", help="skip ocean_mask")
    args = parser.parse_args(argv)
    try:
        dest = convert_coads(
            args.src, args.dest, land_mask=not args.no_land_mask, overwrite=args.overwrite
        )
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"COADS demo store ready: {dest} ({_du(dest) / 1e6:.2f} MB)")
    return 0


def _canonical_dims(ds: xr.Dataset) -> xr.Dataset:
    canonical = {TIME, LAT, LON}
    names = {}
    for dim in ds.dims:
        low = str(dim).lower()
        target = ALIASES.get(low, low if low in canonical else None)
        if target is not None and target != dim:
            names[dim] = target
    return ds.rename(names)


def _wrap_longitudes(ds: xr.Dataset) -> xr.Dataset:
    # Ferret's COADS axis runs 21..379 ("modulo"); wrap to [-180, 180) and sort
    src = ds[LON].values
    wrapped = (src + 180.0) % 360.0 - 180.0
    ds = ds.assign_coords({LON: wrapped}).sortby(LON)
    ds[LON].attrs = {
        "standard_name": "longitude",
        "long_name": "longitude",
        "units": "degrees_east",
        "axis": "X",
        "comment": (
            f"source axis COADSX ran {src.min():g}..{src.max():g} (Ferret modulo axis); "
            "wrapped to [-180, 180) and sorted ascending"
        ),
    }
    ds[LAT].attrs = {
        "standard_name": "latitude",
        "long_name": "latitude",
        "units": "degrees_north",
        "axis": "Y",
    }
    return ds


def _climatological_time(ds: xr.Dataset) -> xr.Dataset:
    # "hour since 0000-01-01" is not decodable in datetime64[ns]; year 0 and 2000 are both
    # leap years, so shifting the offsets to 2000 keeps the mid-month timestamps exact
    hours = ds[TIME].values.astype(np.float64)
    offsets = np.round(hours * 3600.0).astype("timedelta64[s]")
    times = (np.datetime64(f"{NOMINAL_YEAR}-01-01T00:00:00", "s") + offsets).astype(
        "datetime64[ns]"
    )
    ds = ds.assign_coords({TIME: times})
    ds[TIME].attrs = {
        "standard_name": "time",
        "long_name": "climatological month (mid-month)",
        "axis": "T",
        "climatology": f"nominal year {NOMINAL_YEAR}",
        "comment": (
            "source axis: hour since 0000-01-01 (Ferret modulo axis); the same offsets "
            f"from {NOMINAL_YEAR}-01-01"
        ),
    }
    month = ds[TIME].dt.month.values.astype(np.int8)
    if not np.array_equal(month, np.arange(1, 13)):
        raise SpecError(f"COADS time axis does not hold the 12 months in order: {month}")
    return ds.assign_coords(month=(TIME, month, {"long_name": "calendar month", "units": "1"}))


def _cf_variables(ds: xr.Dataset) -> xr.Dataset:
    for name, (units, standard_name) in _VARIABLES.items():
        var = ds[name]
        var.attrs = {
            "standard_name": standard_name,
            "long_name": var.attrs.get("long_name", name).lower(),
            "units": units,
            "source_units": var.attrs.get("units", ""),
            "cell_methods": "time: mean within years time: mean over years",
        }
        var.encoding = {}
    return ds


def _add_ocean_mask(ds: xr.Dataset) -> xr.Dataset:
    from engine.io.landmask import land_fraction

    land = land_fraction(ds[LAT].values, ds[LON].values)
    ocean = (1.0 - land).astype(np.float32).assign_coords({LAT: ds[LAT], LON: ds[LON]})
    ocean.attrs = {
        "long_name": "ocean fraction of grid cell (area-weighted)",
        "units": "1",
        "source": land.attrs["source"],
    }
    mask = (ocean >= 0.5).astype(np.int8)
    mask.attrs = {
        "long_name": "ocean mask",
        "flag_values": np.array([0, 1], dtype=np.int8),
        "flag_meanings": "land ocean",
        "comment": "1 where ocean_fraction >= 0.5 (engine.io.landmask.ocean_mask)",
        "source": land.attrs["source"],
    }
    return ds.assign(ocean_fraction=ocean, ocean_mask=mask)


def _provenance(src: str, history: str, land_mask: bool) -> dict[str, object]:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    steps = (
        "dims renamed to time/lat/lon, longitudes wrapped to [-180, 180), time set to "
        f"mid-months of nominal year {NOMINAL_YEAR}, fills (-1e34) set to NaN, units "
        "normalised" + (", ocean mask added" if land_mask else "")
    )
    return {
        "title": "COADS monthly climatology, 2 degree (NOAA PMEL Ferret demo data)",
        "summary": (
            "Comprehensive Ocean-Atmosphere Data Set monthly climatology on a 2-degree "
            "grid: sea surface temperature, air temperature, specific humidity, winds, "
            "sea level pressure. Land and unsampled ocean cells are NaN."
        ),
        "Conventions": "CF-1.8",
        "source": "COADS climatology (coads_climatology.cdf) from NOAA PMEL Ferret",
        "license": (
            "Ferret License Agreement (NOAA PMEL): public domain, furnished 'as is'; "
            "modifications are documented in the history attribute"
        ),
        "climatology": f"nominal year {NOMINAL_YEAR}",
        "history": f"{history}\n{now}: engine.io.demo.convert_coads: {steps}".strip(),
        "source_file": os.path.abspath(src),
        "source_package": _debian_package("ferret-datasets"),
        "converter": "engine.io.demo.convert_coads",
        **_fingerprint(src, land_mask),
        "engine_version": code_version(),
        "date_created": now,
    }


def _encoding(ds: xr.Dataset) -> dict[str, dict]:
    from zarr.codecs import BloscCodec

    compressor = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    encoding: dict[str, dict] = {}
    for key, var in ds.variables.items():
        name = str(key)
        if name in ds.dims or var.ndim <= 1:  # coordinates: one chunk each
            encoding[name] = {"chunks": var.shape}
            if name == TIME:
                encoding[name].update(units=f"seconds since {NOMINAL_YEAR}-01-01", dtype="i8")
            continue
        encoding[name] = {
            "chunks": tuple(COADS_CHUNKS[str(d)] for d in var.dims),
            "compressors": (compressor,),
        }
    return encoding


def _fingerprint(src: str, land_mask: bool) -> dict[str, object]:
    """The attributes that decide whether an existing store is this conversion."""
    return {
        "source_sha256": _sha256(src),
        "converter_version": CONVERTER_VERSION,
        "ocean_mask_included": int(land_mask),
    }


def _same_conversion(dest: str, fingerprint: Mapping[str, object]) -> bool:
    """True if ``dest`` is a store this converter made from the same source file."""
    try:
        with xr.open_zarr(dest, consolidated=None) as existing:
            old = existing.attrs
    except Exception:  # not a readable Zarr store: certainly different
        return False
    return all(old.get(k) == v for k, v in fingerprint.items())


def _replace(staged: str, dest: str) -> None:
    """Move ``staged`` to ``dest``, removing an old ``dest`` only once the new one is there."""
    if not os.path.exists(dest):
        os.replace(staged, dest)
        return
    old = staged + ".old"
    os.replace(dest, old)
    os.replace(staged, dest)
    shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _debian_package(name: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", name],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"{name} {out} (Debian)" if out else f"{name} (Debian; version unknown)"


def _du(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


if __name__ == "__main__":
    sys.exit(main())
