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
from engine.io.manifest import FINGERPRINT, TEMPLATE, diff, list_objects, now, read_manifest
from engine.ops.regions import Layout

RESTART = "pass restart=True (CLI --restart) to recompute from scratch"
RECOMPUTE = "pass restart=True (CLI --restart) to recompute"
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


#: Fingerprint fields whose name alone does not say what changed.
_FIELD_MEANING = {
    # the dask token of the values: their inputs and the graph that computes them
    "data": "data: the input values, or a model or a parameter that computes them",
}


def existing(url, fs, root, so, fp, fp_hash, layout, *, resume, replace) -> dict | None:
    """Decide what to do with what is already at ``url``.

    Returns the stored template record to resume from, or None once nothing is there.
    Only called after the plan was validated, so a bad plan never removes anything.
    """
    if not stores.store_exists(fs, root):
        return None
    if replace:  # check_destination allowed it: a Zarr store (ours, or overwrite)
        stores.remove_store(fs, root)
        return None
    stored = stores.get_json(fs, f"{root}/{FINGERPRINT}")
    if stored is None:
        raise StoreExistsError(
            f"output store already exists with different content: {url}; {REPLACE}"
        )
    if stored.get("hash") != fp_hash:
        changed = changed_fields(stored.get("fingerprint") or {}, fp)
        fields = ", ".join(changed[:6])
        if not resume:
            raise StoreExistsError(
                f"output store already exists with different content: {url} ({fields} "
                f"differ); {REPLACE}"
            )
        inputs_only = all(not f.startswith(("code_version", "variables", "encoding", "user."))
                          for f in changed)
        what = "from different inputs" if inputs_only else "by a different job"
        fields = ", ".join(_FIELD_MEANING.get(f, f) for f in changed[:6])
        raise ResumeError(f"output store {url} was written {what} ({fields}): {RECOMPUTE}")
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


def changed_fields(stored: dict, fp: dict) -> list[str]:
    """What differs between two fingerprints, named for a person: ``model_hash`` for an
    identity entry, ``data`` for the data's graph token, ``user.seed``, ``code_version``,
    ``variables.t2m``..."""
    out = []
    for field in diff(stored, fp):
        name = field.removeprefix("identity.") if field.startswith("identity.") else field
        if name not in out:
            out.append(name)
    return out or ["<root>"]


def data_token(ds: xr.Dataset, layout: Layout) -> str:
    """A dask token of every lazy variable's graph (its key names): a different model or
    changed input values give different key names, hence a different token."""
    from dask.base import tokenize

    return tokenize(*[(name, ds[name].data) for name in sorted(layout)])


def damaged_regions(fs, root: str, records: Mapping[tuple[int, ...], dict]) -> set:
    """Recorded regions whose chunk objects are not all there with their recorded sizes
    (a deleted or truncated chunk, a chunk where an all-fill one was recorded).

    One listing of each variable's objects, no object read: the cheap check a resume
    makes; :func:`engine.io.verify.verify` also compares checksums.
    """
    names = {k.split("/", 1)[0] for r in records.values() for k in (r.get("objects") or {})}
    sizes = list_objects(fs, root, names)
    return {index for index, rec in records.items()
            if any(sizes.get(k) != v for k, v in (rec.get("objects") or {}).items())}


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
