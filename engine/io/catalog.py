"""Open cubes from Intake catalogs, lazily, with work-unit chunks.

Two YAML flavours are read:

* **Intake 2** (``version: 2``; ``data:`` + ``entries:`` with
  ``intake.readers.readers:XArrayDatasetReader`` over the ``Zarr``, ``NetCDF3`` or
  ``HDF5`` datatypes). Intake itself parses the file and fills in its templates
  (``{CATALOG_DIR}``, ``{env(NAME)}``, user parameters, ``{data(token)}`` references).
* **Intake V1** (``sources:`` with ``driver: zarr`` / ``netcdf`` /
  ``intake_xarray.*``). These are parsed here, without intake-xarray: ``{{ CATALOG_DIR }}``,
  ``{{ env(NAME) }}`` and parameter defaults are substituted.

Both are normalised to one :class:`CatalogEntry` and opened by one xarray call, so a V1
and a V2 description of the same store give identical Datasets. Relative paths resolve
against the catalog file's directory in both flavours.

Chunks: an explicit ``chunks`` mapping (the caller's, else the entry's) is used as
given; without one (or with intake's ``chunks: {}``) the storage chunks are coarsened to
work units of about ``engine.chunks.target-mb``. Either way every chunk is rounded up to
a whole multiple of the storage chunk (the shard when the store is sharded), so regions
written later from these chunks stay aligned.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import xarray as xr
import yaml

from engine import config
from engine.dims import ALIASES, LAT, LON, TIME
from engine.errors import CatalogError, CubeError, SpecError

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
Format = Literal["zarr", "netcdf"]

_SECRET_KEYS = {"key", "secret", "token", "password", "aws_secret_access_key", "session_token"}
_V1_DRIVERS: dict[str, Format] = {
    "zarr": "zarr",
    "intake_xarray.xzarr.ZarrSource": "zarr",
    "intake_xarray.ZarrSource": "zarr",
    "netcdf": "netcdf",
    "intake_xarray.netcdf.NetCDFSource": "netcdf",
    "intake_xarray.NetCDFSource": "netcdf",
}
_V2_DATATYPES: dict[str, tuple[Format, str]] = {
    "Zarr": ("zarr", "zarr"),
    "NetCDF3": ("netcdf", "scipy"),
    "HDF5": ("netcdf", "h5netcdf"),
}
_V2_READER = "intake.readers.readers:XArrayDatasetReader"


@dataclass(frozen=True)
class CatalogEntry:
    """One catalog entry, normalised from either YAML flavour.

    Attributes
    ----------
    name, catalog
        The entry name and the catalog's absolute path or URL.
    url
        Resolved location of the data (absolute path or fsspec URL).
    format
        ``"zarr"`` or ``"netcdf"``.
    engine
        xarray backend engine (None lets xarray guess).
    storage_options
        fsspec options for ``url``.
    open_kwargs
        Further keyword arguments for :func:`xarray.open_dataset` (``consolidated``,
        ``group``, ``decode_times`` ...), without ``chunks``.
    chunks
        The entry's chunks: a mapping, or None when the entry leaves them to the engine.
    description, metadata
        From the catalog; ``version`` is 1 or 2.
    reader
        The V2 reader class or the V1 driver named in the catalog.
    """

    name: str
    catalog: str
    url: str
    format: Format
    engine: str | None
    storage_options: dict[str, Any] = field(default_factory=dict)
    open_kwargs: dict[str, Any] = field(default_factory=dict)
    chunks: dict[str, int] | None = None
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = 2
    reader: str = _V2_READER

    def summary(self) -> dict[str, Any]:
        """Plain-dict view for listings (secrets in storage options are redacted)."""
        return {
            "name": self.name,
            "description": self.description,
            "url": self.url,
            "format": self.format,
            "engine": self.engine,
            "storage_options": _redact(self.storage_options),
            "chunks": self.chunks,
            "catalog_version": self.version,
            "reader": self.reader,
            "metadata": self.metadata,
        }


# --------------------------------------------------------------------------- public API


def list_entries(
    catalog: str | os.PathLike, *, catalog_storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Entries of a catalog, from the YAML alone (no data store is touched).

    Returns one dict per entry with ``name``, ``description``, ``url``, ``format``,
    ``engine``, ``storage_options`` (secrets redacted), ``chunks``, ``catalog_version``,
    ``reader`` (V2 reader class or V1 driver) and ``metadata``.

    Examples
    --------
    >>> [e["name"] for e in list_entries("catalogs/demo.yaml")]  # doctest: +SKIP
    ['coads_climatology']
    """
    cat = _load(catalog, catalog_storage_options)
    return [_entry(cat, name).summary() for name in cat.names]


