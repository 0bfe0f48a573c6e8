"""fsspec URL helpers shared by the writer and the readers.

A store is named by a URL (bare local path, ``file://``, ``s3://``, ``gs://``,
``memory://``) plus ``storage_options`` (credentials, endpoint). These helpers turn that
pair into a filesystem, a root path inside it, or a zarr store, the same way on the
client and on every worker.

Storage options never travel inside tasks: :func:`share_options` registers them in a
per-process registry (on a cluster through a worker plugin, so restarted workers get them
too) under a reference that carries no secret, and tasks resolve that reference with
:func:`resolve_options` where they run.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from engine.errors import StoreError, require
from engine.redact import redact_options

__all__ = [
    "protocol",
    "is_local",
    "is_memory",
    "join_url",
    "filesystem",
    "zarr_store",
    "store_exists",
    "remove_store",
    "put_json",
    "get_json",
    "is_zarr_store",
    "normalize_url",
    "store_identity",
    "share_options",
    "resolve_options",
]


def protocol(url: str) -> str:
    """Return the first protocol of ``url`` (``"file"`` for bare paths).

    Examples
    --------
    >>> protocol("s3://bucket/out.zarr"), protocol("/tmp/out.zarr")
    ('s3', 'file')
    """
    proto = fsspec.utils.get_protocol(str(url))
    return "file" if proto in ("file", "local") else proto


def is_local(url: str) -> bool:
    """True for bare paths and ``file://`` URLs."""
    return protocol(url) == "file"


def is_memory(url: str) -> bool:
    """True for ``memory://`` URLs (visible only inside the process that wrote them)."""
    return protocol(url) == "memory"


def join_url(url: str, *parts: str) -> str:
    """Join path parts onto a store URL with ``/`` (also for local paths)."""
    base = str(url).rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts)])


def _local_path(url: str) -> str:
    path = str(url)
    if path.startswith("file://"):
        path = path[len("file://") :]
    return os.path.abspath(os.path.expanduser(path))


#: Protocols whose filesystem ships in an extra: protocol -> (module, extra).
_EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
}


def filesystem(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, root)`` for ``url``: the fsspec filesystem and the path inside it.

    Raises
    ------
    MissingExtraError
        If the protocol's filesystem is in an extra that is not installed.
    StoreError
        If fsspec does not know the protocol.
    """
    if protocol(url) in _EXTRAS:
        require(*_EXTRAS[protocol(url)])
    try:
        if is_local(url):
            return fsspec.filesystem("file"), _local_path(url)
        return url_to_fs(str(url), **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise StoreError(f"cannot open store {url}: {err}; check the URL's protocol") from err


def zarr_store(url: str, storage_options: dict[str, Any] | None = None, *, read_only: bool = False):
    """Return a zarr v3 store for ``url``.

    Local paths become a :class:`zarr.storage.LocalStore` (no fsspec layer); every
    other protocol a :class:`zarr.storage.FsspecStore`, which wraps synchronous
    filesystems such as ``memory://`` in an async adapter as zarr 3 requires.
    """
    from zarr.storage import FsspecStore, LocalStore

    if protocol(url) in _EXTRAS:
        require(*_EXTRAS[protocol(url)])
    if is_local(url):
        return LocalStore(_local_path(url), read_only=read_only)
    try:
        return FsspecStore.from_url(str(url), storage_options=storage_options, read_only=read_only)
    except (ImportError, ValueError) as err:
        raise StoreError(f"cannot open store {url}: {err}; check the URL's protocol") from err


def store_exists(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """True if anything lives at ``root`` (an empty local directory does not count)."""
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return False
    if fs.isfile(root):
        return True
    return len(fs.ls(root, detail=False)) > 0


def remove_store(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Delete the Zarr store at ``root`` (missing is fine).

    A last guard whatever the caller checked: only a folder with Zarr metadata or the
    engine's records at its root is deleted, never the filesystem root, the home folder,
    the current folder or one of its parents.
    """
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return
    if _is_local_fs(fs):
        real = os.path.realpath(root)
        cwd = os.path.realpath(os.getcwd())
        if real in (os.path.realpath(os.sep), os.path.realpath(os.path.expanduser("~"))) or \
                cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
            raise StoreError(f"refusing to delete {root}: it is not an output store")
    if fs.isfile(root) or not (is_zarr_store(fs, root) or fs.exists(f"{root}/.engine")):
        raise StoreError(f"refusing to delete {root}: it is not a Zarr store")
    fs.rm(root, recursive=True)
    fs.invalidate_cache(root)


def _is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def put_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Write ``obj`` as one JSON object (one PUT on object stores)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # local filesystems need the folder
    fs.pipe_file(path, json.dumps(obj, indent=1, default=str).encode())


def get_json(fs: fsspec.AbstractFileSystem, path: str) -> Any | None:
    """Read a JSON object; None when missing or unparsable (e.g. cut short by a kill)."""
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


#: Objects at the root of a directory that make it a Zarr store (v3 or v2).
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")


