"""Job kinds are found by ``kind:`` through a registry that installed packages extend.

A kind is a :class:`JobKind`: its name, a one-line summary, its spec dataclass and its run
function. A kind written on the job interface (:class:`engine.pipelines.job.Job`) gets
one with ``MyJob().as_kind()``: run and plan are then the shared runner's. The engine's
own kinds are listed in ``_BUILTIN`` here; another package adds one by exposing such a
``JobKind`` (or a ``Job`` instance) under the entry-point group ``cube_engine.jobs`` in its
``pyproject.toml``::

    [project.entry-points."cube_engine.jobs"]
    mykind = "mypackage.jobs:JOB"

Entry points name installed code, which the engine trusts like any import; a job file only
selects among installed kinds by name, it never names code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from engine.errors import SpecError

__all__ = ["JobKind", "ENTRY_POINT_GROUP", "job_kinds", "get_kind"]

ENTRY_POINT_GROUP = "cube_engine.jobs"


@dataclass(frozen=True)
class JobKind:
    """One job kind: what ``kind: NAME`` in a job file runs."""

    name: str
    summary: str
    #: Frozen dataclass the job file is parsed into (``parse_spec`` names bad fields).
    spec: type
    #: ``run(spec, *, output, overwrite, restart, client, on_epoch, on_region, log, plan)``.
    run: Callable[..., Any]
    source: str = "cube-engine"
    #: ``plan(spec, output, *, overwrite, restart, must_resume)``: everything checkable
    #: without a cluster (cube, destinations, resume identity); its result is handed to
    #: ``run(..., plan=)``. None: the kind checks inside ``run``.
    plan: Callable[..., Any] | None = None
    #: The :class:`engine.pipelines.job.Job` behind ``run`` and ``plan``, if any.
    job: Any = None


#: The engine's own kinds, as ``module:attribute`` so listing them imports no torch.
_BUILTIN = {"gapfill": "engine.pipelines.gapfill:JOB",
            "segment": "engine.pipelines.segment:JOB",
            "classify": "engine.pipelines.classify:JOB",
            "regress": "engine.pipelines.regress:JOB",
            "embed": "engine.pipelines.embed:JOB",
            "apply": "engine.pipelines.apply:JOB",
            "cloud-metrics": "engine.pipelines.cloud_metrics:JOB"}


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def job_kinds() -> dict[str, JobKind]:
    """Every job kind: the engine's own, then those of installed packages (entry points)."""
    kinds = {name: _load(target) for name, target in _BUILTIN.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in kinds:
            continue  # the engine's own kinds are not replaced by a plug-in of the same name
        try:
            kind = ep.load()
        except Exception as err:
            raise SpecError(f"job kind {ep.name!r} from entry point {ep.value} cannot be "
                            f"loaded ({type(err).__name__}: {err}); fix or uninstall the "
                            "package that provides it") from None
        kind = _as_kind(kind, ep.value)
        if not isinstance(kind, JobKind):
            raise SpecError(f"entry point {ep.value} (group {ENTRY_POINT_GROUP}) is not an "
                            "engine.pipelines.registry.JobKind")
        kinds[ep.name] = kind
    return kinds


def _as_kind(obj: Any, source: str) -> Any:
    """A :class:`engine.pipelines.job.Job` instance as its registry entry; others as given."""
    from engine.pipelines.job import Job

    if isinstance(obj, Job):
        return obj.as_kind(source=source.partition(":")[0])
    return obj


def get_kind(name: str) -> JobKind:
    """The kind named ``name``; one line listing the known kinds otherwise."""
    kinds = job_kinds()
    if name not in kinds:
        raise SpecError(f"kind must be one of {', '.join(sorted(kinds))}, got {name!r} "
                        "(cube-engine jobs lists them)")
    return kinds[name]