def read_entry(
    catalog: str | os.PathLike,
    entry: str,
    *,
    catalog_storage_options: Mapping[str, Any] | None = None,
) -> CatalogEntry:
    """Parse one entry of a catalog into a :class:`CatalogEntry` (YAML only, no data)."""
    return _entry(_load(catalog, catalog_storage_options), entry)


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
        Sizes are always rounded up to whole multiples of the storage chunks.
    variables
        Keep only these data variables (coordinates are kept).
    sel
        Label selection applied after chunking with :meth:`xarray.Dataset.sel`, e.g.
        ``{"time": slice("2002-05-21", "2002-08-01"), "lat": slice(60, 30)}``.
    storage_options
        fsspec options for the data, merged over the entry's (keys given here win).
    target_mb
        Work-unit size for ``"auto"``; defaults to ``engine.chunks.target-mb``.
    catalog_storage_options
        fsspec options for reading the catalog file itself.
    **open_kwargs
        Passed to :func:`xarray.open_dataset`, over the entry's own arguments.

    Returns
    -------
    xarray.Dataset
        Canonical dims (``time``, ``lat``, ``lon``), dask arrays, and the attributes
        ``engine_catalog`` (absolute path or URL) and ``engine_entry``.

    Examples
    --------
    >>> ds = open_cube("catalogs/demo.yaml", "coads_climatology", variables=["SST", "AIRT"])
    ... # doctest: +SKIP
    """
    spec = read_entry(catalog, entry, catalog_storage_options=catalog_storage_options)
    ds = _open_lazy(spec, storage_options, open_kwargs)
    ds = _subset(ds, variables, spec.name)
    storage = storage_chunks(ds)
    wanted = spec.chunks if chunks is None else chunks
    plan = _plan(ds, storage, wanted, target_mb)
    ds = ds.chunk(plan)
    if sel:
        ds = _select(ds, sel, spec.name)
    ds.attrs["engine_catalog"] = spec.catalog
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
) -> dict[str, Any]:
    """Describe an entry from the catalog and the store's metadata, reading no data values.

    Returns
    -------
    dict
        ``name``, ``catalog``, ``catalog_version``, ``description``, ``metadata``, ``url``,
        ``format``, ``storage_options`` (redacted), ``dims`` ({dim: size}), ``extent``
        ({dim: [first, last]} of index coordinates, which xarray reads on open),
        ``variables`` ({name: {dims, shape, dtype, units, long_name, standard_name,
        storage_chunks, chunks, nbytes, n_chunks}}), ``storage_chunks`` and ``chunks``
        ({dim: size}; ``chunks`` as :func:`open_cube` would give them), ``nbytes`` and
        ``n_chunks`` (totals over data variables) and ``attrs`` (the store's global
        attributes) and ``provenance`` (the subset of them that records origin:
        ``source*``, ``engine_*``, ``history``, ``license``, ``date_created`` ...).
    """
    spec = read_entry(catalog, entry, catalog_storage_options=catalog_storage_options)
    ds = _open_lazy(spec, storage_options, {})
    storage = storage_chunks(ds)
    plan = _plan(ds, storage, spec.chunks if chunks is None else chunks, target_mb)
    variables = {name: _describe_var(ds[name], storage, plan) for name in ds.data_vars}
    out = spec.summary()
    del out["chunks"]
    out.update(
        catalog=spec.catalog,
        dims={str(d): int(n) for d, n in ds.sizes.items()},
        extent={str(d): _extent(ds, d) for d in ds.dims if d in ds.indexes},
        variables=variables,
        storage_chunks=storage,
        chunks=plan,
        nbytes=sum(v["nbytes"] for v in variables.values()),
        n_chunks=sum(v["n_chunks"] for v in variables.values()),
        attrs=dict(ds.attrs),
        provenance=_provenance(ds.attrs),
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


# ------------------------------------------------------------------------ catalog parsing


@dataclass
class _Loaded:
    path: str  # absolute path or URL of the catalog file
    directory: str  # its directory, same form
    version: int
    doc: dict[str, Any]
    names: list[str]
    intake_cat: Any = None


def _load(catalog: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> _Loaded:
    path = _absolute(os.fspath(catalog))
    so = dict(storage_options or {})
    try:
        with fsspec.open(path, "rt", **so) as f:
            text = f.read()
    except FileNotFoundError:
        raise CatalogError(
            f"catalog file not found: {catalog}; pass the path of an Intake YAML catalog, "
            "e.g. catalogs/demo.yaml"
        ) from None
    except (OSError, ValueError) as err:
        raise CatalogError(f"cannot read catalog {catalog}: {_first_line(err)}") from err
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise CatalogError(
            f"catalog {catalog} is not valid YAML ({problem}{line}); fix the file"
        ) from None
    directory = _parent(path)
    if isinstance(doc, dict) and doc.get("version") == 2:
        return _load_v2(path, directory, doc, so)
    if isinstance(doc, dict) and isinstance(doc.get("sources"), dict):
        return _Loaded(path, directory, 1, doc, [str(n) for n in doc["sources"]])
    raise CatalogError(
        f"{catalog} is not an Intake catalog: expected 'version: 2' with 'entries:', "
        "or a V1 'sources:' mapping"
    )


def _load_v2(
    path: str, directory: str, doc: dict[str, Any], storage_options: dict[str, Any]
) -> _Loaded:
    from intake.readers.entry import Catalog

    # intake wants every key spelled out; hand-written catalogs may leave empty ones out
    for key in ("entries", "data", "user_parameters", "aliases", "metadata"):
        if doc.get(key) is None:
            doc[key] = {}
    for section in ("entries", "data"):
        for item in doc[section].values():
            if isinstance(item, dict):
                for key in ("kwargs", "metadata", "user_parameters"):
                    if item.get(key) is None:
                        item[key] = {}
    for item in doc["entries"].values():
        if isinstance(item, dict):
            item.setdefault("output_instance", "xarray:Dataset")
    try:
        cat = Catalog.from_dict(doc)
    except Exception as err:  # intake raises assorted errors on malformed catalogs
        raise CatalogError(
            f"catalog {path} is not a valid Intake 2 catalog ({_first_line(err)})"
        ) from err
    # what intake's from_yaml_file sets; a plain directory path keeps local URLs plain
    cat.user_parameters["CATALOG_PATH"] = path
    cat.user_parameters["CATALOG_DIR"] = directory
    cat.user_parameters["STORAGE_OPTIONS"] = storage_options
    names = list(cat.entries) + [a for a in cat.aliases if a not in cat.entries]
    return _Loaded(path, directory, 2, doc, names, cat)


def _entry(cat: _Loaded, name: str) -> CatalogEntry:
    if name not in cat.names:
        raise CatalogError(_unknown_entry(name, cat))
    if cat.version == 2:
        return _entry_v2(cat, name)
    return _entry_v1(cat, name)


def _unknown_entry(name: str, cat: _Loaded) -> str:
    close = difflib.get_close_matches(name, cat.names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(cat.names) or "(none)"
    return f"entry {name!r} is not in catalog {cat.path}; {hint}available entries: {listed}"


def _entry_v2(cat: _Loaded, name: str) -> CatalogEntry:
    description = cat.intake_cat.entries[cat.intake_cat.aliases.get(name, name)]
    if description.reader != _V2_READER:
        raise CatalogError(
            f"entry {name!r} in {cat.path} uses reader {description.reader}; cube-engine "
            f"opens {_V2_READER} entries"
        )
    try:
        reader = cat.intake_cat[name]
        data = reader.data
    except Exception as err:
        raise CatalogError(
            f"entry {name!r} in {cat.path} cannot be resolved ({_first_line(err)})"
        ) from err
    kind = type(data).__name__
    if kind not in _V2_DATATYPES:
        raise CatalogError(
            f"entry {name!r} in {cat.path} has datatype {kind}; use one of "
            + ", ".join(_V2_DATATYPES)
        )
    fmt, engine = _V2_DATATYPES[kind]
    kwargs = {
        k: v for k, v in reader.kwargs.items() if k not in ("args", "data", "output_instance")
    }
    kwargs.pop("metadata", None)
    root = getattr(data, "root", None) or ""
    if fmt == "zarr" and root:
        kwargs.setdefault("group", root)
    url = data.url[0] if isinstance(data.url, list | tuple) and len(data.url) == 1 else data.url
    if not isinstance(url, str):
        raise CatalogError(f"entry {name!r} in {cat.path} names several files; give one store")
    metadata = dict(description.metadata or {})
    return CatalogEntry(
        name=name,
        catalog=cat.path,
        url=_resolve(url, cat.directory),
        format=fmt,
        engine=kwargs.pop("engine", engine),
        storage_options=dict(data.storage_options or {}),
        open_kwargs=kwargs,
        chunks=_entry_chunks(kwargs.pop("chunks", None), name, cat.path),
        description=str(metadata.get("description", "")),
        metadata=metadata,
        version=2,
    )


def _entry_v1(cat: _Loaded, name: str) -> CatalogEntry:
    source = cat.doc["sources"][name] or {}
    driver = str(source.get("driver", ""))
    if driver not in _V1_DRIVERS:
        raise CatalogError(
            f"entry {name!r} in {cat.path} uses driver {driver!r}; cube-engine reads V1 "
            "drivers " + ", ".join(sorted(_V1_DRIVERS))
        )
    fmt = _V1_DRIVERS[driver]
    params = {
        **_v1_parameters(cat.doc.get("user_parameters")),
        **_v1_parameters(source.get("parameters")),
    }
    params["CATALOG_DIR"] = cat.directory
    args = _render(dict(source.get("args") or {}), params, name, cat.path)
    url = args.pop("urlpath", None)
    if not isinstance(url, str):
        raise CatalogError(f"entry {name!r} in {cat.path} has no single 'urlpath' in its args")
    storage_options = dict(args.pop("storage_options", None) or {})
    args.pop("metadata", None)
    # NetCDFSource keeps xarray's arguments under xarray_kwargs; ZarrSource passes them flat
    kwargs = {**args.pop("xarray_kwargs", {}), **args}
    for unsupported in ("combine", "concat_dim", "path_as_pattern"):
        kwargs.pop(unsupported, None)
    metadata = dict(source.get("metadata") or {})
    description = str(source.get("description", "") or metadata.get("description", ""))
    return CatalogEntry(
        name=name,
        catalog=cat.path,
        url=_resolve(url, cat.directory),
        format=fmt,
        engine=kwargs.pop("engine", "zarr" if fmt == "zarr" else None),
        storage_options=storage_options,
        open_kwargs=kwargs,
        chunks=_entry_chunks(kwargs.pop("chunks", None), name, cat.path),
        description=description,
        metadata=metadata,
        version=1,
        reader=driver,
    )


def _v1_parameters(params: Any) -> dict[str, Any]:
    out = {}
    for key, value in (params or {}).items():
        out[str(key)] = value.get("default") if isinstance(value, dict) else value
    return out


_JINJA = re.compile(r"{{\s*(.*?)\s*}}")
_ENV = re.compile(r"env\(\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)['\"]?\s*\)")


def _render(value: Any, params: Mapping[str, Any], name: str, path: str) -> Any:
    """Substitute V1 ``{{ ... }}`` templates (parameters, CATALOG_DIR, env(NAME))."""
    if isinstance(value, dict):
        return {k: _render(v, params, name, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, params, name, path) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        expr = match.group(1)
        env = _ENV.fullmatch(expr)
        if env:
            return os.environ.get(env.group(1), "")
        if expr in params:
            return str(params[expr])
        raise CatalogError(
            f"entry {name!r} in {path} uses template {{{{ {expr} }}}}, which is not a "
            "parameter, CATALOG_DIR or env(NAME)"
        )

    whole = _JINJA.fullmatch(value.strip())
    if whole and whole.group(1) in params:  # keep the parameter's own type (int, bool ...)
        return params[whole.group(1)]
    return _JINJA.sub(one, value)


def _entry_chunks(value: Any, name: str, path: str) -> dict[str, int] | None:
    """Entry chunks: a mapping, or None for intake's ``{}`` / ``auto`` / absent."""
    if value is None or value == {} or value == "auto":
        return None
    if not isinstance(value, dict) or not all(
        isinstance(v, int) and (v > 0 or v == -1) for v in value.values()
    ):
        raise CatalogError(
            f"entry {name!r} in {path}: chunks must map dims to positive sizes (or -1), "
            f"got {value!r}"
        )
    return {_canonical(str(k)): int(v) for k, v in value.items()}