def is_zarr_store(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """True if ``root`` is a folder holding Zarr metadata at its root."""
    return any(fs.exists(f"{root}/{m}") for m in ZARR_MARKERS)


def normalize_url(url: str) -> str:
    """A comparable form of ``url``: local paths absolute with symlinks, ``..`` and
    ``file://`` resolved; other URLs as ``protocol://path``; no trailing slash.

    >>> normalize_url("file:///tmp/a/../b.zarr/") == normalize_url("/tmp/b.zarr")
    True
    >>> normalize_url("s3://bucket/x.zarr/")
    's3://bucket/x.zarr'
    """
    if is_local(url):
        return os.path.realpath(_local_path(url))
    proto = protocol(url)
    if proto in _EXTRAS:
        require(*_EXTRAS[proto])
    cls = fsspec.get_filesystem_class(proto)
    path = str(cls._strip_protocol(str(url))).rstrip("/")
    return f"{proto}://{path}"


#: Fields of an fsspec ``info`` entry that change with an object's content, best first.
_VERSION_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "checksum", "mtime", "LastModified",
                   "last_modified", "updated", "created")


def store_identity(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """A cheap content identity of an existing store or file, for a write's ``identity``.

    Hashes the listing of every object under ``url`` (relative path, size, and the first
    of ETag / MD5 / CRC32C / modification time the filesystem gives): rewriting, adding
    or removing any object changes it; no object is read.

    Raises
    ------
    StoreError
        If nothing exists at ``url``.

    Examples
    --------
    >>> import fsspec
    >>> fsspec.filesystem("memory").pipe("/doc-identity/a.zarr/zarr.json", b"{}")
    >>> store_identity("memory://doc-identity/a.zarr").startswith("sha256:")
    True
    """
    fs, root = filesystem(url, storage_options)
    fs.invalidate_cache(root)
    try:
        if fs.isfile(root):
            entries = {"": fs.info(root)}
        else:
            entries = {p[len(root):].lstrip("/"): info
                       for p, info in fs.find(root, detail=True).items()}
    except FileNotFoundError:
        entries = {}
    if not entries:
        raise StoreError(f"cannot identify {url}: nothing exists there; check the input URL")
    h = hashlib.sha256()
    for rel in sorted(entries):
        info = entries[rel]
        version = next((str(info[k]) for k in _VERSION_FIELDS if info.get(k) is not None), "")
        h.update(f"{rel}\0{info.get('size')}\0{version}\n".encode())
    return f"sha256:{h.hexdigest()}"


# ------------------------------------------------------------- storage options registry

_OPTIONS: dict[str, dict[str, Any]] = {}
_OPTIONS_LOCK = threading.Lock()


def _register(ref: str, options: Mapping[str, Any]) -> None:
    with _OPTIONS_LOCK:
        _OPTIONS[ref] = dict(options)


def _unregister(ref: str) -> None:
    with _OPTIONS_LOCK:
        _OPTIONS.pop(ref, None)


def resolve_options(ref: str | None) -> dict[str, Any]:
    """The storage options registered in this process under ``ref`` (``{}`` for None).

    Raises
    ------
    StoreError
        If ``ref`` was not registered here (the write that shared it has ended).
    """
    if ref is None:
        return {}
    with _OPTIONS_LOCK:
        options = _OPTIONS.get(ref)
    if options is None:
        raise StoreError(f"storage options {ref} are not registered in this process; "
                         "re-run the write (its options are shared only while it runs)")
    return dict(options)


def _options_plugin_class():
    from distributed.diagnostics.plugin import WorkerPlugin

    class _SharedOptions(WorkerPlugin):
        """Registers one write's storage options in each worker's registry."""

        def __init__(self, ref: str, options: dict[str, Any]):
            self.ref, self.options = ref, options

        def setup(self, worker) -> None:
            _register(self.ref, self.options)

        def teardown(self, worker) -> None:
            _unregister(self.ref)

    return _SharedOptions


@contextmanager
def share_options(options: Mapping[str, Any] | None, client=None) -> Iterator[str | None]:
    """Make ``options`` available to tasks under a reference that holds no secret.

    Yields None for empty options. Otherwise the options are registered in this process
    and, with a ``client``, on every current and future worker of its cluster (a worker
    plugin, so a worker restarted by its nanny has them too); tasks carry only the
    reference (a token of the redacted options plus a nonce) and call
    :func:`resolve_options`. Everything is unregistered on exit.

    >>> with share_options({"key": "id", "secret": "hunter2"}) as ref:
    ...     resolve_options(ref)["secret"], "hunter2" in ref
    ('hunter2', False)
    """
    if not options:
        yield None
        return
    from dask.base import tokenize

    ref = f"engine-options-{tokenize(redact_options(options))[:12]}-{uuid.uuid4().hex[:12]}"
    _register(ref, options)
    registered = False
    try:
        if client is not None:
            client.register_plugin(_options_plugin_class()(ref, dict(options)), name=ref)
            registered = True
        yield ref
    finally:
        _unregister(ref)
        if registered:
            try:
                client.unregister_worker_plugin(ref)
            except Exception:  # a closing cluster: its workers take the options with them
                pass
