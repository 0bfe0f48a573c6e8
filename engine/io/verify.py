"""Check an output store against its manifest: every region there, intact, unchanged.

A region is *damaged* when

- ``unfinished``: the manifest holds no record of it (a run that stopped early);
- ``missing``: a chunk (shard) object recorded as written is gone;
- ``size``: an object has another size than recorded (a torn write), or exists where an
  all-fill chunk (not stored) was recorded;
- ``checksum``: its values read back differ from the recorded checksum (overwritten or
  garbled bytes that still decode);
- ``unreadable``: its chunks no longer decode.

The first three need one listing of the store; checksums read every recorded region.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import xarray as xr

from engine.errors import StoreError
from engine.io import stores
from engine.io.manifest import (
    FINGERPRINT,
    TEMPLATE,
    checksum,
    digest,
    list_objects,
    quiet_zarr,
    read_manifest,
)
from engine.ops.regions import plan_regions
from engine.redact import redact_text, redact_url

__all__ = ["verify", "VerifyResult", "Damage"]

Problem = Literal["unfinished", "missing", "size", "checksum", "unreadable"]


@dataclass(frozen=True)
class Damage:
    """One damaged region: its grid index, what is wrong, and where."""

    region: tuple[int, ...]
    problem: Problem
    detail: str
    slices: dict[str, tuple[int, int]]

    @property
    def id(self) -> str:
        return ".".join(map(str, self.region))

    def describe(self) -> str:
        where = ", ".join(f"{d}={a}:{b}" for d, (a, b) in self.slices.items())
        return f"region {self.id} ({where}): {self.problem}: {self.detail}"


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found; ``ok`` when no region is damaged."""

    url: str
    n_regions: int
    n_recorded: int
    checksums: bool
    damaged: tuple[Damage, ...]

    @property
    def ok(self) -> bool:
        return not self.damaged

    @property
    def regions(self) -> list[tuple[int, ...]]:
        """Indices of the damaged regions, sorted."""
        return sorted({d.region for d in self.damaged})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["url"] = redact_url(self.url)
        out["ok"] = self.ok
        out["damaged"] = [{**asdict(d), "region": list(d.region), "id": d.id,
                           "slices": {k: list(s) for k, s in d.slices.items()}}
                          for d in self.damaged]
        return out


def _records(url: str, so: dict) -> tuple[Any, str, dict, dict]:
    try:
        fs, root = stores.filesystem(url, so)
        fs.invalidate_cache(root)
        there = fs.exists(root)
        fp = stores.get_json(fs, f"{root}/{FINGERPRINT}") if there else None
        template = stores.get_json(fs, f"{root}/{TEMPLATE}") if fp else None
    except StoreError:
        raise
    except Exception as err:
        if isinstance(err, ImportError):
            raise
        first = redact_text(str(err).strip().splitlines()[0]) if str(err).strip() else ""
        raise StoreError(f"cannot read {redact_url(url)}: {type(err).__name__}: {first[:200]}; "
                         "check the URL and storage_options") from None
    if not there:
        raise StoreError(f"nothing exists at {redact_url(url)}; check the store URL")
    if fp is None:
        raise StoreError(f"{redact_url(url)} is not a cube-engine output store (no "
                         ".engine/fingerprint.json); verify checks stores the engine wrote")
    if template is None:
        raise StoreError(f"{redact_url(url)} has no template record (its first run was killed "
                         "while creating it); re-run the write with restart=True")
    return fs, root, fp, template


def verify(url: str, storage_options: dict | None = None, *,
           checksums: bool = True) -> VerifyResult:
    """Check every region of an engine output store against its manifest record.

    Parameters
    ----------
    url, storage_options
        The store.
    checksums
        Also read every recorded region and compare its checksum (finds overwritten or
        garbled chunks); without, only objects and sizes are checked (one listing).

    Raises
    ------
    StoreError
        Nothing is at ``url``, it is not a store the engine wrote, or it cannot be read.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> from engine.io.writer import write
    >>> ds = xr.Dataset({"t": (("y", "x"), np.ones((4, 4)))}).chunk(2)
    >>> _ = write(ds, "memory://doc-verify/out.zarr", overwrite=True, region_chunks={"y": 2})
    >>> res = verify("memory://doc-verify/out.zarr")
    >>> res.ok, res.n_regions
    (True, 4)
    """
    quiet_zarr()
    so = dict(storage_options or {})
    fs, root, fp, template = _records(url, so)
    layout = fp.get("fingerprint", {}).get("variables", {})
    regions = plan_regions(layout, template["regions"])
    records = {i: r for i, r in read_manifest(url, so).items()
               if r.get("fingerprint") == fp["hash"]}
    slices = {r.index: r.slices for r in regions}
    damaged: dict[tuple[int, ...], Damage] = {}

    def damage(index: tuple[int, ...], problem: Problem, detail: str) -> None:
        damaged.setdefault(index, Damage(index, problem, detail, slices.get(index, {})))

    for r in regions:
        if r.index not in records:
            damage(r.index, "unfinished", "no manifest record")

    names = {k.split("/", 1)[0] for rec in records.values() for k in (rec.get("objects") or {})}
    sizes = list_objects(fs, root, names)
    for index, rec in sorted(records.items()):
        for key, size in sorted((rec.get("objects") or {}).items()):
            now = sizes.get(key)
            if now == size:
                continue
            if size is not None and now is None:
                damage(index, "missing", f"{key} is gone")
            elif size is None:
                damage(index, "size", f"{key} exists ({now} bytes) where an all-fill chunk "
                                      "was recorded")
            else:
                damage(index, "size", f"{key} has {now} bytes, {size} recorded")
            break

    if checksums:
        try:
            store = stores.zarr_store(url, so, read_only=True)
            stored = xr.open_zarr(store, consolidated=False, chunks=None)
        except Exception as err:
            for index in records:
                damage(index, "unreadable", f"store metadata: {type(err).__name__}")
            stored = None
        for index, rec in sorted(records.items()):
            if stored is None or index in damaged:
                continue
            problem = _check_values(stored, rec)
            if problem is not None:
                damage(index, *problem)
    return VerifyResult(url=url, n_regions=len(regions), n_recorded=len(records),
                        checksums=checksums,
                        damaged=tuple(damaged[i] for i in sorted(damaged)))


def _check_values(stored: xr.Dataset, rec: dict) -> tuple[Problem, str] | None:
    sel = {d: slice(*s) for d, s in rec["slices"].items()}
    for name in rec["variables"]:
        try:
            var = stored[name]
            values = var.isel({d: sel[d] for d in var.dims if d in sel}).values
        except Exception as err:  # a chunk that no longer decodes
            return "unreadable", f"{name}: {type(err).__name__}: {str(err)[:120]}"
        recorded = rec["checksums"][name]
        # records before the CRC-32 checksums hold a bare sha1 hex digest
        now = checksum(values) if recorded.startswith("crc32:") else digest(values)
        if now != recorded:
            return "checksum", f"{name}: values differ from the recorded checksum"
    return None