# ----------------------------------------------------------------------- opening the data


def _open_lazy(
    spec: CatalogEntry,
    storage_options: Mapping[str, Any] | None,
    open_kwargs: Mapping[str, Any],
) -> xr.Dataset:
    """Open without dask (lazy backend arrays) and rename dims to the canonical names."""
    so = {**spec.storage_options, **(storage_options or {})}
    kwargs = {**spec.open_kwargs, **open_kwargs}
    kwargs.pop("chunks", None)
    engine = kwargs.pop("engine", spec.engine)
    target: Any = spec.url
    try:
        if spec.format == "zarr":
            if so:
                kwargs["storage_options"] = so
        elif _protocol(spec.url) != "file":
            target = fsspec.open(spec.url, "rb", **so).open()
        ds = xr.open_dataset(target, engine=engine, chunks=None, **kwargs)
    except Exception as err:  # backends raise their own types (botocore, zarr, h5py ...)
        raise CatalogError(
            f"cannot open entry {spec.name!r} at {spec.url}: {_first_line(err)}; check its "
            f"url and arguments in {spec.catalog}"
        ) from err
    return _canonical_dims(ds)


def _canonical_dims(ds: xr.Dataset) -> xr.Dataset:
    renames = {}
    for dim in ds.dims:
        target = _canonical(str(dim))
        if target != dim and target not in ds.variables and target not in ds.dims:
            renames[dim] = target
    return ds.rename(renames) if renames else ds


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


