"""Open cubes from Intake catalogs, lazily, with work-unit chunks.

Two YAML flavours are read, both by :mod:`engine.io.intake_parse`, as data against
allow-lists (intake itself never sees a catalog: it would import and call whatever
``module:callable`` the catalog names):

* **Intake 2** (``version: 2``; ``data:`` + ``entries:`` with
  ``intake.readers.readers:XArrayDatasetReader`` over the ``Zarr``, ``NetCDF3`` or
  ``HDF5`` datatypes). Templates ``{CATALOG_DIR}``, user parameters, ``{data(token)}`` as
  the entry's data, and ``{env(NAME)}`` for allowed names are filled in.
* **Intake V1** (``sources:`` with ``driver: zarr`` / ``netcdf`` /
  ``intake_xarray.*``), without intake-xarray: ``{{ CATALOG_DIR }}``, parameter defaults
  and ``{{ env(NAME) }}`` for allowed names are substituted.

Both are normalised to one :class:`CatalogEntry` and opened by one xarray call, so a V1
and a V2 description of the same store give identical Datasets. Relative paths resolve
against the catalog file's directory in both flavours.

Trust: environment variables are read only when named by ``allow_env=`` or
``engine.catalog.allow-env``; a remote catalog may name local files only with
``allow_local=True`` or ``engine.catalog.allow-local-from-remote``. Everything listed,
described, set as an attribute or raised is redacted (:mod:`engine.redact`).

Dims: the cube's dims are renamed to ``time``/``lat``/``lon`` where a name alias or CF
attributes (``units: degrees_north``, ``axis: Y``, ``standard_name: latitude``) say so and
the name is free. ``chunks`` (the caller's or the entry's) and ``sel`` accept the canonical
names, their aliases (``latitude``, ``y``, ``COADSY`` ...) and the store's own names.

Chunks: an explicit ``chunks`` mapping (the caller's, else the entry's) is used as
given; without one (or with intake's ``chunks: {}``) the storage chunks are coarsened to
work units of about ``engine.chunks.target-mb``. Either way every chunk is rounded up to
a whole multiple of the storage chunk (the shard when the store is sharded), so regions
written later from these chunks stay aligned.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import fsspec
import xarray as xr

from engine import config
from engine.dims import ALIASES, LAT, LON, TIME, cube_dims, resolve_keys
from engine.errors import CatalogError, CubeError, EngineError, SpecError
from engine.io.catalog_urls import first_line, protocol
from engine.io.intake_parse import CatalogEntry, read_catalog
from engine.redact import redact, redact_url

__all__ = [
    "CatalogEntry",
    "open_cube",
    "list_entries",
    "describe_entry",
    "read_entry",
    "coarsen_chunks",
    "storage_chunks",
]

Chunks = Mapping[str, int] | Literal["auto", "storage"] | None

# --------------------------------------------------------------------------- public API


def list_entries(
    catalog: str | os.PathLike,
    *,
    catalog_storage_options: Mapping[str, Any] | None = None,
    allow_env: Iterable[str] | None = None,
    allow_local: bool | None = None,
) -> list[dict[str, Any]]:
    """Entries of a catalog, from the YAML alone (no data store is touched).

    Returns one dict per entry (:meth:`CatalogEntry.to_dict`, redacted) with ``name``,
    ``description``, ``url``, ``format``, ``engine``, ``storage_options``, ``chunks``,
    ``catalog_version``, ``reader`` (V2 reader class or V1 driver) and ``metadata``.

    Examples
    --------
    >>> [e["name"] for e in list_entries("catalogs/demo.yaml")]  # doctest: +SKIP
    ['coads_climatology']
    """
    cat = read_catalog(catalog, catalog_storage_options, allow_env=allow_env,
                       allow_local=allow_local)
    return [cat.entry(name).to_dict() for name in cat.names]


def read_entry(
    catalog: str | os.PathLike,
    entry: str,
    *,
    catalog_storage_options: Mapping[str, Any] | None = None,
    allow_env: Iterable[str] | None = None,
    allow_local: bool | None = None,
) -> CatalogEntry:
    """Parse one entry of a catalog into a :class:`CatalogEntry` (YAML only, no data).

    The entry holds the real URL and storage options; show or persist only
    :meth:`CatalogEntry.to_dict`.
    """
    cat = read_catalog(catalog, catalog_storage_options, allow_env=allow_env,
                       allow_local=allow_local)
    return cat.entry(entry)


def open_cube(
    catalog: str | os.PathLike,
    entry: str,
    *,
    chunks: Chunks = None,
    variables: Sequence[str] | None = None,
    sel: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    target_mb: float | None = None,
    catalog_storage_options: Mapping[str, Any] | None = None,
    allow_env: Iterable[str] | None = None,
    allow_local: bool | None = None,
    **open_kwargs: Any,
) -> xr.Dataset:
    """Open a catalog entry as a lazy, dask-backed :class:`xarray.Dataset`.

    Nothing is computed and no data chunk is read: only metadata and index coordinates.

    Parameters
    ----------
    catalog
        Path or fsspec URL of an Intake 2 or V1 YAML catalog.
    entry
        Entry name.
    chunks
        ``None`` (default): the entry's chunks if it gives any, else ``"auto"``.
        ``"auto"``: storage chunks coarsened to about ``target_mb`` per variable chunk.
        ``"storage"``: the storage chunks. A mapping ``{dim: size}`` (``-1`` = whole
        dim) is used as given for the dims it names, storage chunks for the others.
        Sizes are always rounded up to whole multiples of the storage chunks. Dims may
        be named canonically (``lat``), by alias (``latitude``, ``y``) or as in the store.
    variables
        Keep only these data variables (coordinates are kept).
    sel
        Label selection applied after chunking with :meth:`xarray.Dataset.sel`, e.g.
        ``{"time": slice("2002-05-21", "2002-08-01"), "lat": slice(60, 30)}``; dims
        named as for ``chunks``.
    storage_options
        fsspec options for the data, merged over the entry's (keys given here win).
    target_mb
        Work-unit size for ``"auto"``; defaults to ``engine.chunks.target-mb``.
    catalog_storage_options
        fsspec options for reading the catalog file itself.
    allow_env
        Names of environment variables the catalog's ``{env(NAME)}`` templates may read;
        defaults to ``engine.catalog.allow-env`` (none). Any other is refused.
    allow_local
        Whether a remote catalog (``s3://``, ``https://`` ...) may name local files;
        defaults to ``engine.catalog.allow-local-from-remote`` (False).
    **open_kwargs
        Passed to :func:`xarray.open_dataset`, over the entry's own arguments.

    Returns
    -------
    xarray.Dataset
        Canonical dims (``time``, ``lat``, ``lon``) where they can be told, dask arrays,
        and the attributes ``engine_catalog`` (absolute path or URL, redacted) and
        ``engine_entry``.

    Examples
    --------
    >>> ds = open_cube("catalogs/demo.yaml", "coads_climatology", variables=["SST", "AIRT"])
    ... # doctest: +SKIP
    """
    spec = read_entry(catalog, entry, catalog_storage_options=catalog_storage_options,
                      allow_env=allow_env, allow_local=allow_local)
    ds, renamed = _open_lazy(spec, storage_options, open_kwargs)
    ds = _subset(ds, variables, spec.name)
    storage = storage_chunks(ds)
    wanted = spec.chunks if chunks is None else chunks
    plan = _plan(ds, storage, wanted, target_mb, renamed)
    ds = ds.chunk(plan)
    if sel:
        ds = ds.sel(_dim_keys(ds, sel, "sel", renamed))
    ds.attrs["engine_catalog"] = redact_url(spec.catalog)
    ds.attrs["engine_entry"] = spec.name
    return ds


def describe_entry(
    catalog: str | os.PathLike,
    entry: str,
    *,
    chunks: Chunks = None,
    target_mb: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
    catalog_storage_options: Mapping[str, Any] | None = None,
    allow_env: Iterable[str] | None = None,
    allow_local: bool | None = None,
) -> dict[str, Any]:
    """Describe an entry from the catalog and the store's metadata, reading no data values.

    Everything returned is redacted (URL passwords and query values, storage options,
    credential-like keys; values read from environment variables show as their template).

    Returns
    -------
    dict
        ``name``, ``catalog``, ``catalog_version``, ``description``, ``metadata``, ``url``,
        ``format``, ``storage_options``, ``dims`` ({dim: size}), ``extent``
        ({dim: [first, last]} of index coordinates, which xarray reads on open),
        ``variables`` ({name: {dims, shape, dtype, units, long_name, standard_name,
        storage_chunks, chunks, nbytes, n_chunks}}), ``storage_chunks`` and ``chunks``
        ({dim: size}; ``chunks`` as :func:`open_cube` would give them), ``nbytes`` and
        ``n_chunks`` (totals over data variables) and ``attrs`` (the store's global
        attributes) and ``provenance`` (the subset of them that records origin:
        ``source*``, ``engine_*``, ``history``, ``license``, ``date_created`` ...).
    """
    spec = read_entry(catalog, entry, catalog_storage_options=catalog_storage_options,
                      allow_env=allow_env, allow_local=allow_local)
    ds, renamed = _open_lazy(spec, storage_options, {})
    storage = storage_chunks(ds)
    plan = _plan(ds, storage, spec.chunks if chunks is None else chunks, target_mb, renamed)
    variables = {name: _describe_var(ds[name], storage, plan) for name in ds.data_vars}
    out = spec.to_dict()
    del out["chunks"]
    attrs = redact({str(k): _plain(v) for k, v in ds.attrs.items()})
    out.update(
        catalog=redact_url(spec.catalog),
        dims={str(d): int(n) for d, n in ds.sizes.items()},
        extent={str(d): _extent(ds, d) for d in ds.dims if d in ds.indexes},
        variables=variables,
        storage_chunks=storage,
        chunks=plan,
        nbytes=sum(v["nbytes"] for v in variables.values()),
        n_chunks=sum(v["n_chunks"] for v in variables.values()),
        attrs=attrs,
        provenance=_provenance(attrs),
    )
    ds.close()
    return out


def storage_chunks(ds: xr.Dataset) -> dict[str, int]:
    """The atomic storage unit per dim: the lcm of every data variable's chunk (or shard).

    Dims of unchunked (e.g. netCDF-3) variables count as 1; the result is capped at the
    dim size, so a dask chunk that is a multiple of it never splits a storage chunk.
    Coordinates are left out: they are small, often stored as one chunk, and written
    once rather than by regions.
    """
    unit = {str(d): 1 for d in ds.dims}
    for var in ds.data_vars.values():
        shape = (
            var.encoding.get("shards")
            or var.encoding.get("chunks")
            or var.encoding.get("chunksizes")
        )
        if not shape or len(shape) != var.ndim:
            continue
        for dim, size in zip(var.dims, shape, strict=True):
            unit[str(dim)] = min(math.lcm(unit[str(dim)], int(size)), int(ds.sizes[dim]))
    return unit


def coarsen_chunks(
    sizes: Mapping[str, int],
    storage: Mapping[str, int],
    variables: Iterable[tuple[Sequence[str], int]],
    target_bytes: int,
) -> dict[str, int]:
    """Grow storage chunks by whole multiples until a chunk is about ``target_bytes``.

    Parameters
    ----------
    sizes
        Dimension sizes.
    storage
        Storage chunk per dim (the start, and the step of every size returned).
    variables
        ``(dims, itemsize)`` of each variable; the largest chunk over them is what must
        stay within ``target_bytes``.
    target_bytes
        Upper bound for the largest variable chunk (unless one storage chunk is larger).

    Returns
    -------
    dict
        ``{dim: size}``, each a multiple of ``storage[dim]`` or the whole dim.

    Notes
    -----
    Greedy: the dim whose chunk covers the smallest share of its length grows first (to
    at most twice its multiple), which keeps work units compact in every dim rather than
    long in one.
    """
    variables = [(tuple(d), int(i)) for d, i in variables]
    mult = {d: 1 for d in sizes}
    full = {d: math.ceil(sizes[d] / max(1, min(storage[d], sizes[d]))) for d in sizes}

    def chunk(m: Mapping[str, int]) -> dict[str, int]:
        return {d: min(m[d] * storage[d], sizes[d]) for d in sizes}

    def nbytes(c: Mapping[str, int]) -> int:
        return max((i * math.prod(c[d] for d in dims) for dims, i in variables), default=0)

    def fit(dim: str, current: Mapping[str, int]) -> int:
        """Largest multiple of ``dim`` that keeps every variable chunk within budget."""
        if nbytes({**current, dim: sizes[dim]}) <= target_bytes:
            return full[dim]
        per_step = [
            i * math.prod(current[d] for d in dims if d != dim) * storage[dim]
            for dims, i in variables
            if dim in dims
        ]
        return min(int(target_bytes // p) for p in per_step)

    growing = {d for d in sizes if full[d] > 1}
    while growing:
        current = chunk(mult)
        dim = min(sorted(growing), key=lambda d: current[d] / sizes[d])
        new = min(2 * mult[dim], fit(dim, current), full[dim])
        if new <= mult[dim]:
            growing.discard(dim)
            continue
        mult[dim] = new
        if mult[dim] >= full[dim]:
            growing.discard(dim)
    return chunk(mult)


# ----------------------------------------------------------------------- opening the data


def _open_lazy(
    spec: CatalogEntry,
    storage_options: Mapping[str, Any] | None,
    open_kwargs: Mapping[str, Any],
) -> tuple[xr.Dataset, dict[str, str]]:
    """Open without dask (lazy backend arrays) and rename dims to the canonical names;
    also returns ``{store name: canonical name}`` of the dims renamed."""
    so = {**spec.storage_options, **(storage_options or {})}
    kwargs = {**spec.open_kwargs, **open_kwargs}
    kwargs.pop("chunks", None)
    engine = kwargs.pop("engine", spec.engine)
    target: Any = spec.url
    try:
        if spec.format == "zarr":
            if so and (protocol(spec.url) != "file" or "::" in spec.url):
                kwargs["storage_options"] = so
        elif protocol(spec.url) != "file":
            target = fsspec.open(spec.url, "rb", **so).open()
        ds = xr.open_dataset(target, engine=engine, chunks=None, **kwargs)
    except EngineError:
        raise
    except Exception as err:  # backends raise their own types (botocore, zarr, h5py ...)
        shown = spec.to_dict()["url"]
        raise CatalogError(" ".join(spec.scrub(
            f"cannot open entry {spec.name!r} at {shown}: {first_line(err)}; check its "
            f"url and arguments in {spec.catalog}").split())) from None
    return _canonical_dims(ds)


_ROLE_NAMES = {"y": LAT, "x": LON, "time": TIME}
_PROJECTED = ("projection_x_coordinate", "projection_y_coordinate", "grid_latitude",
              "grid_longitude")
_METRES = ("m", "km", "metre", "metres", "meter", "meters", "kilometre", "kilometres")


def _cf_says(ds: xr.Dataset, dim: str, role: str) -> bool:
    """Whether the CF attributes of ``dim``'s coordinate say it is geographic lat/lon or time
    (a projected ``x``/``y`` in metres, or a rotated pole grid, is left alone)."""
    if dim not in ds.coords:
        return False
    attrs = ds.coords[dim].attrs
    axis = str(attrs.get("axis", "")).upper()
    std = str(attrs.get("standard_name", "")).lower()
    units = str(attrs.get("units", "")).strip().lower().replace(" ", "_")
    if role == "time":
        return axis == "T" or std == "time" or "_since_" in units
    north, east = role == "y", role == "x"
    if units.startswith("degree") and (
        (north and units.endswith(("north", "_n", "n"))) or
        (east and units.endswith(("east", "_e", "e")))
    ):
        return True
    if std == ("latitude" if north else "longitude"):
        return True
    return axis == ("Y" if north else "X") and std not in _PROJECTED and units not in _METRES


def _canonical_dims(ds: xr.Dataset) -> tuple[xr.Dataset, dict[str, str]]:
    """Rename dims to ``time``/``lat``/``lon`` by alias or CF attributes, never onto a
    name the cube already uses."""
    try:
        found = cube_dims(ds)
        roles = {found.y: "y", found.x: "x", found.time: "time"}
    except CubeError:  # two dims claim one role: rename by alias only
        roles = {}
    renames: dict[Any, str] = {}
    for dim in ds.dims:
        target = _canonical(str(dim))
        role = roles.get(str(dim))
        if target == dim and role is not None and _cf_says(ds, str(dim), role):
            target = _ROLE_NAMES[role]
        if target != dim and target not in ds.variables and target not in ds.dims \
                and target not in renames.values():
            renames[dim] = target
    return (ds.rename(renames) if renames else ds), {str(k): v for k, v in renames.items()}


def _canonical(name: str) -> str:
    low = name.lower()
    if low in (TIME, LAT, LON):
        return low
    return ALIASES.get(low, name)


def _subset(ds: xr.Dataset, variables: Sequence[str] | None, entry: str) -> xr.Dataset:
    if variables is None:
        return ds
    if isinstance(variables, str):
        variables = [variables]
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        raise CubeError(
            f"variable {missing[0]!r} is not in cube {entry!r}; variables: "
            + ", ".join(map(str, ds.data_vars))
        )
    return ds[list(variables)]


def _dim_keys(
    ds: xr.Dataset, mapping: Mapping[str, Any], what: str, renamed: Mapping[str, str]
) -> dict[str, Any]:
    """``mapping`` keyed by the cube's dims: canonical names, aliases (``latitude``, ``y``,
    ``COADSY`` ...) and the store's own names from before canonicalisation all work."""
    translated: dict[str, Any] = {}
    given: dict[str, Any] = {}
    for key, value in mapping.items():
        name = renamed.get(str(key), str(key))
        if name in translated:  # a dict would silently keep the last
            raise CubeError(f"{what} names dimension {name!r} twice (as {given[name]!r} and "
                            f"{key!r}); give it once")
        translated[name], given[name] = value, key
    return resolve_keys(ds, translated, what)


