"""The job interface: one template every job kind implements, one runner that runs them all.

A job kind (gap filling, regression, segmentation, ...) is **one module** holding a spec
dataclass and a :class:`Job` subclass. The kind says *what* is computed; the shared runner
(:mod:`engine.pipelines.runner`) owns *how a run goes*: compare torchgeo's task classes
(one LightningModule template, many tasks) and xarray's backend entrypoints (a registry
that other packages extend).

Contract
--------
The spec
    A frozen dataclass that also subclasses :class:`engine.pipelines.spec.JobSpecBase`
    (``resolve``, ``to_dict`` and the common checks in ``check``). Fields the runner reads:
    ``name`` (safe path component), ``kind`` (``Literal["<kind name>"]``), ``seed``,
    ``input`` (an :class:`~engine.pipelines.spec.InputSpec`: ``catalog``, ``entry``,
    ``storage_options``), ``output`` (``url``, ``dir``, ``storage_options``; e.g. an
    :class:`~engine.pipelines.spec.OutputSpec`), ``base_dir: str = "."`` (set by the
    parser to the job file's folder), optional ``tracking``
    (:class:`~engine.pipelines.spec.TrackingSpec`) and optional ``train.epochs``
    (progress bar length). Override ``check(self)`` for checks that need no cube: call
    ``super().check()`` and raise :class:`~engine.errors.SpecError` naming the field.
    ``cube-engine run/validate`` parse the job file into it (bad keys, types and the
    ``check`` are one line, exit code 2) and ``--set KEY=VALUE`` overrides any field.

The steps, in the order the runner calls them (``ctx`` is a :class:`RunContext`)
    ``prepare(spec) -> Prepared``
        Open the input cube lazily (:func:`open_input`) and check every name and size the
        job uses against it: variables, levels, dims, members. No cluster is running; it
        raises :class:`~engine.errors.CubeError` / ``SpecError`` (one line, names the
        field and the fix) and computes nothing big. ``cube-engine validate`` is
        ``prepare`` + ``split`` + the destination checks.
    ``split(prepared) -> Any``
        The lazy assignment of samples to train / validation / test (blocks, members,
        folds), a pure function of the spec and the cube; its checks also run in
        ``validate``. Returns whatever the later steps need (None when there is none).
    ``train(prepared, split, ctx) -> Trained``
        Fit the model(s) on the training part only, with ``ctx.on_epoch(record)`` once per
        epoch (``record``: ``epoch``, ``train_loss``, ``val_loss``, optionally ``fold``)
        and checkpoints written under ``ctx.path(name)``. When ``ctx.previous`` is not
        None the same job on the same inputs already trained and its checkpoints exist:
        load them instead of training and return ``Trained(fresh=False,
        info=ctx.previous)``. ``Trained.info`` (JSON-able) is saved as ``train.json``.
    ``predict(prepared, split, trained, ctx) -> xarray.Dataset``
        The output store's content, **lazy** (dask-backed; use :func:`engine.predict` for
        model inference) with CF attributes per variable and the kind's own provenance
        keys in ``.attrs`` (``engine_split``, ``engine_target``, ...). The runner adds the
        common provenance and writes it with the resumable writer.
    ``evaluate(prepared, split, trained, written, ctx) -> dict``
        Metrics on the held-out part, read from ``written`` (the store as written, opened
        lazily), so the model is not run twice. JSON-able; the runner adds ``identity``
        and ``throughput`` and saves it as ``metrics.json``.
    ``report(prepared, split, trained, metrics, written, ctx) -> Report``
        Plots (PNG under ``ctx.path(...)``) and the summary table the command line prints
        (``Report.rows``, one row per model or baseline).
    ``describe(prepared) -> str`` (optional)
        One line for ``cube-engine validate`` ("target t from z; cube ...").
    ``identity(spec, prepared)``, ``write(out, url, ctx=, trained=, progress=)`` (optional)
        The resume identity and the write step; the defaults are the runner's
        (``job_identity``, the resumable writer). ``apply`` narrows the identity (its
        store grows across runs) and appends partitions along time instead.

What the runner does (:func:`engine.pipelines.runner.run_job`); a kind never copies it
    Before any cluster starts (``plan_job``): ``prepare``, ``split``, the output store and
    run folder locations (``<store>.run`` beside a local store), the resume identity
    (spec fingerprint with secrets redacted, code version, input store identity) and the
    destination checks (a foreign, different or input-overlapping store, an unwritable run
    folder are one line and exit 2, nothing written). Then in the run: the run folder, the
    optional mlflow tracker, the throughput meter (phases ``train`` and
    ``predict+write``), model reuse (``ctx.previous``), the common provenance attributes
    (CF ``Conventions``/``history``, job spec, code version, model hash, seed, catalog
    entry, input licence), the resumable Zarr write with the resume identity plus the
    model hash, ``train.json``, ``metrics.json`` and the :class:`JobResult` the command
    line prints.

How a kind registers
    In the engine: add ``"<name>": "engine.pipelines.<module>:JOB"`` to ``_BUILTIN`` in
    :mod:`engine.pipelines.registry`, with ``JOB = MyJob().as_kind()`` at the end of the
    module. In another package: an entry point in group ``cube_engine.jobs`` naming such a
    ``JOB`` (see the README, "How to add a job kind").

Examples
--------
A minimal kind (see ``tests/test_jobs_interface.py`` for one that runs end to end):

>>> from dataclasses import dataclass
>>> class Nothing(Job):
...     name, summary, title = "nothing", "a kind that does nothing", "nothing"
...     spec = dict
>>> kind = Nothing().as_kind()
>>> kind.name, kind.job.title, callable(kind.run), callable(kind.plan)
('nothing', 'nothing', True, True)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import xarray as xr

from engine.dims import CubeDims
from engine.pipelines.registry import JobKind

__all__ = ["Job", "Prepared", "Trained", "Report", "RunContext", "JobResult", "open_input"]


@dataclass(kw_only=True)
class Prepared:
    """What ``prepare`` returns: the spec and the lazily opened cube. Kinds subclass it
    (``@dataclass(kw_only=True)``) to add their own lazy variables and names."""

    spec: Any
    ds: xr.Dataset
    dims: CubeDims | None = None
    #: The input store's URL and storage options: the output may not overlap it, and its
    #: content identity is part of the resume identity.
    input_url: str | None = None
    input_storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Trained:
    """What ``train`` returns. Kinds subclass it to carry what ``predict`` and
    ``evaluate`` need (statistics, baselines' coefficients)."""

    #: The model (an ``nn.Module``, or a list/dict of them, one per fold).
    model: Any
    #: The training record, JSON-able, saved as ``train.json`` (history, best epoch,
    #: ``samples_per_s``, ...); ``ctx.previous`` on a resumed run.
    info: dict[str, Any]
    #: sha256 of the weights (:func:`engine.ml.train.model_hash`; folds: of all of them).
    model_hash: str
    #: File names in the run folder that a resumed run loads (``["best.pt"]``).
    checkpoints: list[str] = field(default_factory=list)
    #: True when trained in this run, False when loaded from a previous run's checkpoints.
    fresh: bool = True
    #: Objects with a ``release()`` method (cached training streams), released after the
    #: write: they share input keys with the prediction graph.
    resources: list[Any] = field(default_factory=list)

    def release(self) -> None:
        for r in self.resources:
            r.release()


@dataclass
class Report:
    """What ``report`` returns: the table the command line prints and the run's files."""

    #: Table title, e.g. ``"regress-t850: test members 8, 9 (29,280 cells)"``.
    title: str
    columns: list[str]
    #: One row per model or baseline, cells as text, in ``columns`` order.
    rows: list[list[str]]
    #: Lines printed after the output line (``"filled 647 cells"``).
    notes: list[str] = field(default_factory=list)
    #: Files in the run folder by role (``{"map_plot": ".../map.png"}``).
    files: dict[str, str] = field(default_factory=dict)
    #: Extra keys for the ``--report PATH.json`` summary.
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """What the runner hands every step of a run."""

    spec: Any
    url: str
    run_dir: str
    identity: dict[str, str]
    client: Any = None
    log: Callable[[str], None] = lambda s: None
    on_epoch: Callable[[dict[str, Any]], None] = lambda rec: None
    #: The previous training record (``train.json``) of this job on these inputs when its
    #: checkpoints exist and neither ``--restart`` nor ``--overwrite`` was given.
    previous: dict[str, Any] | None = None
    restart: bool = False
    overwrite: bool = False

    def path(self, name: str) -> str:
        """``name`` inside the run folder."""
        return os.path.join(self.run_dir, name)


@dataclass
class JobResult:
    """What a run returns: where it wrote, its metrics and its summary table."""

    output_url: str
    run_dir: str
    metrics: dict[str, Any]
    report: Report
    files: dict[str, str] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    write: Any = None
    trained: bool = True


class Job:
    """The template of a job kind: a spec dataclass and six steps (module docstring)."""

    #: ``kind:`` in a job file.
    name: ClassVar[str]
    #: One line for ``cube-engine jobs``.
    summary: ClassVar[str]
    #: Words for the output's ``title`` and ``history`` ("gap filling").
    title: ClassVar[str]
    #: The spec dataclass the job file is parsed into.
    spec: ClassVar[type]

    def prepare(self, spec: Any) -> Prepared:
        raise NotImplementedError(f"{type(self).__name__}.prepare")

    def split(self, prepared: Prepared) -> Any:
        return None

    def train(self, prepared: Prepared, split: Any, ctx: RunContext) -> Trained:
        raise NotImplementedError(f"{type(self).__name__}.train")

    def predict(self, prepared: Prepared, split: Any, trained: Trained,
                ctx: RunContext) -> xr.Dataset:
        raise NotImplementedError(f"{type(self).__name__}.predict")

    def evaluate(self, prepared: Prepared, split: Any, trained: Trained, written: xr.Dataset,
                 ctx: RunContext) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.evaluate")

    def report(self, prepared: Prepared, split: Any, trained: Trained,
               metrics: dict[str, Any], written: xr.Dataset, ctx: RunContext) -> Report:
        raise NotImplementedError(f"{type(self).__name__}.report")

    def describe(self, prepared: Prepared) -> str:
        return f"cube {dict(prepared.ds.sizes)}"

    def identity(self, spec: Any, prepared: Prepared) -> dict[str, str]:
        """The resume identity (:func:`engine.pipelines.runner.job_identity`: job spec,
        code version, input store). A kind whose store grows across runs (``apply``)
        narrows it to what its finished parts depend on."""
        from engine.pipelines.runner import job_identity

        return job_identity(spec, prepared)

    def write(self, out: xr.Dataset, url: str, *, ctx: RunContext, trained: Trained,
              progress: Callable[..., None] | None = None) -> Any:
        """Write ``out`` resumably (:func:`engine.io.writer.write` with the resume
        identity plus the model hash); returns its ``WriteResult``. A kind that writes
        differently (``apply``: partitions appended along time) overrides it."""
        from engine.io.writer import write

        return write(out, url, resume=not (ctx.overwrite or ctx.restart),
                     overwrite=ctx.overwrite, restart=ctx.restart, fingerprint=ctx.identity,
                     identity={**ctx.identity, "model_hash": trained.model_hash},
                     storage_options=ctx.spec.output.storage_options, client=ctx.client,
                     progress=progress)

    def epochs(self, spec: Any) -> int | None:
        """Epochs a run trains at most (the progress bar's length), None if unknown."""
        return getattr(getattr(spec, "train", None), "epochs", None)

    def as_kind(self, source: str = "cube-engine") -> JobKind:
        """This job as a registry entry: ``run`` and ``plan`` are the shared runner's."""
        from engine.pipelines.runner import plan_job, run_job

        return JobKind(name=self.name, summary=self.summary, spec=self.spec,
                       run=functools.partial(run_job, self),
                       plan=functools.partial(plan_job, self), source=source, job=self)


def open_input(spec: Any, chunks: dict[str, int] | None = None) -> Prepared:
    """Open ``spec.input`` (catalog entry, chunks, storage options) lazily.

    Returns a bare :class:`Prepared` (no dims yet) whose fields a kind's ``prepare`` copies
    into its own subclass: ``Prepared(**vars(base), ...)``.
    """
    from engine.io.catalog import open_cube, read_entry

    catalog = spec.resolve(spec.input.catalog)
    kwargs: dict[str, Any] = {}
    if chunks or spec.input.chunks:
        kwargs["chunks"] = chunks or spec.input.chunks
    if spec.input.storage_options:
        kwargs["storage_options"] = spec.input.storage_options
    ds = open_cube(catalog, spec.input.entry, **kwargs)
    entry = read_entry(catalog, spec.input.entry)
    return Prepared(spec=spec, ds=ds, input_url=entry.url,
                    input_storage_options=dict(entry.storage_options or {}))