def _select(ds: xr.Dataset, sel: Mapping[str, Any], entry: str) -> xr.Dataset:
    for dim in sel:
        if dim not in ds.dims:
            raise CubeError(
                f"dimension {dim!r} in sel is not in cube {entry!r}; dims: "
                + ", ".join(map(str, ds.dims))
            )
    return ds.sel(dict(sel))


def _plan(
    ds: xr.Dataset, storage: Mapping[str, int], wanted: Chunks, target_mb: float | None
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
    for dim, size in wanted.items():
        dim = _canonical(str(dim))
        if dim not in sizes:
            raise CubeError(
                f"chunks names dimension {dim!r}, not in the cube; dims: " + ", ".join(sizes)
            )
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
    item = getattr(value, "item", None)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return item() if callable(item) else value


# ------------------------------------------------------------------------------ paths etc.


def _protocol(url: str) -> str:
    if "::" in url:
        url = url.split("::")[-1]
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
        return url.split("://", 1)[0]
    return "file"


def _absolute(path: str) -> str:
    if _protocol(path) == "file":
        if path.startswith("file://"):
            path = path[len("file://") :]
        return os.path.abspath(os.path.expanduser(path))
    return path


def _parent(path: str) -> str:
    if _protocol(path) == "file":
        return os.path.dirname(path)
    return path.rsplit("/", 1)[0]


def _resolve(url: str, directory: str) -> str:
    """Absolute path or URL: relative paths are taken relative to the catalog directory."""
    if "::" in url or _protocol(url) != "file":
        return url
    if url.startswith("file://"):
        url = url[len("file://") :]
    url = os.path.expanduser(url)
    if os.path.isabs(url):
        return os.path.normpath(url)
    if _protocol(directory) == "file":
        return os.path.normpath(os.path.join(directory, url))
    return f"{directory.rstrip('/')}/{url}"


def _redact(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            out[key] = _redact(value)
        elif key.lower() in _SECRET_KEYS and value:
            out[key] = "***"
        else:
            out[key] = value
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
