"""Reprocessing an archive: apply a trained model to a catalog entry over a time range.

A kind on the job interface (:mod:`engine.pipelines.job`), run by the shared runner. Data
flow: open the catalog entry lazily, load the model (a training job's run folder or a
weights file with its registered architecture) and select the time range (``prepare``)
-> the model through :func:`engine.predict` over the range, from the first step of its
first partition (``predict``) -> ONE Zarr store appended along time, partition by
partition (:func:`engine.io.archive.write_archive`: each partition resumable from the
writer's manifest, its provenance recorded; the runner's ``write`` step) -> a table of
the partitions (``evaluate``, ``report``).

What a re-run does
    Same job, model and inputs: finished partitions are skipped without a write, an
    unfinished one (a killed run) redoes only the regions its manifest lacks. A longer
    time range appends the new partitions after the stored ones. A changed model (its
    hash), job (anything but ``time``) or a finished partition's input data is refused
    with one line unless ``--restart``, which recomputes the store.

Resume identity
    The job spec without ``time`` (so a longer range resumes), the catalog entry and the
    model hash; not the code version and not the whole input store (an archive that
    gains a year must still append it): each partition records its own input identity
    (:func:`engine.io.archive.input_identity`: the input store's objects that hold its
    steps) and the code version that computed it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import xarray as xr

from engine.dims import CubeDims, cube_dims
from engine.errors import CubeError, SpecError
from engine.pipelines._apply_models import InputField, ResolvedModel, resolve_model
from engine.pipelines.job import Job, JobResult, Prepared, Report, RunContext, Trained, open_input
from engine.pipelines.runner import RunPlan, plan_job, run_job, spec_fingerprint
from engine.pipelines.spec import InputSpec, JobSpecBase, OutputSpec

__all__ = ["ApplyModelSpec", "TimeRangeSpec", "ApplyOutputSpec", "ApplySpec", "Apply",
           "ApplyPrepared", "input_channels", "apply_model", "plan_run", "run_apply", "JOB"]


@dataclass(frozen=True)
class ApplyModelSpec:
    """The model: a training job's run folder (``run``), or a state_dict file
    (``weights``) with its registered ``architecture`` and ``kwargs``, its input
    ``variables`` in channel order (a coordinate such as ``latitude`` is broadcast to the
    grid) and how it is applied (``mode``: ``pixel``, ``field`` = whole 2-D fields, or
    ``tiled`` with ``tile``)."""

    run: str | None = None
    weights: str | None = None
    architecture: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    variables: list[str] = field(default_factory=list)
    mode: Literal["pixel", "field", "tiled"] = "pixel"
    tile: dict[str, int] | None = None
    #: Output variable name (default: ``<target>_predicted`` of a run, else ``prediction``).
    output: str | None = None
    units: str | None = None
    #: ``[lo, hi]``: outputs outside are written as NaN and flagged in ``<output>_flag``
    #: (default: a gap-filling run's training target range with its fill margin).
    valid_range: list[float] | None = None


@dataclass(frozen=True)
class TimeRangeSpec:
    """First and last period (``"1860"``, ``"1990-03"``, ``"2001-01-09"``), both
    included; empty: the archive's first / last step."""

    start: str | int | None = None
    end: str | int | None = None


@dataclass(frozen=True)
class ApplyOutputSpec(OutputSpec):
    #: Time steps per Zarr chunk; must divide every partition (1 always does).
    time_chunk: int = 1


