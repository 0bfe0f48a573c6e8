"""Pre-flight check of an output URL, before any training or computing starts.

The writer validates the full layout when it writes; this check needs only the job's
fingerprint, so a job can refuse a foreign or different store in its first second
instead of after training.
"""

from __future__ import annotations

from typing import Any

from engine.errors import ResumeError, StoreExistsError
from engine.io import stores
from engine.io.manifest import ENGINE_PREFIX

__all__ = ["check_destination"]


def check_destination(
    url: str,
    *,
    fingerprint: dict[str, Any],
    overwrite: bool = False,
    restart: bool = False,
    storage_options: dict[str, Any] | None = None,
    must_resume: bool = True,
) -> str:
    """Say what a run would do with ``url``: ``"create"``, ``"resume"`` or ``"replace"``.

    Raises :class:`StoreExistsError` when something that is not this job's output lives
    there and neither ``overwrite`` nor ``restart`` was given. Nothing is written.
    """
    fs, root = stores.filesystem(url, storage_options)
    if not stores.store_exists(fs, root):
        return "create"
    if overwrite or restart:
        return "replace"
    stored = stores.get_json(fs, f"{root}/{ENGINE_PREFIX}/fingerprint.json")
    if stored is None:
        raise StoreExistsError(
            f"output store already exists with different content: {url}; pass --overwrite "
            "to replace it or choose another --output"
        )
    user = (stored.get("fingerprint") or {}).get("user") or {}
    if user != fingerprint:
        changed = sorted(
            k for k in set(user) | set(fingerprint) if user.get(k) != fingerprint.get(k)
        )
        raise (ResumeError if must_resume else StoreExistsError)(
            f"output store already exists with different content: {url} (job {', '.join(changed)} "
            "differs); pass --overwrite to replace it, --restart to recompute, or choose another "
            "--output"
        )
    return "resume"
