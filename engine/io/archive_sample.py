"""The real archive of the ``apply`` demo: 240 years of annual air temperature.

PyPI's ``iris-sample-data`` 2.5.2 ships ``sample_data/A1B_north_america.nc`` and
``E1_north_america.nc`` (netCDF-4): annual means of 1.5 m air temperature from the Met
Office Unified Model 6.05 under the SRES A1B and the ENSEMBLES E1 scenarios,
1860-2099, on 37 latitudes (15-60 N) x 49 longitudes (225-315 E). Each value is the mean
of a 360-day year from 1 December to 30 November; its time stamp is the 1 June in the
middle of it.

:func:`convert_archive_sample` reads both files (``h5netcdf``, in the ``test`` extra) and
writes one Zarr v3 store with ``tas_a1b`` and ``tas_e1`` (K, float32) and CF attributes.
The files use a 360-day calendar, which numpy cannot represent; the stamps all fall on
1 June and the bounds on 1 December, dates that exist in every calendar, so they are kept
as the same dates in the standard calendar (``calendar_source: 360_day`` records it) and no
``cftime`` is needed. The store is committed under ``catalogs/data/`` (1.9 MB), as the
ERA5 sample is, so the demo runs from a fresh clone with no download and no extra; this
module is how it was made and how to make it again::

    pip install iris-sample-data==2.5.2
    python -m engine.io.archive_sample catalogs/data/iris_north_america.zarr --overwrite

``tests/test_apply.py`` converts the installed package again and checks the committed
store holds the same values.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from collections.abc import Sequence

import numpy as np
import xarray as xr

from engine._version import code_version
from engine.errors import EngineError, SpecError, StoreExistsError
from engine.io.demo import _du, _same_conversion, _sha256, _write_staged

__all__ = ["DEFAULT_ARCHIVE_DEST", "ARCHIVE_FILES", "ARCHIVE_CHUNKS", "sample_dir",
           "archive_dataset", "convert_archive_sample", "days_360_to_datetime", "main"]

DEFAULT_ARCHIVE_DEST = "catalogs/data/iris_north_america.zarr"
#: Scenario -> file inside ``iris_sample_data/sample_data``.
ARCHIVE_FILES = {"a1b": "A1B_north_america.nc", "e1": "E1_north_america.nc"}
#: Storage chunks: a decade of the whole grid (24 objects per variable).
ARCHIVE_CHUNKS = {"time": 10, "latitude": 37, "longitude": 49}
PACKAGE = "iris-sample-data"
PACKAGE_VERSION = "2.5.2"
#: Bump when the conversion changes, so an existing store is known to be stale.
CONVERTER_VERSION = 1
_LICENSE = ("UK Open Government Licence (iris-sample-data's data licence, Met Office; "
            "http://www.nationalarchives.gov.uk/doc/open-government-licence)")
_SCENARIO = {"a1b": "SRES A1B", "e1": "ENSEMBLES E1 (mitigation)"}


def sample_dir() -> str:
    """The ``sample_data`` folder of the installed ``iris_sample_data`` package.

    Raises
    ------
    SpecError
        The package is not installed (one line with the install command).
    """
    try:
        import iris_sample_data  # type: ignore[import-untyped]
    except ImportError:
        raise SpecError(f"the archive sample needs {PACKAGE}: pip install "
                        f"'{PACKAGE}=={PACKAGE_VERSION}' (or pip install "
                        "'cube-engine[archive]')") from None
    return os.path.join(os.path.dirname(iris_sample_data.__file__), "sample_data")


def days_360_to_datetime(hours: np.ndarray, units: str) -> np.ndarray:
    """Hours since ``units``' origin in a 360-day calendar as datetime64 of the same dates.

    Every 360-day date with day <= 28, or in a month other than February, exists in the
    standard calendar; other dates are refused.

    >>> days_360_to_datetime(np.array([-946800.0]), "hours since 1970-01-01 00:00:00")
    array(['1860-06-01T00:00:00.000000000'], dtype='datetime64[ns]')
    """
    prefix = "hours since "
    if not units.startswith(prefix):
        raise SpecError(f"time units {units!r}: expected 'hours since YYYY-MM-DD ...'")
    origin = units[len(prefix):].strip().split(" ")[0]
    y0, m0, d0 = (int(v) for v in origin.split("-"))
    hours = np.asarray(hours, dtype=np.float64)
    if not np.allclose(hours, np.round(hours)):
        raise SpecError("time stamps are not whole hours; conversion not defined")
    total = np.round(hours).astype(np.int64) + ((y0 * 360 + (m0 - 1) * 30 + d0 - 1) * 24)
    days, hour = np.divmod(total, 24)
    year, rest = np.divmod(days, 360)
    month, day = np.divmod(rest, 30)
    if np.any((month == 1) & (day >= 28)):
        raise SpecError("a 360-day date on 29 or 30 February has no standard-calendar twin")
    out = [np.datetime64(f"{y:04d}-{m + 1:02d}-{d + 1:02d}T{h:02d}:00", "ns")
           for y, m, d, h in zip(year, month, day, hour, strict=True)]
    return np.array(out, dtype="datetime64[ns]")


def _read(path: str, scenario: str) -> xr.Dataset:
    try:
        with xr.open_dataset(path, engine="h5netcdf", decode_times=False) as raw:
            ds = raw.load()
    except ImportError as err:
        raise SpecError(f"reading {os.path.basename(path)} (netCDF-4) needs h5netcdf and "
                        f"h5py: pip install h5netcdf h5py ({err})") from None
    var = ds.get("air_temperature")
    if var is None or var.dims != ("time", "latitude", "longitude"):
        raise SpecError(f"{path} is not the iris north-america sample: no air_temperature "
                        "on (time, latitude, longitude)")
    cal = ds["time"].attrs.get("calendar")
    if cal != "360_day":
        raise SpecError(f"{path}: calendar {cal!r}, expected 360_day; conversion not defined")
    units = ds["time"].attrs["units"]
    times = days_360_to_datetime(ds["time"].values, units)
    bounds = days_360_to_datetime(ds["time_bnds"].values.ravel(), units).reshape(-1, 2)
    out = xr.Dataset(
        {f"tas_{scenario}": (("time", "latitude", "longitude"),
                             var.values.astype(np.float32))},
        coords={"time": times, "latitude": ds["latitude"].values.astype(np.float32),
                "longitude": ds["longitude"].values.astype(np.float32),
                "time_bnds": (("time", "bnds"), bounds)})
    out.attrs["_source"] = {"path": path, "sha256": _sha256(path),
                            "source": var.attrs.get("source", ""),
                            "stash": var.attrs.get("ukmo__um_stash_source", "")}
    return out


def archive_dataset(src: str | None = None, years: int | None = None) -> xr.Dataset:
    """Both scenarios as one dataset (``tas_a1b``, ``tas_e1``), CF attributes and provenance.

    Parameters
    ----------
    src
        The ``sample_data`` folder (default: the installed package's, :func:`sample_dir`).
    years
        Keep only the first ``years`` years (a reduced archive for tests).
    """
    src = src or sample_dir()
    parts = []
    for scenario, name in ARCHIVE_FILES.items():
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            raise SpecError(f"{path} not found: pip install '{PACKAGE}=={PACKAGE_VERSION}'")
        parts.append(_read(path, scenario))
    a, e = parts
    for c in ("time", "latitude", "longitude"):
        if not np.array_equal(a[c].values, e[c].values):
            raise SpecError(f"the A1B and E1 files differ in {c}: conversion not defined")
    sources = [p.attrs.pop("_source") for p in parts]
    ds = xr.merge([a, e], compat="equals", join="exact")
    if years is not None:
        ds = ds.isel(time=slice(0, int(years)))
    for scenario in ARCHIVE_FILES:
        ds[f"tas_{scenario}"].attrs = {
            "standard_name": "air_temperature",
            "long_name": f"1.5 m air temperature, annual mean, {_SCENARIO[scenario]}",
            "units": "K",
            "cell_methods": "time: mean (interval: 6 hour)",
            "scenario": _SCENARIO[scenario],
        }
    ds["time"].attrs = {"standard_name": "time", "axis": "T", "bounds": "time_bnds",
                        "long_name": "middle of the model year (1 June)",
                        "calendar_source": "360_day",
                        "comment": "360-day-calendar dates of the source kept as the same "
                                   "dates (1 June; bounds 1 December)"}
    ds["latitude"].attrs = {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"}
    ds["longitude"].attrs = {"standard_name": "longitude", "units": "degrees_east",
                             "axis": "X"}
    ds = ds.set_coords("time_bnds")
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ds.attrs = {
        "title": "Met Office UM 6.05 annual 1.5 m air temperature over North America, A1B and E1, "
                 f"{str(ds.time.values[0])[:4]}-{str(ds.time.values[-1])[:4]}",
        "Conventions": "CF-1.8",
        "institution": "Met Office Hadley Centre",
        "source": sources[0]["source"] or "Met Office Unified Model 6.05",
        "license": _LICENSE,
        "source_package": f"{PACKAGE} {PACKAGE_VERSION} (PyPI wheel)",
        "source_files": ", ".join(ARCHIVE_FILES.values()),
        "source_sha256": ",".join(s["sha256"] for s in sources),
        "converter": "engine.io.archive_sample.convert_archive_sample",
        "converter_version": CONVERTER_VERSION,
        "engine_version": code_version(),
        "history": f"{now}: engine.io.archive_sample: air_temperature of both files as "
                   "tas_a1b and tas_e1 (float32), 360-day dates kept as the same dates",
        "date_created": now,
    }
    return ds


def _encoding(ds: xr.Dataset) -> dict[str, dict]:
    from zarr.codecs import BloscCodec

    comp = BloscCodec(cname="zstd", clevel=7, shuffle="shuffle")
    enc: dict[str, dict] = {}
    for key, var in ds.variables.items():
        name = str(key)
        if name in ("time", "time_bnds"):
            enc[name] = {"chunks": var.shape, "units": "days since 1850-01-01",
                         "calendar": "proleptic_gregorian", "dtype": "i4"}
        elif var.ndim <= 1:
            enc[name] = {"chunks": var.shape}
        else:
            enc[name] = {"chunks": tuple(min(ARCHIVE_CHUNKS[str(d)], var.sizes[d])
                                         for d in var.dims), "compressors": (comp,)}
    return enc


def convert_archive_sample(dest: str = DEFAULT_ARCHIVE_DEST, src: str | None = None, *,
                           years: int | None = None, overwrite: bool = False) -> str:
    """Write the archive sample as a Zarr v3 store at ``dest``; return ``dest``.

    An existing store made from the same files by this converter (and the same ``years``)
    is kept; any other existing path raises :class:`StoreExistsError` unless ``overwrite``.
    The store is staged beside ``dest`` and moved into place only when complete.

    Examples
    --------
    >>> convert_archive_sample("/tmp/iris.zarr", years=20)  # doctest: +SKIP
    '/tmp/iris.zarr'
    """
    ds = archive_dataset(src, years)
    ds.attrs["years"] = int(ds.sizes["time"])
    if os.path.exists(dest) and not overwrite:
        keys = ("source_sha256", "converter_version", "years")
        if _same_conversion(dest, {k: ds.attrs[k] for k in keys}):
            return dest
        raise StoreExistsError(f"{dest} exists and was not made from these files by this "
                               "converter; pass overwrite=True (--overwrite) to replace it")
    return _write_staged(ds, dest, _encoding(ds), prefix=".archive-")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.io.archive_sample [DEST] [--years N] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.io.archive_sample",
        description="Convert iris-sample-data's 240-year North America air temperature "
                    "(A1B and E1) into a Zarr v3 store.")
    parser.add_argument("dest", nargs="?", default=DEFAULT_ARCHIVE_DEST)
    parser.add_argument("--src", help="sample_data folder (default: the installed package's)")
    parser.add_argument("--years", type=int, help="keep only the first N years")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    args = parser.parse_args(argv)
    try:
        dest = convert_archive_sample(args.dest, args.src, years=args.years,
                                      overwrite=args.overwrite)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"archive sample ready: {dest} ({_du(dest) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