@dataclass(frozen=True)
class ApplySpec(JobSpecBase):
    """An apply job: ``model`` over ``input`` for ``time``, one store partitioned by
    ``partition``."""

    name: str
    input: InputSpec
    model: ApplyModelSpec
    output: ApplyOutputSpec
    kind: Literal["apply"] = "apply"
    time: TimeRangeSpec = field(default_factory=TimeRangeSpec)
    partition: Literal["year", "month", "day", "decade"] = "year"
    device: str = "auto"
    seed: int = 0
    base_dir: str = "."

    def check(self) -> None:
        super().check()
        m = self.model
        if bool(m.run) == bool(m.weights):
            raise SpecError("model needs either run (a training job's run folder) or weights "
                            "(a state_dict file with architecture), not both or neither")
        if m.weights:
            if not m.architecture:
                raise SpecError("model.weights needs model.architecture (a registered "
                                "architecture, e.g. pixel_regressor)")
            if not m.variables:
                raise SpecError("model.weights needs model.variables: the input variables "
                                "in channel order, e.g. [tas_a1b, latitude]")
        if m.run and (m.architecture or m.kwargs or m.variables or m.tile):
            raise SpecError("model.run rebuilds its model from the run's own job: drop "
                            "model.architecture, kwargs, variables and tile")
        if m.valid_range is not None and not (len(m.valid_range) == 2 and
                                              m.valid_range[0] < m.valid_range[1]):
            raise SpecError(f"model.valid_range must be [low, high] with low < high, got "
                            f"{m.valid_range}")
        if m.mode == "tiled" and not m.tile:
            raise SpecError("model.mode tiled needs model.tile, e.g. {lat: 64, lon: 64}")
        for k, v in (m.tile or {}).items():
            if v < 1:
                raise SpecError(f"model.tile[{k!r}] must be >= 1, got {v}")
        dev = self.device.split(":")
        if dev[0] not in ("auto", "cpu", "cuda") or (len(dev) == 2 and not dev[1].isdigit()) \
                or len(dev) > 2 or (dev[0] != "cuda" and len(dev) == 2):
            raise SpecError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.output.time_chunk < 1:
            raise SpecError(f"output.time_chunk must be >= 1, got {self.output.time_chunk}")
        for what, value in (("time.start", self.time.start), ("time.end", self.time.end)):
            if value is not None:
                _period(value, what)
        if self.time.start and self.time.end and \
                _period(self.time.start, "time.start")[0] > _period(self.time.end, "time.end")[1]:
            raise SpecError(f"time.start {self.time.start} is after time.end {self.time.end}")


def _period(value: Any, what: str) -> tuple[np.datetime64, np.datetime64]:
    """``[first, last]`` instants of a period written as a date (``"1860"``: the year)."""
    text = str(value)
    try:
        d = np.datetime64(text)
    except ValueError:
        raise SpecError(f"{what} {text!r} is not a date: use YYYY, YYYY-MM or "
                        "YYYY-MM-DD") from None
    unit = np.datetime_data(d.dtype)[0]
    first = d.astype("datetime64[ns]")
    step = np.timedelta64(1, unit)  # type: ignore[call-overload]
    last = (d + step).astype("datetime64[ns]") - np.timedelta64(1, "ns")
    return first, last


@dataclass(kw_only=True)
class ApplyPrepared(Prepared):
    spec: ApplySpec
    dims: CubeDims
    time: str
    model: ResolvedModel
    #: The model's input channels as one lazy dataset over the whole archive.
    inputs: xr.Dataset
    #: Time indices ``[start, stop)`` of the range in the archive.
    start: int
    stop: int


@dataclass(kw_only=True)
class ApplyTrained(Trained):
    prepared: ApplyPrepared
    #: What the write did per partition (label, status, regions, seconds): the report.
    partitions: tuple[dict[str, Any], ...] = ()


