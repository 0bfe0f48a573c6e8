"""Check a finished output store against its manifest."""

from __future__ import annotations

import xarray as xr

from engine.io import stores
from engine.io.manifest import checksum, digest, quiet_zarr, read_manifest

__all__ = ["verify"]


def verify(url: str, *, storage_options: dict | None = None) -> list[tuple[int, ...]]:
    """Recompute every recorded region's checksums from the store; return the bad ones.

    A region is bad when its values no longer match its record (a torn or overwritten
    chunk) or cannot be read. Checksums cover the decoded values, so lossy encodings
    (``scale_factor`` packing, a narrower ``dtype``) make every region look bad.
    """
    quiet_zarr()
    so = dict(storage_options or {})
    store = stores.zarr_store(url, so, read_only=True)
    stored = xr.open_zarr(store, consolidated=False, chunks=None)
    bad = []
    for index, rec in sorted(read_manifest(url, so).items()):
        try:
            sel = {d: slice(*s) for d, s in rec["slices"].items()}
            for name in rec["variables"]:
                var = stored[name]
                values = var.isel({d: sel[d] for d in var.dims if d in sel}).values
                recorded = rec["checksums"][name]
                # records before the CRC-32 checksums hold a bare sha1 hex digest
                now = checksum(values) if recorded.startswith("crc32:") else digest(values)
                if now != recorded:
                    bad.append(index)
                    break
        except Exception:  # unreadable, e.g. a torn chunk, counts as bad
            bad.append(index)
    return bad
