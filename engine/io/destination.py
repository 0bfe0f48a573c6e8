"""Pre-flight check of an output URL, before any training or computing starts.

:func:`check_destination` decides what a run will do with its output URL and refuses,
with one line and nothing deleted or written, every case where that would destroy data
or fail later:

- the output is, contains, or lies inside one of the job's input stores;
- the output is the filesystem root, the home folder, the current folder or one of its
  parents;
- something that is not a Zarr store (a file, a folder of other files) is there: not even
  ``overwrite`` replaces it;
- a Zarr store that cube-engine did not write is there: only ``overwrite`` replaces it,
  ``restart`` recomputes only the engine's own stores;
- the destination cannot be written (a read-only folder, a file as parent, ``/proc``) or
  reached (an S3 endpoint down, credentials missing).

The writer runs the same check; a job runs it first, so a bad ``--output`` costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from engine.errors import ResumeError, StoreError, StoreExistsError
from engine.io import stores
from engine.io.manifest import ENGINE_PREFIX, FINGERPRINT
from engine.redact import redact, redact_text, redact_url

__all__ = ["check_destination", "check_outside_inputs", "probe_writable"]

Action = Literal["create", "resume", "replace"]


def _protected(path: str) -> str | None:
    """Why a local ``path`` may never be an output store, or None."""
    real = os.path.realpath(path)
    if real == os.path.realpath(os.sep):
        return "the filesystem root"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "the home folder"
    cwd = os.path.realpath(os.getcwd())
    if real == cwd:
        return "the current folder"
    if cwd.startswith(real.rstrip(os.sep) + os.sep):
        return "a parent of the current folder"
    return None


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_outside_inputs(url: str, inputs: Iterable[str]) -> None:
    """Raise :class:`StoreError` (one line) when ``url`` is, contains or lies inside one of
    ``inputs`` (paths normalised: relative, ``..``, symlinks, ``file://``)."""
    inputs = [str(i) for i in inputs]
    if not inputs:
        return
    out = stores.normalize_url(url)
    for source in inputs:
        src = stores.normalize_url(str(source))
        if _inside(out, src) or _inside(src, out):
            how = ("is" if out == src else "lies inside" if _inside(out, src) else "contains")
            raise StoreError(
                f"output {redact_url(url)} {how} the input store {redact_url(str(source))}: "
                "writing there would destroy the input; choose another --output"
            )


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = redact_text(text)
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _probe_local(url: str, path: str) -> None:
    """Create the folder (and a probe file in it), then remove what was created."""
    parent = path
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise StoreError(
            f"cannot create output store {url}: {parent} is a file, not a folder; "
            "choose another --output"
        )
    created = []
    try:
        missing, p = [], path
        while not os.path.lexists(p):
            missing.append(p)
            p = os.path.dirname(p)
        for p in reversed(missing):
            os.mkdir(p)
            created.append(p)
        probe = os.path.join(path, f".engine-probe-{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            f.write(b"")
        os.remove(probe)
    except OSError as err:
        where = err.filename or path
        raise StoreError(
            f"cannot write output store {url}: {err.strerror or err} ({where}); choose a "
            "writable --output or fix the folder's permissions"
        ) from None
    finally:
        for p in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(p)


def _probe_remote(url: str, fs, root: str) -> None:
    """List the destination and put then delete one probe object under it."""
    probe = f"{root}/{ENGINE_PREFIX}/probe-{uuid.uuid4().hex}"
    try:
        fs.invalidate_cache(root)
        fs.exists(root)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as err:  # any backend's "cannot reach / not allowed" error
        raise StoreError(
            f"cannot write output store {redact_url(url)}: {_short(err)}; check the endpoint "
            "and the credentials in storage_options"
        ) from None


def probe_writable(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`StoreError` (one line) unless ``url`` can be created and written.

    Nothing is left behind: folders and the probe object created here are removed.
    """
    if stores.is_local(url):
        _probe_local(url, os.path.realpath(stores._local_path(url)))
        return
    fs, root = _filesystem(url, storage_options)
    _probe_remote(url, fs, root)


def _filesystem(url: str, storage_options):
    try:
        return stores.filesystem(url, dict(storage_options or {}))
    except StoreError:
        raise
    except Exception as err:
        if isinstance(err, ImportError):
            raise
        raise StoreError(
            f"cannot open output store {redact_url(url)}: {_short(err)}; check the URL and "
            "storage_options"
        ) from None


def _exists(url: str, fs, root: str) -> tuple[bool, bool]:
    """(something is there, it is a file) -- one line on an unreachable backend."""
    try:
        fs.invalidate_cache(root)
        if not fs.exists(root):
            return False, False
        if fs.isfile(root):
            return True, True
        return len(fs.ls(root, detail=False)) > 0, False
    except Exception as err:
        raise StoreError(
            f"cannot reach output store {redact_url(url)}: {_short(err)}; check the endpoint "
            "and the credentials in storage_options"
        ) from None


def check_destination(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    restart: bool = False,
    inputs: Iterable[str] = (),
    fingerprint: Mapping[str, Any] | None = None,
    must_resume: bool = True,
) -> Action:
    """Say what a run would do with ``url``: ``"create"``, ``"resume"`` or ``"replace"``.

    Nothing is written or deleted (a probe object or folder is created and removed).

    Parameters
    ----------
    url, storage_options
        The output store.
    overwrite
        Allow replacing a Zarr store at ``url`` (the engine's or anyone's).
    restart
        Allow recomputing a store that cube-engine wrote (it has ``.engine`` records).
    inputs
        URLs of the job's input stores: the output may not be, contain or lie inside one.
    fingerprint
        The job's fingerprint (``write(fingerprint=...)``); when given, an engine store of
        another job is refused unless ``restart`` or ``overwrite``.
    must_resume
        Raise :class:`ResumeError` (not :class:`StoreExistsError`) for another job's store.

    Raises
    ------
    StoreError
        The output overlaps an input, is a protected folder, or cannot be written/reached.
    StoreExistsError
        Something that may not be replaced is at ``url``.
    ResumeError
        An engine store of another job is at ``url`` and ``must_resume``.

    Examples
    --------
    >>> check_destination("memory://doc-destination/new.zarr")
    'create'
    >>> check_destination("memory://doc-destination/in.zarr/out.zarr",
    ...                   inputs=["memory://doc-destination/in.zarr"])
    Traceback (most recent call last):
    ...
    engine.errors.StoreError: output memory://doc-destination/in.zarr/out.zarr lies inside \
the input store memory://doc-destination/in.zarr: writing there would destroy the input; \
choose another --output
    """
    url = str(url)
    check_outside_inputs(url, inputs)
    if stores.is_local(url):
        why = _protected(stores._local_path(url))
        if why:
            raise StoreError(
                f"refusing to use {url} as an output store: it is {why}; choose a new "
                "folder, e.g. out.zarr inside it"
            )
    fs, root = _filesystem(url, storage_options)
    there, is_file = _exists(url, fs, root)
    if not there:
        probe_writable(url, storage_options)
        return "create"
    if is_file:
        raise StoreExistsError(
            f"output {url} is a file, not a Zarr store: nothing was deleted; choose another "
            "--output"
        )
    ours = fs.exists(f"{root}/{FINGERPRINT}")
    if not ours and not stores.is_zarr_store(fs, root):
        raise StoreExistsError(
            f"output {url} is a folder that is not a Zarr store (no zarr.json, .zgroup or "
            ".zarray at its root): nothing was deleted, not even with --overwrite; choose "
            "another --output"
        )
    if not ours and not overwrite:
        hint = ("--restart only recomputes stores that cube-engine wrote; " if restart else "")
        raise StoreExistsError(
            f"output store already exists and was not written by cube-engine: {url}; {hint}"
            "pass --overwrite to replace it or choose another --output"
        )
    probe_writable(url, storage_options)
    if overwrite or restart:
        return "replace"
    if fingerprint is not None:
        stored = stores.get_json(fs, f"{root}/{FINGERPRINT}") or {}
        user = (stored.get("fingerprint") or {}).get("user") or {}
        want = redact(dict(fingerprint))
        if user != want:
            changed = sorted(k for k in set(user) | set(want) if user.get(k) != want.get(k))
            raise (ResumeError if must_resume else StoreExistsError)(
                f"output store {url} was written by a different job ({', '.join(changed)}): "
                "pass --restart to recompute it, --overwrite to replace it, or choose another "
                "--output"
            )
    return "resume"