def _channel(ds: xr.Dataset, f: InputField, like: xr.DataArray | None,
             dims: CubeDims) -> xr.DataArray:
    if f.variable not in ds.variables:
        raise CubeError(f"model input {f.variable!r} is not a variable or coordinate of the "
                        f"cube; its variables are {', '.join(map(str, ds.data_vars))}")
    var = ds[f.variable]
    if f.level is not None:
        vert = dims.vertical
        if vert is None or vert not in var.dims:
            raise CubeError(f"model input {f.label}: {f.variable!r} has no vertical dim")
        values = np.asarray(ds[vert].values, dtype=float)
        hit = np.flatnonzero(np.isclose(values, f.level))
        if hit.size == 0:
            raise CubeError(f"model input {f.label}: level {f.level:g} is not a level of "
                            f"{f.variable!r} ({', '.join(f'{v:g}' for v in values)})")
        var = var.isel({vert: int(hit[0])}, drop=True)
    if f.variable in ds.data_vars:
        return var.astype(np.float32)
    if like is None:
        raise CubeError(f"model input {f.variable!r} is a coordinate: list a data variable "
                        "first, whose grid it is broadcast to")
    if not np.issubdtype(var.dtype, np.number):
        raise CubeError(f"model input {f.variable!r} is a {var.dtype} coordinate, not numbers")
    # lazily, chunk by chunk (zeros + the coordinate): a broadcast numpy array chunked
    # into the graph would put the whole grid x time into every region's task
    out = xr.zeros_like(like, dtype=np.float32) + var.reset_coords(drop=True).astype(
        np.float32)
    return out.transpose(*like.dims).rename(f.variable)


def input_channels(ds: xr.Dataset, model: ResolvedModel, dims: CubeDims) -> xr.Dataset:
    """The model's inputs as one lazy dataset, a variable per channel in channel order
    (a coordinate broadcast to the grid as ``<name>__input``), all on one grid with the
    time dim.

    Raises
    ------
    CubeError
        An input that is not in the cube, not at its level, or not on the grid.
    """
    channels: list[xr.DataArray] = []
    for f in model.inputs:
        channels.append(_channel(ds, f, channels[0] if channels else None, dims))
    ref = channels[0]
    for f, c in zip(model.inputs, channels, strict=True):
        if c.dims != ref.dims:
            raise CubeError(f"model input {f.label} has dims {c.dims}, {model.inputs[0].label} "
                            f"{ref.dims}: inputs must share one grid")
    if dims.time not in ref.dims:
        raise CubeError(f"model input {model.inputs[0].label} has no time dim {dims.time!r}")
    return xr.Dataset({_name(f, ds): c.reset_coords(drop=True)
                       for f, c in zip(model.inputs, channels, strict=True)})


def prepare(spec: ApplySpec) -> ApplyPrepared:
    """Open the cube, load the model and select the time range; every name, the range and
    the model are checked here, so ``validate`` finds what a run would."""
    base = open_input(spec)
    ds = base.ds

    def grid(inputs: list[InputField]) -> tuple[int, int]:
        name = next((f.variable for f in inputs if f.variable in ds.data_vars), None)
        if name is None:
            raise CubeError(f"none of the model inputs {[f.label for f in inputs]} is a data "
                            f"variable of the cube ({', '.join(map(str, ds.data_vars))})")
        y, x = cube_dims(ds[name], spec.input.dims).horizontal
        return int(ds.sizes[y]), int(ds.sizes[x])

    model = resolve_model(spec.model, spec.resolve, grid)
    first_var = next((f.variable for f in model.inputs if f.variable in ds.data_vars), None)
    if first_var is None:
        raise CubeError(f"none of the model inputs {[f.label for f in model.inputs]} is a "
                        f"data variable of the cube ({', '.join(map(str, ds.data_vars))})")
    dims = cube_dims(ds[first_var], spec.input.dims)
    dims.horizontal  # noqa: B018 -- raises a one-line CubeError naming input.dims
    if dims.time is None:
        raise CubeError(f"the cube has no time dim ({', '.join(map(str, ds.dims))}): apply "
                        "reprocesses an archive along time; name it in input.dims.time")
    t = dims.time
    inputs = input_channels(ds, model, dims)
    times = np.asarray(ds[t].values)
    if times.dtype.kind != "M":
        raise CubeError(f"the cube's time coordinate {t!r} holds {times.dtype}, not dates: "
                        "decode it in the catalog entry")
    start, stop = _range_indices(spec, times, base.input_url or spec.input.entry)
    inputs = inputs.chunk({t: spec.output.time_chunk})
    return ApplyPrepared(spec=spec, ds=ds, dims=dims, time=t, model=model, inputs=inputs,
                         start=start, stop=stop, input_url=base.input_url,
                         input_storage_options=base.input_storage_options)


