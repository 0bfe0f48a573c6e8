"""Intake catalogs parsed as data: nothing a catalog says is imported, called or unpickled.

Intake itself turns a catalog into objects: it imports and calls the ``module:callable``
that a ``datatype:``, ``reader:`` or user parameter ``cls:`` names, with the catalog's
arguments, and fills ``{data(...)}``, ``{func(...)}``, ``{import(...)}`` and
``{pickle64(...)}`` templates anywhere in an entry. A catalog is data someone else wrote,
so cube-engine never hands one to intake (this module does not import it). It reads both
flavours itself, against allow-lists, and refuses anything else with one line
(:class:`~engine.errors.CatalogError`) before any data is touched:

* **Intake 2** (``version: 2``): ``datatype`` one of :data:`V2_DATATYPES` (intake's
  ``Zarr``, ``NetCDF3``, ``HDF5``), ``reader`` one of :data:`V2_READERS`
  (``XArrayDatasetReader``), the entry's data given as ``args: ['{data(TOKEN)}']`` or
  ``data: '{data(TOKEN)}'`` naming an item of ``data:``; the reader's other arguments one
  of :data:`OPEN_KWARGS`.
* **Intake V1** (``sources:``): ``driver`` one of :data:`V1_DRIVERS`; ``plugins:`` refused.

Templates filled in: ``{CATALOG_DIR}`` / ``{CATALOG_PATH}``, user parameters with plain
defaults (``{name}``), and ``{env(NAME)}`` only for names allowed by the caller
(``allow_env=``) or by ``engine.catalog.allow-env``; V1 spells them ``{{ ... }}``.
``{data(...)}`` is only accepted where an entry names its data. Metadata is never filled
in, and ``data``/``func``/``import``/``pickle64`` templates there are refused too (plain
intake would run them).

A catalog read from a remote URL (``s3://``, ``https://``, ``memory://`` ...) may not name
local files (a plain path, ``file://``, ``local://``, or a chained or wrapped URL reaching
them) unless ``allow_local=True`` or ``engine.catalog.allow-local-from-remote`` is set.
Relative URLs resolve against the catalog's directory, with ``..`` resolved.

Everything shown, persisted or raised goes through :mod:`engine.redact`; values that came
from environment variables are shown as their ``{env(NAME)}`` template.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import dask.config
import fsspec

from engine.errors import CatalogError
from engine.io.catalog_urls import absolute, first_line, is_local, local_target, parent, resolve
from engine.io.yaml_safe import MAX_BYTES, load_yaml
from engine.redact import redact, redact_options, redact_text, redact_url

__all__ = [
    "CatalogEntry",
    "ParsedCatalog",
    "read_catalog",
    "V2_DATATYPES",
    "V2_READERS",
    "V1_DRIVERS",
    "OPEN_KWARGS",
]

Format = Literal["zarr", "netcdf"]

#: Intake 2 datatypes that name a file or store: (format, default xarray engine, kwargs).
V2_DATATYPES: dict[str, tuple[Format, str, frozenset[str]]] = {
    "intake.readers.datatypes:Zarr": (
        "zarr",
        "zarr",
        frozenset({"url", "storage_options", "root"}),
    ),
    "intake.readers.datatypes:NetCDF3": ("netcdf", "scipy", frozenset({"url", "storage_options"})),
    "intake.readers.datatypes:HDF5": (
        "netcdf",
        "h5netcdf",
        frozenset({"url", "storage_options", "path"}),
    ),
}
#: Intake 2 readers the engine opens (always with its own xarray call).
V2_READERS = frozenset({"intake.readers.readers:XArrayDatasetReader"})
#: Intake V1 drivers, read without intake-xarray.
V1_DRIVERS: dict[str, Format] = {
    "zarr": "zarr",
    "intake_xarray.xzarr.ZarrSource": "zarr",
    "intake_xarray.ZarrSource": "zarr",
    "netcdf": "netcdf",
    "intake_xarray.netcdf.NetCDFSource": "netcdf",
    "intake_xarray.NetCDFSource": "netcdf",
}
#: Arguments an entry may pass to :func:`xarray.open_dataset` (plain data only).
OPEN_KWARGS = frozenset(
    {
        "chunks",
        "engine",
        "consolidated",
        "group",
        "zarr_format",
        "zarr_version",
        "decode_cf",
        "decode_times",
        "decode_timedelta",
        "decode_coords",
        "mask_and_scale",
        "use_cftime",
        "concat_characters",
        "drop_variables",
        "inline_array",
        "cache",
        "use_zarr_fill_value_as_mask",
    }
)
#: xarray backends an entry may name.
ENGINES = frozenset({"zarr", "scipy", "h5netcdf", "netcdf4"})

_V2_KEYS = frozenset({"version", "metadata", "user_parameters", "aliases", "data", "entries"})
_V2_DATA_KEYS = frozenset({"datatype", "kwargs", "metadata", "user_parameters"})
_V2_ENTRY_KEYS = frozenset({"reader", "kwargs", "metadata", "user_parameters", "output_instance"})
_V1_KEYS = frozenset({"metadata", "sources", "user_parameters", "description", "name", "version"})
_V1_SOURCE_KEYS = frozenset(
    {"driver", "description", "args", "metadata", "parameters", "direct_access", "cache"}
)
_V1_DROPPED = frozenset({"combine", "concat_dim", "path_as_pattern", "metadata"})
_UP_KEYS = frozenset(
    {"default", "description", "dtype", "type", "options", "min", "max", "allowed", "cls"}
)
_UP_CLASSES = frozenset(
    f"intake.readers.user_parameters:{c}"
    for c in (
        "SimpleUserParameter",
        "OptionsUserParameter",
        "MultiOptionUserParameter",
        "BoundedNumberUserParameter",
    )
)

_DATA_REF = re.compile(r"\{data\(\s*([^()\s,]+)\s*\)\}")
_CODE_REF = re.compile(r"\{\s*(data|func|import|pickle64)\s*\(")
_V2_TEMPLATE = re.compile(r"\{([^{}]*)\}")
_V1_TEMPLATE = re.compile(r"{{\s*(.*?)\s*}}")
_ENV = re.compile(r"env\(\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)['\"]?\s*\)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _fail(msg: str) -> CatalogError:
    """A one-line, redacted CatalogError."""
    return CatalogError(" ".join(redact_text(msg).split()))


@dataclass(frozen=True)
class CatalogEntry:
    """One catalog entry, normalised from either YAML flavour.

    Holds the real URL and storage options (the ones data are opened with); everything
    meant for people or files (:meth:`to_dict`, ``repr``) is redacted.

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
        The entry's chunks, keys as the catalog spells them (a canonical name, an alias
        or the store's own name), or None when the entry leaves them to the engine.
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
    reader: str = "intake.readers.readers:XArrayDatasetReader"
    #: values that came from environment variables, by name (never shown)
    env: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def scrub(self, text: str) -> str:
        """``text`` with URLs redacted and environment values shown as their template."""
        for name, value in sorted(self.env.items(), key=lambda kv: -len(kv[1])):
            if len(value) >= 3:
                text = text.replace(value, f"{{env({name})}}")
        return redact_text(text)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view for listings and provenance: redacted, nothing from ``env``."""
        options = redact_options(self.storage_options)
        return {
            "name": self.name,
            "description": self.scrub(self.description),
            "url": redact_url(self.scrub(self.url)),
            "format": self.format,
            "engine": self.engine,
            "storage_options": _scrub_obj(options, self),
            "chunks": self.chunks,
            "catalog_version": self.version,
            "reader": self.reader,
            "metadata": redact(self.metadata),
        }

    summary = to_dict

    def __repr__(self) -> str:
        shown = self.to_dict()
        return (
            f"CatalogEntry(name={self.name!r}, catalog={redact_url(self.catalog)!r}, "
            f"url={shown['url']!r}, format={self.format!r}, engine={self.engine!r}, "
            f"storage_options={shown['storage_options']!r})"
        )


def _scrub_obj(obj: Any, entry: CatalogEntry) -> Any:
    if isinstance(obj, Mapping):
        return {k: _scrub_obj(v, entry) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub_obj(v, entry) for v in obj]
    return entry.scrub(obj) if isinstance(obj, str) else obj


@dataclass
class ParsedCatalog:
    """A catalog file, checked as a whole; :meth:`entry` resolves one entry."""

    path: str  # absolute path or URL of the catalog file
    directory: str  # its directory, same form
    version: int
    doc: dict[str, Any]
    names: list[str]
    allow_env: frozenset[str]
    allow_local: bool

    @property
    def remote(self) -> bool:
        return not is_local(self.path)

    @property
    def shown(self) -> str:
        return redact_url(self.path)

    def entry(self, name: str) -> CatalogEntry:
        if name not in self.names:
            raise _fail(self._unknown(name))
        entry = _entry_v2(self, name) if self.version == 2 else _entry_v1(self, name)
        self._check_local(entry)
        return entry

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listed = ", ".join(self.names) or "(none)"
        return f"entry {name!r} is not in catalog {self.shown}; {hint}available entries: {listed}"

    def _check_local(self, entry: CatalogEntry) -> None:
        if not self.remote or self.allow_local:
            return
        reached = local_target(entry.url, entry.storage_options)
        if reached is not None:
            raise _fail(
                f"entry {entry.name!r} in remote catalog {self.shown} points at local data "
                f"({entry.scrub(reached)}); a remote catalog may not open local files: pass "
                "allow_local=True or set engine.catalog.allow-local-from-remote if you "
                "trust it"
            )


# --------------------------------------------------------------------------- loading


def read_catalog(
    catalog: str | os.PathLike,
    storage_options: Mapping[str, Any] | None = None,
    *,
    allow_env: Iterable[str] | None = None,
    allow_local: bool | None = None,
) -> ParsedCatalog:
    """Read and check a whole catalog file (YAML only; no data store is touched).

    ``allow_env`` (names of environment variables that templates may read) and
    ``allow_local`` (whether a remote catalog may name local files) default to
    ``engine.catalog.allow-env`` (``[]``) and ``engine.catalog.allow-local-from-remote``
    (``False``).
    """
    path = absolute(os.fspath(catalog))
    shown = redact_url(path)
    if allow_env is None:
        allow_env = dask.config.get("engine.catalog.allow-env", None) or []
    if isinstance(allow_env, str):
        allow_env = [allow_env]
    if allow_local is None:
        allow_local = bool(dask.config.get("engine.catalog.allow-local-from-remote", False))
    try:
        with fsspec.open(path, "rb", **dict(storage_options or {})) as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise _fail(
            f"catalog file not found: {shown}; pass the path of an Intake YAML catalog, "
            "e.g. catalogs/demo.yaml"
        ) from None
    except IsADirectoryError:
        raise _fail(f"catalog {shown} is a directory; pass the path of a YAML file") from None
    except (OSError, ValueError, ImportError) as err:
        raise _fail(f"cannot read catalog {shown}: {first_line(err)}") from None
    doc = load_yaml(raw, f"catalog {shown}", error=CatalogError)
    directory = parent(path)
    policy = (frozenset(map(str, allow_env)), bool(allow_local))
    if isinstance(doc, dict) and doc.get("version") == 2:
        names = _check_v2(doc, shown)
        return ParsedCatalog(path, directory, 2, doc, names, *policy)
    if isinstance(doc, dict) and isinstance(doc.get("sources"), dict):
        names = _check_v1(doc, shown)
        return ParsedCatalog(path, directory, 1, doc, names, *policy)
    raise _fail(
        f"{shown} is not an Intake catalog: expected 'version: 2' with 'entries:', "
        "or a V1 'sources:' mapping"
    )


def _mapping(value: Any, what: str, shown: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"catalog {shown}: {what} must be a mapping, got {type(value).__name__}")
    return value


def _only(keys: Iterable[Any], allowed: frozenset[str], what: str, shown: str) -> None:
    extra = sorted(str(k) for k in keys if k not in allowed)
    if extra:
        raise _fail(
            f"catalog {shown}: {what} has unknown key {extra[0]!r}; allowed: "
            + ", ".join(sorted(allowed))
        )


def _no_code_refs(value: Any, where: str, shown: str, *, allow_data: bool = False) -> None:
    """Refuse func/import/pickle64 templates anywhere in ``value``, and data(...) unless
    ``allow_data`` (an entry's kwargs, where :func:`_data_token` checks it)."""
    for text in _strings(value):
        for m in _CODE_REF.finditer(text):
            if allow_data and m.group(1) == "data":
                continue
            raise _fail(
                f"catalog {shown}: {where} contains a {{{m.group(1)}(...)}} template; "
                "cube-engine resolves {data(TOKEN)} only as an entry's data "
                "and never imports or unpickles what a catalog names"
            )


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _check_user_parameters(ups: Any, where: str, shown: str) -> dict[str, Any]:
    """User parameters as ``{name: default}``; ``cls`` only naming intake's own classes."""
    out: dict[str, Any] = {}
    for name, up in _mapping(ups, f"{where} user_parameters", shown).items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _fail(
                f"catalog {shown}: user parameter name {name!r} in {where} is not "
                "a plain identifier"
            )
        if isinstance(up, dict):
            _only(up, _UP_KEYS, f"user parameter {name!r} in {where}", shown)
            if "cls" in up and up["cls"] not in _UP_CLASSES:
                raise _fail(
                    f"catalog {shown}: user parameter {name!r} in {where} names class "
                    f"{up['cls']!r}; only intake's own user parameter classes are "
                    "accepted"
                )
            default = up.get("default")
        else:
            default = up
        plain = (str, int, float, bool, type(None))
        if not isinstance(default, plain) and not (
            isinstance(default, list) and all(isinstance(v, plain) for v in default)
        ):
            raise _fail(
                f"catalog {shown}: user parameter {name!r} in {where} must have a "
                "plain default (string, number, boolean or a list of them)"
            )
        _no_code_refs(default, f"user parameter {name!r}", shown)
        out[name] = default
    return out


def _check_v2(doc: dict[str, Any], shown: str) -> list[str]:
    """Check the whole document: whatever could make plain intake import or run something
    refuses the catalog; an intake class the engine does not open fails only its entry."""
    _only(doc, _V2_KEYS, "the top level", shown)
    _no_code_refs(doc.get("metadata"), "the catalog metadata", shown)
    _check_user_parameters(doc.get("user_parameters"), "the catalog", shown)
    data = _mapping(doc.get("data"), "data", shown)
    entries = _mapping(doc.get("entries"), "entries", shown)
    for token, item in data.items():
        where = f"data item {token!r}"
        item = _mapping(item, where, shown)
        _only(item, _V2_DATA_KEYS, where, shown)
        datatype = item.get("datatype")
        _intake_class(datatype, _INTAKE_DATATYPE, V2_DATATYPES, f"{where} datatype", shown)
        kwargs = _mapping(item.get("kwargs"), f"{where} kwargs", shown)
        if datatype in V2_DATATYPES:
            _only(kwargs, V2_DATATYPES[datatype][2] | {"metadata"}, f"{where} kwargs", shown)
        _no_code_refs(kwargs, f"{where} kwargs", shown)
        _no_code_refs(item.get("metadata"), f"{where} metadata", shown)
        _check_user_parameters(item.get("user_parameters"), where, shown)
    for name, entry in entries.items():
        where = f"entry {name!r}"
        entry = _mapping(entry, where, shown)
        _only(entry, _V2_ENTRY_KEYS, where, shown)
        reader = entry.get("reader")
        _intake_class(reader, _INTAKE_READER, V2_READERS, f"{where} reader", shown)
        _no_code_refs(entry.get("kwargs"), f"{where} kwargs", shown, allow_data=True)
        _no_code_refs(entry.get("metadata"), f"{where} metadata", shown)
        _check_user_parameters(entry.get("user_parameters"), where, shown)
        if reader in V2_READERS:
            _data_token(name, entry, data, shown)  # the one reference, checked now
    aliases = _mapping(doc.get("aliases"), "aliases", shown)
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in entries:
            raise _fail(f"catalog {shown}: alias {alias!r} must name an entry, got {target!r}")
    return [str(n) for n in entries] + [str(a) for a in aliases if a not in entries]


_INTAKE_DATATYPE = re.compile(r"intake\.readers\.datatypes:[A-Za-z_][A-Za-z0-9_]*")
_INTAKE_READER = re.compile(r"intake\.readers\.readers:[A-Za-z_][A-Za-z0-9_]*")


def _intake_class(
    name: Any, pattern: re.Pattern[str], supported: Iterable[str], where: str, shown: str
) -> None:
    """Refuse the catalog when ``name`` is not one of intake's own datatype/reader classes
    (``os:system``, ``dask.config:set``, ``torch.hub:load`` ...)."""
    if isinstance(name, str) and (name in supported or pattern.fullmatch(name)):
        return
    raise _fail(
        f"catalog {shown}: {where} is {name!r}, which is not an intake class cube-engine "
        "reads (it would be imported and called); use " + ", ".join(sorted(supported))
    )


def _supported_v2(cat: ParsedCatalog, name: str, entry: dict[str, Any]) -> None:
    reader = entry.get("reader")
    if reader not in V2_READERS:
        raise _fail(
            f"entry {name!r} in {cat.shown} uses reader {reader}; cube-engine opens "
            + ", ".join(sorted(V2_READERS))
            + " entries"
        )
    if entry.get("output_instance", "xarray:Dataset") != "xarray:Dataset":
        raise _fail(
            f"entry {name!r} in {cat.shown} has output_instance "
            f"{entry['output_instance']!r}; use xarray:Dataset"
        )


def _data_token(name: str, entry: dict[str, Any], data: dict[str, Any], shown: str) -> str:
    """The ``data:`` token an entry reads: ``args: ['{data(T)}']`` or ``data: '{data(T)}'``.

    Every other ``{data(...)}``/``{func(...)}``/... in the entry is refused.
    """
    where = f"entry {name!r}"
    kwargs = dict(_mapping(entry.get("kwargs"), f"{where} kwargs", shown))
    args = kwargs.pop("args", None)
    ref = kwargs.pop("data", None)
    if args is not None:
        if ref is not None or not isinstance(args, list) or len(args) != 1:
            raise _fail(
                f"catalog {shown}: {where} must name its data once, as args: ['{{data(TOKEN)}}']"
            )
        ref = args[0]
    m = _DATA_REF.fullmatch(ref) if isinstance(ref, str) else None
    if m is None:
        raise _fail(
            f"catalog {shown}: {where} must name its data as args: ['{{data(TOKEN)}}'] "
            f"with TOKEN an item of data:, got {ref!r}"
        )
    token = m.group(1)
    if token not in data:
        raise _fail(
            f"catalog {shown}: {where} reads data({token}), which is not an item of "
            "data: (readers are not chained)"
        )
    _only(kwargs, OPEN_KWARGS, f"{where} kwargs", shown)
    _no_code_refs(kwargs, f"{where} kwargs", shown)
    engine = kwargs.get("engine")
    if engine is not None and engine not in ENGINES:
        raise _fail(
            f"catalog {shown}: {where} names engine {engine!r}; use one of "
            + ", ".join(sorted(ENGINES))
        )
    return token


def _check_v1(doc: dict[str, Any], shown: str) -> list[str]:
    if "plugins" in doc:
        raise _fail(
            f"catalog {shown}: V1 'plugins:' would import code; cube-engine loads "
            "no plugins: remove the section"
        )
    _only(doc, _V1_KEYS, "the top level", shown)
    for name, source in doc["sources"].items():
        source = _mapping(source, f"source {name!r}", shown)
        _no_code_refs(source, f"source {name!r}", shown)
    _check_user_parameters(doc.get("user_parameters"), "the catalog", shown)
    return [str(n) for n in doc["sources"]]


def _supported_v1(cat: ParsedCatalog, name: str, source: dict[str, Any]) -> None:
    where, shown = f"source {name!r}", cat.shown
    _only(source, _V1_SOURCE_KEYS, where, shown)
    driver = source.get("driver")
    if driver not in V1_DRIVERS:
        raise _fail(
            f"entry {name!r} in {shown} uses driver {driver!r}; cube-engine reads "
            "V1 drivers " + ", ".join(sorted(V1_DRIVERS))
        )
    args = _mapping(source.get("args"), f"{where} args", shown)
    allowed = OPEN_KWARGS | _V1_DROPPED | {"urlpath", "storage_options", "xarray_kwargs"}
    _only(args, allowed, f"{where} args", shown)
    xkw = _mapping(args.get("xarray_kwargs"), f"{where} xarray_kwargs", shown)
    _only(xkw, OPEN_KWARGS, f"{where} xarray_kwargs", shown)


# --------------------------------------------------------------------------- templates


@dataclass
class _Context:
    cat: ParsedCatalog
    entry: str
    params: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    def env_value(self, name: str) -> str:
        if name not in self.cat.allow_env:
            raise _fail(
                f"entry {self.entry!r} in {self.cat.shown} reads environment variable {name}, "
                f"which is not allowed: pass allow_env=[{name!r}] or add {name} to "
                "engine.catalog.allow-env if the catalog may read it"
            )
        value = os.environ.get(name)
        if value is None:
            raise _fail(
                f"entry {self.entry!r} in {self.cat.shown} reads environment variable "
                f"{name}, which is not set; set it or change the catalog"
            )
        self.env[name] = value
        return value

    def param(self, name: str, pattern: re.Pattern[str]) -> Any:
        """A user parameter's default, its own templates filled with CATALOG_DIR/PATH and
        env only (one level: parameters naming parameters cannot loop or multiply)."""
        base = _Context(self.cat, self.entry, _base_params(self.cat), self.env)
        return _render(self.params[name], base, pattern)


def _render(value: Any, ctx: _Context, pattern: re.Pattern[str]) -> Any:
    """Fill ``{...}`` (V2) or ``{{ ... }}`` (V1) templates: parameters, CATALOG_DIR, env."""
    if isinstance(value, dict):
        return {k: _render(v, ctx, pattern) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, ctx, pattern) for v in value]
    if not isinstance(value, str):
        return value
    whole = pattern.fullmatch(value.strip())
    if whole and whole.group(1).strip() in ctx.params:  # keep the parameter's type
        return ctx.param(whole.group(1).strip(), pattern)

    def one(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        env = _ENV.fullmatch(expr)
        if env:
            return ctx.env_value(env.group(1))
        if expr in ctx.params:
            return str(ctx.param(expr, pattern))
        shown = "{{ " + expr + " }}" if pattern is _V1_TEMPLATE else "{" + expr + "}"
        raise _fail(
            f"entry {ctx.entry!r} in {ctx.cat.shown} uses template {shown}, which is not a "
            "parameter, CATALOG_DIR or env(NAME)"
        )

    return pattern.sub(one, value)


def _base_params(cat: ParsedCatalog) -> dict[str, Any]:
    return {"CATALOG_DIR": cat.directory, "CATALOG_PATH": cat.path}


# ------------------------------------------------------------------------------ entries


def _entry_v2(cat: ParsedCatalog, name: str) -> CatalogEntry:
    doc = cat.doc
    entries = doc.get("entries") or {}
    real = name if name in entries else (doc.get("aliases") or {})[name]
    entry = entries[real] or {}
    _supported_v2(cat, name, entry)
    token = _data_token(real, entry, doc.get("data") or {}, cat.shown)
    item = doc["data"][token] or {}
    if item.get("datatype") not in V2_DATATYPES:
        raise _fail(
            f"entry {name!r} in {cat.shown} reads data of datatype {item.get('datatype')}; "
            "cube-engine reads " + ", ".join(V2_DATATYPES)
        )
    fmt, default_engine, _ = V2_DATATYPES[item["datatype"]]
    params = {
        **_check_user_parameters(doc.get("user_parameters"), "the catalog", cat.shown),
        **_check_user_parameters(item.get("user_parameters"), f"data item {token!r}", cat.shown),
        **_check_user_parameters(entry.get("user_parameters"), f"entry {real!r}", cat.shown),
        **_base_params(cat),
    }
    ctx = _Context(cat, name, params)
    data_kwargs = _render(dict(item.get("kwargs") or {}), ctx, _V2_TEMPLATE)
    kwargs = {k: v for k, v in (entry.get("kwargs") or {}).items() if k not in ("args", "data")}
    kwargs = _render(kwargs, ctx, _V2_TEMPLATE)
    url = data_kwargs.get("url")
    if isinstance(url, list) and len(url) == 1:
        url = url[0]
    if not isinstance(url, str) or not url:
        raise _fail(
            f"entry {name!r} in {cat.shown}: data item {token!r} must give one url "
            "(a single store or file)"
        )
    if fmt == "zarr" and data_kwargs.get("root"):
        kwargs.setdefault("group", data_kwargs["root"])
    if item["datatype"].endswith(":HDF5") and data_kwargs.get("path"):
        kwargs.setdefault("group", data_kwargs["path"])
    metadata = dict(entry.get("metadata") or {})
    return CatalogEntry(
        name=name,
        catalog=cat.path,
        url=resolve(url, cat.directory),
        format=fmt,
        engine=kwargs.pop("engine", default_engine),
        storage_options=_options(data_kwargs.get("storage_options"), name, cat),
        open_kwargs=kwargs,
        chunks=_entry_chunks(kwargs.pop("chunks", None), name, cat.shown),
        description=str(metadata.get("description", "") or ""),
        metadata=metadata,
        version=2,
        reader=str(entry["reader"]),
        env=dict(ctx.env),
    )


def _entry_v1(cat: ParsedCatalog, name: str) -> CatalogEntry:
    source = cat.doc["sources"][name] or {}
    _supported_v1(cat, name, source)
    driver = str(source["driver"])
    fmt = V1_DRIVERS[driver]
    params = {
        **_check_user_parameters(cat.doc.get("user_parameters"), "the catalog", cat.shown),
        **_check_user_parameters(source.get("parameters"), f"source {name!r}", cat.shown),
        **_base_params(cat),
    }
    ctx = _Context(cat, name, params)
    args = _render(dict(source.get("args") or {}), ctx, _V1_TEMPLATE)
    url = args.pop("urlpath", None)
    if not isinstance(url, str):
        raise _fail(f"entry {name!r} in {cat.shown} has no single 'urlpath' in its args")
    storage_options = _options(args.pop("storage_options", None), name, cat)
    # NetCDFSource keeps xarray's arguments under xarray_kwargs; ZarrSource passes them flat
    kwargs = {**(args.pop("xarray_kwargs", None) or {}), **args}
    for dropped in _V1_DROPPED:
        kwargs.pop(dropped, None)
    engine = kwargs.pop("engine", "zarr" if fmt == "zarr" else None)
    if engine is not None and engine not in ENGINES:
        raise _fail(
            f"entry {name!r} in {cat.shown} names engine {engine!r}; use one of "
            + ", ".join(sorted(ENGINES))
        )
    metadata = dict(source.get("metadata") or {})
    description = str(source.get("description", "") or metadata.get("description", "") or "")
    return CatalogEntry(
        name=name,
        catalog=cat.path,
        url=resolve(url, cat.directory),
        format=fmt,
        engine=engine,
        storage_options=storage_options,
        open_kwargs=kwargs,
        chunks=_entry_chunks(kwargs.pop("chunks", None), name, cat.shown),
        description=description,
        metadata=metadata,
        version=1,
        reader=driver,
        env=dict(ctx.env),
    )


def _options(value: Any, name: str, cat: ParsedCatalog) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"entry {name!r} in {cat.shown}: storage_options must be a mapping")
    return dict(value)


def _entry_chunks(value: Any, name: str, shown: str) -> dict[str, int] | None:
    """Entry chunks: a mapping, or None for intake's ``{}`` / ``auto`` / absent."""
    if value is None or value == {} or value == "auto":
        return None
    if not isinstance(value, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and (v > 0 or v == -1)
        for v in value.values()
    ):
        raise _fail(
            f"entry {name!r} in {shown}: chunks must map dims to positive sizes "
            f"(or -1), got {value!r}"
        )
    return {str(k): int(v) for k, v in value.items()}
