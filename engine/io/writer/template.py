"""The output template: what is already at the URL, the store's metadata, consolidation."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from engine.errors import ResumeError, SpecError, StoreExistsError
from engine.io import stores
from engine.io.manifest import FINGERPRINT, TEMPLATE, diff, now, read_manifest
from engine.ops.regions import Layout

RESTART = "pass restart=True (CLI --restart) to recompute from scratch"
REPLACE = "pass --overwrite to replace it or choose another --output"
_LAYOUT_KEYS = ("chunks", "shards", "preferred_chunks")


def stored_layout(url: str, so: dict, names) -> dict[str, dict[str, Any]]:
    """Shape, chunks, shards and dtype of arrays as stored (not as planned)."""
    import zarr

    store = stores.zarr_store(url, so, read_only=True)
    group = zarr.open_group(store, mode="r", use_consolidated=False)
    out = {}
    for name in names:
        arr = group[name]
        if not isinstance(arr, zarr.Array):
            raise KeyError(f"{name} is a group, not an array")
        out[name] = {
            "shape": list(arr.shape),
            "chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None,
            "dtype": np.dtype(str(arr.dtype)).str,
        }
    return out


def existing(url, fs, root, so, fp, fp_hash, layout, *, resume, replace) -> dict | None:
    """Decide what to do with what is already at ``url``.

    Returns the stored template record to resume from, or None once nothing is there.
    Only called after the plan was validated, so a bad plan never removes anything.
    """
    if not stores.store_exists(fs, root):
        return None
    if replace:
        stores.remove_store(fs, root)
        return None
    stored = stores.get_json(fs, f"{root}/{FINGERPRINT}")
    if stored is None:
        raise StoreExistsError(
            f"output store already exists with different content: {url}; {REPLACE}"
        )
    if stored.get("hash") != fp_hash:
        fields = ", ".join(diff(stored.get("fingerprint"), fp)[:6])
        if not resume:
            raise StoreExistsError(
                f"output store already exists with different content: {url} (fingerprint "
                f"differs in {fields}); {REPLACE}"
            )
        raise ResumeError(f"cannot resume {url}: its fingerprint differs ({fields}); {RESTART}")
    if not resume:
        raise StoreExistsError(
            f"output store already exists: {url}; pass resume=True to finish it, or {REPLACE}"
        )
    template = stores.get_json(fs, f"{root}/{TEMPLATE}")
    if template is None:  # killed while writing the template
        if read_manifest(url, so):
            raise ResumeError(f"cannot resume {url}: its template record is missing; {RESTART}")
        stores.remove_store(fs, root)
        return None
    try:
        actual = stored_layout(url, so, layout)
    except (KeyError, FileNotFoundError, ValueError) as err:
        raise ResumeError(
            f"cannot resume {url}: its template is unreadable ({err}); {RESTART}"
        ) from err
    if actual != template["layout"]:
        fields = ", ".join(diff(template["layout"], actual)[:6])
        raise ResumeError(
            f"cannot resume {url}: its arrays differ from their template ({fields}); {RESTART}"
        )
    return template


def build_template(ds: xr.Dataset, encoding: Mapping, layout: Layout) -> tuple[xr.Dataset, dict]:
    """The dataset and encoding that create the store: lazy variables as placeholders.

    The encoding is checked on a throw-away in-memory store, so a bad entry fails here,
    before an existing store is removed.
    """
    import zarr

    tmpl = ds.copy(deep=False)
    for name, var in list(tmpl.variables.items()):
        if var.chunks is None:
            continue
        if str(name) in layout:  # never computed: the regions write the values
            new = var.copy(deep=False, data=da.empty(var.shape, dtype=var.dtype, chunks=-1))
        else:
            new = var.compute()
        if name in tmpl.coords:
            tmpl.coords[name] = new
        else:
            tmpl[name] = new
    # An explicit `encoding` entry replaces a variable's own encoding (xarray semantics);
    # the others keep theirs, minus chunk layouts inherited from an input store.
    enc = {}
    for name, var in tmpl.variables.items():
        user, lay = encoding.get(name), layout.get(str(name))
        chunks: dict[str, Any] = {}
        if lay:
            chunks["chunks"] = tuple(lay["chunks"])
            if lay["shards"]:
                chunks["shards"] = tuple(lay["shards"])
        elif var.ndim and "chunks" not in (user or {}):
            chunks["chunks"] = var.shape  # coordinates, in-memory variables: one object each
        if user is not None:
            enc[name] = {**user, **chunks}
        else:
            kept = {k: v for k, v in var.encoding.items() if k not in _LAYOUT_KEYS}
            var.encoding = {**kept, **chunks}
    try:
        dry_run = zarr.storage.MemoryStore()
        tmpl.to_zarr(dry_run, compute=False, consolidated=False, zarr_format=3, encoding=enc)
    except (ValueError, TypeError) as err:
        raise SpecError(f"the output encoding is invalid: {err}") from err
    return tmpl, enc


def write_template(tmpl, enc, url, fs, root, so, layout, grid, fp, fp_hash) -> dict:
    """Claim the store, write metadata and in-memory variables, then record the layout."""
    claim = {"hash": fp_hash, "fingerprint": fp, "created_at": now()}
    stores.put_json(fs, f"{root}/{FINGERPRINT}", claim)
    # mode "a", not "w-": the store already holds our fingerprint (and nothing else)
    store = stores.zarr_store(url, so)
    tmpl.to_zarr(store, mode="a", compute=False, consolidated=False, zarr_format=3, encoding=enc)
    template = {"layout": stored_layout(url, so, layout), "regions": grid, "created_at": now()}
    stores.put_json(fs, f"{root}/{TEMPLATE}", template)
    return template


def consolidate(url: str, so: dict) -> None:
    import zarr
    from zarr.errors import ZarrUserWarning

    with warnings.catch_warnings():  # v3 consolidated metadata is flagged experimental
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=ZarrUserWarning)
        zarr.consolidate_metadata(stores.zarr_store(url, so), zarr_format=3)