def _name(f: InputField, ds: xr.Dataset) -> str:
    """The channel's variable name: its label, ``<name>__input`` for a coordinate (a
    data variable may not share a coordinate's name)."""
    return f.label if f.variable in ds.data_vars else f"{f.label}__input"


def _range_indices(spec: ApplySpec, times: np.ndarray, where: str) -> tuple[int, int]:
    """``[start, stop)`` of the archive's steps inside the time range; one line when the
    range lies outside the archive."""
    lo, hi = times[0], times[-1]
    span = f"{str(lo)[:10]} to {str(hi)[:10]}"
    start, stop = 0, len(times)
    if spec.time.start:
        first, last = _period(spec.time.start, "time.start")
        if last < lo or first > hi:
            raise SpecError(f"time.start {spec.time.start} is outside the archive "
                            f"{where} ({span}): choose a start in that range")
        start = int(np.searchsorted(times, first))
    if spec.time.end:
        first, last = _period(spec.time.end, "time.end")
        if first > hi or last < lo:
            raise SpecError(f"time.end {spec.time.end} is outside the archive {where} "
                            f"({span}): choose an end in that range")
        stop = int(np.searchsorted(times, last, side="right"))
    if stop <= start:
        raise SpecError(f"time {spec.time.start}..{spec.time.end} holds no step of the "
                        f"archive {where} ({span})")
    return start, stop


def apply_model(inputs: xr.Dataset, model: ResolvedModel, dims: CubeDims,
                time_chunk: int = 1, device: str = "auto") -> xr.Dataset:
    """The model over ``inputs`` (lazy): one float32 variable, chunked ``time_chunk``
    along time, CF attributes and the model's provenance.

    Examples
    --------
    >>> import torch, dask.array as da
    >>> from engine.dims import cube_dims
    >>> t = np.array(["2001-01-01", "2002-01-01"], dtype="datetime64[ns]")
    >>> x = xr.Dataset({"a": (("time", "lat", "lon"), da.ones((2, 3, 4), chunks=1))},
    ...                coords={"time": t, "lat": [0.0, 1, 2], "lon": [0.0, 1, 2, 3]})
    >>> net = torch.nn.Linear(1, 1)
    >>> _ = torch.nn.init.constant_(net.weight, 2.0), torch.nn.init.zeros_(net.bias)
    >>> m = ResolvedModel(module=net, model_hash="h", inputs=[InputField("a")], mode="pixel",
    ...                   output="b")
    >>> out = apply_model(x, m, cube_dims(x))
    >>> float(out["b"].sum()), out["b"].chunks[0]
    (48.0, (1, 1))
    """
    from engine.ml.predict import predict

    y, x = dims.horizontal
    names = [str(n) for n in inputs.data_vars]
    if model.mode == "pixel":
        pred = predict(inputs, model.module, variables=names, tile=None, device=device,
                       output_name=model.output)
    elif model.mode == "field":
        pred = predict(inputs, model.module, variables=names,
                       tile={y: inputs.sizes[y], x: inputs.sizes[x]}, overlap=0.0,
                       blend="mean", device=device, output_name=model.output)
    else:
        pred = predict(inputs, model.module, variables=names, tile=model.tile, device=device,
                       output_name=model.output)
    assert dims.time is not None
    pred = pred.astype(np.float32).chunk({dims.time: time_chunk})
    keep = [c for c in pred.coords if c not in pred.dims]
    pred = pred.drop_vars(keep)
    attrs = {"long_name": f"{model.output} (model applied to {', '.join(names)})",
             "comment": pred.attrs.get("engine_predict", ""),
             "engine_model_hash": model.model_hash,
             "engine_model_source": json.dumps(model.source, sort_keys=True, default=str)}
    if model.units:
        attrs["units"] = model.units
    if model.valid_range is None:
        pred.attrs = attrs
        return xr.Dataset({model.output: pred})
    # physically implausible output is flagged, never written as data
    lo, hi = model.valid_range
    outside = (pred < lo) | (pred > hi)  # NaN (no valid input) is not flagged
    pred = pred.where(~outside)
    pred.attrs = {**attrs, "valid_range": [lo, hi]}
    flag = outside.astype(np.int8)
    flag.attrs = {"long_name": f"whether {model.output} lies outside its valid range",
                  "flag_values": [0, 1],
                  "flag_meanings": "within_valid_range_or_no_input "
                                   "outside_valid_range_not_written"}
    return xr.Dataset({model.output: pred, f"{model.output}_flag": flag})