def _plan(
    ds: xr.Dataset,
    storage: Mapping[str, int],
    wanted: Chunks,
    target_mb: float | None,
    renamed: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Dask chunks per dim: explicit sizes aligned up to storage, or coarsened storage."""
    sizes = {str(d): int(n) for d, n in ds.sizes.items()}
    if wanted is None or wanted == "auto":
        target = float(config.get("chunks.target-mb", target_mb)) * 2**20
        variables = [(tuple(map(str, v.dims)), v.dtype.itemsize) for v in ds.data_vars.values()]
        return coarsen_chunks(sizes, storage, variables, int(target))
    if wanted == "storage":
        return dict(storage)
    if not isinstance(wanted, Mapping):
        raise SpecError(f"chunks must be 'auto', 'storage' or a mapping, got {wanted!r}")
    plan = dict(storage)
    for dim, size in _dim_keys(ds, wanted, "chunks", renamed or {}).items():
        if not isinstance(size, int) or (size <= 0 and size != -1):
            raise SpecError(f"chunks[{dim!r}] must be a positive int or -1, got {size!r}")
        size = sizes[dim] if size == -1 else size
        step = storage[dim]
        plan[dim] = min(sizes[dim], math.ceil(size / step) * step)
    return plan


_PROVENANCE_KEYS = (
    "history",
    "license",
    "date_created",
    "Conventions",
    "institution",
    "references",
    "converter",
    "converter_version",
)


def _provenance(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The store attributes that say where the data came from."""
    return {
        k: v
        for k, v in attrs.items()
        if k in _PROVENANCE_KEYS or k.startswith(("source", "engine_"))
    }


def _describe_var(var: xr.DataArray, storage: Mapping[str, int], plan: Mapping[str, int]):
    dims = [str(d) for d in var.dims]
    chunks = [plan[d] for d in dims]
    return {
        "dims": dims,
        "shape": list(var.shape),
        "dtype": str(var.dtype),
        "units": var.attrs.get("units"),
        "long_name": var.attrs.get("long_name"),
        "standard_name": var.attrs.get("standard_name"),
        "storage_chunks": [storage[d] for d in dims],
        "chunks": chunks,
        "nbytes": int(var.size * var.dtype.itemsize),
        "n_chunks": math.prod(math.ceil(n / c) for n, c in zip(var.shape, chunks, strict=True)),
    }


def _extent(ds: xr.Dataset, dim: Any) -> list[Any]:
    index = ds.indexes[dim]
    if len(index) == 0:
        return []
    return [_plain(index[0]), _plain(index[-1])]


def _plain(value: Any) -> Any:
    """A plain Python value (numpy arrays become lists, scalars and dates plain)."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and getattr(value, "ndim", 0) > 0:
        return tolist()
    item = getattr(value, "item", None)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return item() if callable(item) else value


