"""The engine's records inside an output store: fingerprint, template, manifest.

::

    <url>/.engine/fingerprint.json         the job: user fingerprint, code version, layout
    <url>/.engine/template.json            stored layout and region grid, once written
    <url>/.engine/manifest/<i.j.k>.json    one record per finished region

A region's record is written after its chunks, so it proves the region finished. The
checksums of its values (:func:`checksum`) let :func:`engine.io.verify.verify` find torn
or overwritten chunks.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import warnings
import zlib
from typing import Any

import numpy as np
import xarray as xr

from engine._version import code_version
from engine.io import stores

__all__ = ["ENGINE_PREFIX", "read_manifest", "checksum", "digest"]

#: Reserved prefix inside every output store for the engine's own records.
ENGINE_PREFIX = ".engine"
FINGERPRINT = f"{ENGINE_PREFIX}/fingerprint.json"
TEMPLATE = f"{ENGINE_PREFIX}/template.json"
MANIFEST = f"{ENGINE_PREFIX}/manifest"


def _canonical_nans(a: np.ndarray, nan: np.ndarray) -> bool:
    """True when every NaN of a real float array has the bit pattern of ``np.nan``."""
    if a.dtype.kind != "f":
        return False
    as_int = np.dtype(f"u{a.dtype.itemsize}")
    canon = np.array(np.nan, a.dtype).view(as_int)
    return bool((a[nan].view(as_int) == canon).all())


def _hashable(values: Any) -> tuple[bytes, Any]:
    """``(header, data)`` to hash: dtype and shape, then the values with every NaN the
    canonical one (copied only when some NaN has another payload)."""
    a = np.ascontiguousarray(values)
    header = f"{a.dtype.str}{a.shape}".encode()
    if a.dtype.kind == "O":
        return header, repr(a.tolist()).encode()
    if a.dtype.kind in "fc":
        nan = np.isnan(a)
        if nan.any() and not _canonical_nans(a, nan):
            a = a.copy()
            a[nan] = np.nan
    return header, a.reshape(-1).view(np.uint8).data


def digest(values: Any) -> str:
    """sha1 of an array's dtype, shape and values; every NaN hashes the same (identity
    of in-memory inputs in the fingerprint).

    >>> digest(np.array([1.0, np.nan])) == digest(np.array([1.0, -np.nan]))
    True
    """
    header, data = _hashable(values)
    h = hashlib.sha1(header)
    h.update(data)
    return h.hexdigest()


def checksum(values: Any) -> str:
    """CRC-32 of an array's dtype, shape and values, every NaN the same: the integrity
    check of a written region (detects torn or overwritten chunks), about twice as fast
    as sha1 on the write path.

    >>> checksum(np.zeros(3, "f4")).startswith("crc32:")
    True
    """
    header, data = _hashable(values)
    return f"crc32:{zlib.crc32(data, zlib.crc32(header)):08x}"


def fingerprint(ds: xr.Dataset, layout: dict, encoding: dict, user: dict | None,
                identity: dict | None = None) -> dict:
    """What makes two runs interchangeable: job, inputs (``identity``: the data's graph
    token, model hash...), code, lazy layout, in-memory values. ``user`` and ``identity``
    must be redacted already (:func:`engine.redact.redact`)."""
    return {
        "user": user or {},
        "identity": identity or {},
        "code_version": code_version(),
        "variables": layout,
        "in_memory": {
            str(k): {"dims": [str(d) for d in v.dims], "sha1": digest(v.values)}
            for k, v in ds.variables.items()
            if str(k) not in layout
        },
        "encoding": {str(k): {kk: str(vv) for kk, vv in v.items()} for k, v in encoding.items()},
    }


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(canonical(fp).encode()).hexdigest()


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def diff(a: Any, b: Any, prefix: str = "", depth: int = 2) -> list[str]:
    """Dotted keys (two levels deep) where two JSON-like objects differ.

    >>> diff({"user": {"seed": 1}, "v": 1}, {"user": {"seed": 2}, "v": 1})
    ['user.seed']
    """
    if depth == 0 or not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if canonical(a) == canonical(b) else [prefix.rstrip(".") or "<root>"]
    keys = sorted(set(a) | set(b))
    return [x for k in keys for x in diff(a.get(k), b.get(k), f"{prefix}{k}.", depth - 1)]


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def quiet_zarr() -> None:
    """Silence zarr's notice that our reserved prefix is not a zarr node.

    A narrow, idempotent filter rather than ``catch_warnings``, which is not thread-safe
    (region tasks run in threads).
    """
    from zarr.errors import ZarrUserWarning

    warnings.filterwarnings(
        "ignore", message=rf"Object at {ENGINE_PREFIX} is not recognized", category=ZarrUserWarning
    )


def read_manifest(url: str, storage_options: dict | None = None) -> dict[tuple[int, ...], dict]:
    """Return the manifest of an output store: region index -> record.

    A record is written after its region's chunks, so it proves the region finished.
    Unreadable records (cut short by a kill) are left out: that region is unfinished.
    """
    fs, root = stores.filesystem(url, storage_options)
    folder = f"{root}/{MANIFEST}"
    fs.invalidate_cache(folder)
    try:
        paths = [p for p in fs.find(folder) if p.endswith(".json")]
    except FileNotFoundError:
        return {}
    records = {}
    for blob in (fs.cat(paths, on_error="return") if paths else {}).values():
        try:
            rec = json.loads(blob)
            records[tuple(int(i) for i in rec["region"])] = rec
        except (TypeError, ValueError, KeyError):
            continue
    return records


def list_objects(fs, root: str, names) -> dict[str, int]:
    """``{"name/c/0/1": size}`` of every object under the given variables."""
    sizes: dict[str, int] = {}
    fs.invalidate_cache(root)
    for name in sorted(names):
        try:
            found = fs.find(f"{root}/{name}", detail=True)
        except FileNotFoundError:
            continue
        for path, info in found.items():
            sizes[path[len(root):].lstrip("/")] = int(info.get("size") or 0)
    return sizes