class Apply(Job):
    """A trained model over an archive, one store appended partition by partition."""

    name = "apply"
    summary = ("apply a trained model (a run folder or weights + architecture) to an "
               "archive over a time range: one Zarr store appended partition by partition, "
               "resumable, provenance per partition")
    title = "archive reprocessing"
    spec = ApplySpec

    def prepare(self, spec: ApplySpec) -> ApplyPrepared:
        return prepare(spec)

    def describe(self, p: ApplyPrepared) -> str:  # type: ignore[override]
        times = p.ds[p.time].values
        src = p.model.source.get("run") or p.model.source.get("weights")
        return (f"model {src} ({p.model.mode}, {', '.join(f.label for f in p.model.inputs)}"
                f" -> {p.model.output}); {p.stop - p.start} steps "
                f"{str(times[p.start])[:10]}..{str(times[p.stop - 1])[:10]} by "
                f"{p.spec.partition}")

    def identity(self, spec: ApplySpec, prepared: Prepared) -> dict[str, str]:
        """The job without its time range, the catalog entry and the model hash (the
        model's content: where its run folder or weights file lies does not count)."""
        assert isinstance(prepared, ApplyPrepared)
        bare = replace(spec, time=TimeRangeSpec(),
                       model=replace(spec.model, run=None, weights=None))
        return {"job": spec_fingerprint(bare),
                "input_entry": f"{spec.input.entry}",
                "model": prepared.model.model_hash}

    def train(self, p: ApplyPrepared, split: Any,  # type: ignore[override]
              ctx: RunContext) -> ApplyTrained:
        ctx.log(f"model: {json.dumps(p.model.source, default=str)} "
                f"(hash {p.model.model_hash[:12]})")
        return ApplyTrained(model=p.model.module, info={"source": p.model.source},
                            model_hash=p.model.model_hash, checkpoints=[], fresh=False,
                            prepared=p)

    def predict(self, p: ApplyPrepared, split: Any,  # type: ignore[override]
                trained: ApplyTrained, ctx: RunContext) -> xr.Dataset:
        start = _first_step(p, ctx)
        sel = p.inputs.isel({p.time: slice(start, p.stop)})
        out = apply_model(sel, p.model, p.dims, p.spec.output.time_chunk, p.spec.device)
        out.attrs.update({"engine_model_source": json.dumps(p.model.source, sort_keys=True,
                                                            default=str),
                          "engine_partition": p.spec.partition})
        return out

    def write(self, out: xr.Dataset, url: str, *, ctx: RunContext,  # type: ignore[override]
              trained: ApplyTrained, progress: Callable[..., None] | None = None) -> Any:
        from engine.io.archive import input_identity, write_archive

        p = trained.prepared
        offset = int(np.searchsorted(p.ds[p.time].values, out[p.time].values[0]))
        names = sorted({f.variable for f in p.model.inputs if f.variable in p.ds.data_vars})
        ident = input_identity(p.ds, names, p.time, url=p.input_url,
                               storage_options=p.input_storage_options)
        res = write_archive(
            out, url, time_dim=p.time, every=p.spec.partition, identity=ctx.identity,
            input_identity=lambda a, b: ident(offset + a, offset + b),
            model_hash=trained.model_hash, storage_options=ctx.spec.output.storage_options,
            restart=ctx.restart, overwrite=ctx.overwrite,
            inputs=[u for u in (p.input_url,) if u], client=ctx.client, progress=progress)
        trained.partitions = res.partitions
        return res

    def evaluate(self, p: ApplyPrepared, split: Any,  # type: ignore[override]
                 trained: ApplyTrained, written: xr.Dataset,
                 ctx: RunContext) -> dict[str, Any]:
        from engine.io.archive import read_partitions

        parts = read_partitions(ctx.url, ctx.spec.output.storage_options)
        times = written[p.time].values
        return {
            "job": p.spec.name,
            "model_hash": trained.model_hash,
            "model_source": p.model.source,
            "output_variable": p.model.output,
            "partition": p.spec.partition,
            "store": {"steps": int(times.size), "first": str(times[0])[:19],
                      "last": str(times[-1])[:19], "partitions": len(parts)},
            "partitions": [{k: parts[lab].get(k) for k in
                            ("label", "first", "last", "status", "regions", "seconds",
                             "code_version", "input_identity", "model_hash")}
                           for lab in sorted(parts, key=lambda lab: parts[lab]["start"])],
        }

    def report(self, p: ApplyPrepared, split: Any,  # type: ignore[override]
               trained: ApplyTrained, metrics: dict[str, Any], written: xr.Dataset,
               ctx: RunContext) -> Report:
        this = trained.partitions
        rows = []
        for status in ("written", "resumed", "skipped"):
            got = [q for q in this if q["status"] == status]
            if got:
                rows.append([status, str(len(got)), f"{got[0]['label']}..{got[-1]['label']}",
                             str(sum(q["regions_written"] for q in got)),
                             f"{sum(q['seconds'] for q in got):.1f}"])
        s = metrics["store"]
        return Report(
            title=f"{p.spec.name}: {p.model.output} over {p.spec.input.entry} by "
                  f"{p.spec.partition}",
            columns=["partitions", "count", "labels", "regions written", "seconds"],
            rows=rows,
            notes=[f"store holds {s['partitions']} partitions, {s['steps']} steps "
                   f"{s['first'][:10]}..{s['last'][:10]}; model {trained.model_hash[:12]}"],
            summary={"partitions": [q["label"] for q in this], "store": s})


