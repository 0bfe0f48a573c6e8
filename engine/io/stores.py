"""fsspec URL helpers shared by the writer and the readers.

A store is named by a URL (bare local path, ``file://``, ``s3://``, ``gs://``,
``memory://``) plus ``storage_options`` (credentials, endpoint). These helpers turn that
pair into a filesystem, a root path inside it, or a zarr store, the same way on the
client and on every worker: the options are plain data that travel inside the tasks.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from engine.errors import StoreError, require

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
    """Delete everything under ``root`` (missing is fine)."""
    fs.invalidate_cache(root)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.invalidate_cache(root)


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
