"""Catalog URLs: where a catalog and its data are, and whether that is this machine.

A plain path is local (``file``); so are ``file://`` and ``local://`` URLs. A chained URL
(``simplecache::s3://...``) is local if any link is; ``reference://`` and ``dir://`` reach
whatever their storage options name, so they count as local for a remote catalog unless
allowed. Relative URLs resolve against the catalog's directory with ``.``/``..`` resolved,
keeping a remote directory's protocol and host.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["protocol", "is_local", "local_target", "absolute", "parent", "resolve", "first_line"]

_LOCAL = frozenset({"file", "local"})
#: fsspec protocols whose target is given in storage options (may be local).
_INDIRECT = frozenset({"reference", "dir"})
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def protocol(url: str) -> str:
    """The protocol of the innermost target of ``url`` (``file`` for plain paths)."""
    if "::" in url:
        url = url.split("::")[-1]
    if _URL.match(url):
        return url.split("://", 1)[0].lower()
    return "file"


def _protocols(url: str) -> list[str]:
    """The protocol of each link of a chained URL (``simplecache::s3://b/k`` ->
    ``["simplecache", "s3"]``); a plain path is ``file``."""
    parts = url.split("::")
    out = []
    for i, part in enumerate(parts):
        if _URL.match(part):
            out.append(part.split("://", 1)[0].lower())
        elif i < len(parts) - 1 and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", part):
            out.append(part.lower())
        else:
            out.append("file")
    return out


def local_target(url: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The local path or URL that ``url`` (with its options) reaches, or None.

    Checks every link of a chained URL (``simplecache::file://...``), archive and cache
    wrappers, and the ``target_protocol``/``remote_protocol``/``fo`` options through which
    ``reference://``, ``dir://`` and wrappers reach another filesystem.
    """
    for part, proto in zip(url.split("::"), _protocols(url), strict=True):
        if proto in _LOCAL:
            return part
        if proto in _INDIRECT:
            return f"{proto}:// (its target cannot be checked)"
    return _local_option(storage_options or {})


def is_local(url: str) -> bool:
    """Whether ``url`` (its innermost target) is on the local filesystem."""
    return protocol(url) in _LOCAL


def _local_option(options: Any) -> str | None:
    if isinstance(options, Mapping):
        for key, value in options.items():
            if (
                key in ("target_protocol", "remote_protocol", "protocol")
                and isinstance(value, str)
                and value.lower() in _LOCAL
            ):
                return f"{key}: {value}"
            if (
                key in ("fo", "path", "target")
                and isinstance(value, str)
                and protocol(value) in _LOCAL
            ):
                return f"{key}: {value}"
            found = _local_option(value)
            if found:
                return found
    elif isinstance(options, list):
        for value in options:
            found = _local_option(value)
            if found:
                return found
    return None


def absolute(path: str) -> str:
    if protocol(path) == "file" and "::" not in path:
        if path.startswith("file://"):
            path = path[len("file://") :]
        return os.path.abspath(os.path.expanduser(path))
    return path


def parent(path: str) -> str:
    if protocol(path) == "file" and "::" not in path:
        return os.path.dirname(path)
    return path.rsplit("/", 1)[0]


def resolve(url: str, directory: str) -> str:
    """Absolute path or URL: relative paths taken relative to the catalog directory, with
    ``.`` and ``..`` resolved (a remote directory's protocol and host are kept)."""
    if "::" in url or _URL.match(url):
        return url
    url = os.path.expanduser(url)
    if os.path.isabs(url):
        return os.path.normpath(url)
    if protocol(directory) == "file" and "::" not in directory:
        return os.path.normpath(os.path.join(directory, url))
    head, sep, rest = directory.partition("://")
    host, _, path = rest.partition("/")
    joined = posixpath.normpath(posixpath.join("/" + path, url)).lstrip("/")
    return f"{head}{sep}{host}/{joined}"


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