def _first_step(p: ApplyPrepared, ctx: RunContext) -> int:
    """Where this run's output starts in the archive: the requested start moved back to
    its partition's first step, and to the step after the store's last one when the store
    ends before it (no gap)."""
    from engine.io.archive import plan_partitions, stored_times

    times = p.ds[p.time].values
    start = p.start
    for part in plan_partitions(times, p.spec.partition):
        if part.start <= start < part.stop:
            start = part.start
            break
    if ctx.restart or ctx.overwrite:
        return start
    try:
        old = stored_times(ctx.url, ctx.spec.output.storage_options, p.time)
    except Exception:  # not an archive store: the write step says what is wrong
        return start
    if old is not None and old.size and old[-1] < times[start]:
        start = min(start, int(np.searchsorted(times, old[-1], side="right")))
    return start


APPLY = Apply()
JOB = APPLY.as_kind()
#: ``plan_run(spec, output, *, overwrite, restart, must_resume)``: the runner's plan.
plan_run = functools.partial(plan_job, APPLY)


def run_apply(spec: ApplySpec, *, output: str | None = None, overwrite: bool = False,
              restart: bool = False, client: Any = None,
              on_region: Callable[..., None] | None = None,
              log: Callable[[str], None] = lambda s: None,
              plan: RunPlan | None = None) -> JobResult:
    """Run an apply job through the shared runner (:func:`run_job`)."""
    return run_job(APPLY, spec, output=output, overwrite=overwrite, restart=restart,
                   client=client, on_region=on_region, log=log, plan=plan)
