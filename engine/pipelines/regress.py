"""The CNN regression job (document 000): one 2-D field predicted from others by the
Unidata post's network (Conv2D 32 5x5 ELU, twice, then Conv2D 1 5x5, 'same' padding),
split by ensemble member, scored against two baselines.

A kind on the job interface (:mod:`engine.pipelines.job`). Data flow: pick each field
(variable at a level) of the cube and check it (``prepare``) -> members to train /
validation / test, no member in two parts (``split``) -> training statistics, the
climatology and the thickness fit from the training members only, one distributed pass;
the training and validation fields through the CNN (``train``) -> the test members'
fields through :func:`engine.predict` as whole fields, next to the truth and both baselines
(``predict``) -> RMSE, MAE and R2 of the CNN and each baseline on the test members, from
the written store (``evaluate``) -> maps and the table (``report``).

Baselines (fitted on the training members only, scored on the test members)
    ``climatology``: the training members' mean over members and time steps, per grid cell
    (a time-mean climatology of the sample). ``thickness_linear``: ``a + b * (upper -
    lower)``, a least-squares line of the target on the geopotential thickness of a layer
    (the hypsometric relation: the 500-850 hPa thickness is proportional to the layer's
    mean virtual temperature).

Standardisation (``model.standardise``)
    ``cell`` (default): inputs and target as anomalies from the training members' mean
    field per grid cell, scaled by one standard deviation per channel; the CNN predicts the
    target's anomaly, so it starts from the climatology and learns the weather's departure
    from it. ``field``: one mean and standard deviation per channel (document 000's
    set-up); a translation-invariant CNN then has to infer where it is from the fields.

The training and validation members' fields are read into the training process (the
ERA5 sample's 7 + 1 members are 0.7 MB); prediction and scoring run blockwise on the
cluster. Every test field is predicted whole, as the CNN was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import numpy as np
import xarray as xr

from engine.dims import CubeDims, cube_dims
from engine.errors import CubeError, SpecError
from engine.ops.stats import check_variables, compute_metrics
from engine.pipelines.job import Job, Prepared, Report, RunContext, Trained, open_input
from engine.pipelines.spec import (
    InputSpec,
    JobSpecBase,
    OutputSpec,
    TrackingSpec,
    TrainSpec,
)

__all__ = ["FieldSpec", "ThicknessSpec", "MemberSplitSpec", "CNNSpec", "RegressOutputSpec",
           "RegressSpec", "Regress", "MemberSplit", "member_split", "thickness_fit",
           "plausible_range", "JOB"]

CHECKPOINT = "best.pt"


@dataclass(frozen=True)
class FieldSpec:
    """One 2-D field of the cube: a variable, at one value of its vertical dim if it has
    one (``{variable: z, level: 500}``)."""

    variable: str
    level: float | None = None

    @property
    def label(self) -> str:
        """``z500``, ``t850``; the variable's name for a field without a level."""
        if self.level is None:
            return self.variable
        lev = int(self.level) if float(self.level).is_integer() else self.level
        return f"{self.variable}{lev}"


@dataclass(frozen=True)
class ThicknessSpec:
    """The layer of the ``thickness_linear`` baseline: ``upper - lower`` geopotential."""

    upper: FieldSpec
    lower: FieldSpec


@dataclass(frozen=True)
class MemberSplitSpec:
    """Ensemble members held out for validation (early stopping) and test; every other
    member trains. ``dim``: the member dim (default: the dim whose coordinate has
    ``standard_name: realization``)."""

    validation: list[int] = field(default_factory=lambda: [7])
    test: list[int] = field(default_factory=lambda: [8, 9])
    dim: str | None = None


@dataclass(frozen=True)
class RegressOutputSpec(OutputSpec):
    #: A prediction outside the training target's [min, max], widened by this share of its
    #: width on each side, is physically implausible here: flagged, written as NaN.
    range_margin: float = 0.1


@dataclass(frozen=True)
class CNNSpec:
    architecture: Literal["unidata_cnn"] = "unidata_cnn"
    filters: int = 32
    kernel_size: int = 5
    standardise: Literal["cell", "field"] = "cell"


@dataclass(frozen=True)
class RegressSpec(JobSpecBase):
    """A CNN regression job: ``target`` field from ``features`` fields, split by member."""

    name: str
    input: InputSpec
    target: FieldSpec
    features: list[FieldSpec]
    output: RegressOutputSpec
    kind: Literal["regress"] = "regress"
    thickness: ThicknessSpec | None = None
    split: MemberSplitSpec = field(default_factory=MemberSplitSpec)
    model: CNNSpec = field(default_factory=CNNSpec)
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=60, batch_size=4,
                                                                learning_rate=2e-3,
                                                                patience=10))
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    seed: int = 0
    #: Directory of the job file; relative catalog paths resolve against it.
    base_dir: str = "."

    def check(self) -> None:
        super().check()
        labels = [f.label for f in self.features]
        if not labels:
            raise SpecError("features must list at least one field, e.g. "
                            "[{variable: z, level: 500}]")
        dup = next((x for x in labels if labels.count(x) > 1), None)
        if dup:
            raise SpecError(f"features lists {dup} twice; list each field once")
        if self.target.label in labels:
            raise SpecError(f"target {self.target.label} is also a feature; remove it there")
        s = self.split
        for name, members in (("split.validation", s.validation), ("split.test", s.test)):
            if not members:
                raise SpecError(f"{name} must list at least one member, e.g. [8, 9]")
            if len(set(members)) != len(members):
                raise SpecError(f"{name} lists a member twice: {members}")
        both = sorted(set(s.validation) & set(s.test))
        if both:
            raise SpecError(f"members {both} are in split.validation and split.test; a "
                            "member belongs to one part only")
        if not 0 <= self.output.range_margin <= 1:
            raise SpecError(f"output.range_margin must be in [0, 1] (a share of the training "
                            f"target's range), got {self.output.range_margin}")
        m = self.model
        if not 1 <= m.filters <= 1024:
            raise SpecError(f"model.filters must be in [1, 1024], got {m.filters}")
        if not (1 <= m.kernel_size <= 15 and m.kernel_size % 2 == 1):
            raise SpecError(f"model.kernel_size must be odd and in [1, 15] ('same' padding), "
                            f"got {m.kernel_size}")


@dataclass(kw_only=True)
class RegressPrepared(Prepared):
    spec: RegressSpec
    dims: CubeDims
    #: The member dim, and each field by label as (member, [time,] y, x).
    member: str
    fields: dict[str, xr.DataArray]


@dataclass(frozen=True)
class MemberSplit:
    """Member values of each part; no member is in two parts."""

    dim: str
    train: list[int]
    validation: list[int]
    test: list[int]

    def attrs(self) -> dict[str, Any]:
        return {"split_method": "member", "split_dim": self.dim, "split_train": self.train,
                "split_validation": self.validation, "split_test": self.test}


@dataclass(kw_only=True)
class RegressTrained(Trained):
    #: ``(intercept, slope)`` of the thickness baseline, None without one.
    thickness: tuple[float, float] | None = None


def _member_dim(ds: xr.Dataset, var: xr.DataArray, name: str | None) -> str:
    if name is not None:
        if name not in var.dims:
            raise CubeError(f"split.dim {name!r} is not a dim of the cube "
                            f"({', '.join(map(str, var.dims))})")
        return name
    for d in var.dims:
        if d in ds.coords and ds[d].attrs.get("standard_name") == "realization":
            return str(d)
    raise CubeError("cannot tell which dim holds the ensemble members: name it in the job "
                    "(split.dim: number)")


def _select(ds: xr.Dataset, f: FieldSpec, what: str, dims: CubeDims,
            member: str) -> xr.DataArray:
    """The field ``f`` as (member, other dims, y, x): the variable at its level."""
    check_variables(ds, [f.variable], what)
    var = ds[f.variable]
    vert = dims.vertical if dims.vertical in var.dims else None
    if f.level is None:
        if vert is not None:
            levels = ", ".join(f"{v:g}" for v in ds[vert].values)
            raise CubeError(f"{what} {f.variable!r} has levels ({vert}: {levels}): give one, "
                            f"e.g. {{variable: {f.variable}, level: {ds[vert].values[0]:g}}}")
    else:
        if vert is None:
            raise CubeError(f"{what} {f.variable!r} has no vertical dim: drop its level "
                            f"{f.level:g}")
        values = np.asarray(ds[vert].values, dtype=float)
        hit = np.flatnonzero(np.isclose(values, f.level))
        if hit.size == 0:
            raise CubeError(f"{what} level {f.level:g} is not a level of {f.variable!r} "
                            f"({vert}: {', '.join(f'{v:g}' for v in values)})")
        var = var.isel({vert: int(hit[0])}, drop=True)
    y, x = dims.horizontal
    if member not in var.dims:
        raise CubeError(f"{what} {f.label} has no member dim {member!r}")
    rest = [str(d) for d in var.dims if d not in (member, y, x)]
    extra = [d for d in rest if d != dims.time]
    if extra:
        raise CubeError(f"{what} {f.label} has dims {extra} besides members, time and the "
                        "horizontal ones; select them in the catalog entry")
    return var.transpose(member, *rest, y, x).astype(np.float32)


def prepare(spec: RegressSpec) -> RegressPrepared:
    """Open the cube and pick every field; checks every variable, level and dim the job
    names against the cube, so ``validate`` finds what a run would."""
    base = open_input(spec)
    ds = base.ds
    check_variables(ds, [spec.target.variable], "target")
    dims = cube_dims(ds[spec.target.variable], spec.input.dims)
    dims.horizontal  # noqa: B018 -- raises a one-line CubeError naming input.dims
    member = _member_dim(ds, ds[spec.target.variable], spec.split.dim)
    wanted = [("target", spec.target), *(("feature", f) for f in spec.features)]
    if spec.thickness is not None:
        wanted += [("thickness.upper", spec.thickness.upper),
                   ("thickness.lower", spec.thickness.lower)]
    fields: dict[str, xr.DataArray] = {}
    for what, f in wanted:
        fields.setdefault(f.label, _select(ds, f, what, dims, member))
    tdim = dims.time if dims.time in fields[spec.target.label].dims else None
    n_steps = ds.sizes[tdim] if tdim else 1
    if not spec.output.plot_time < n_steps:
        raise SpecError(f"output.plot_time must be in [0, {n_steps}) (the time steps of "
                        f"{spec.target.label}), got {spec.output.plot_time}")
    shapes = {lab: a.shape for lab, a in fields.items()}
    if len(set(shapes.values())) != 1:
        raise CubeError(f"the fields differ in shape {shapes}: use fields on one grid")
    return RegressPrepared(spec=spec, ds=ds, dims=dims, member=member, fields=fields,
                           input_url=base.input_url,
                           input_storage_options=base.input_storage_options)


def member_split(p: RegressPrepared) -> MemberSplit:
    """Validation and test members as the spec lists them; every other member trains."""
    s = p.spec.split
    members = [int(m) for m in p.ds[p.member].values]
    for name, part in (("split.validation", s.validation), ("split.test", s.test)):
        missing = [m for m in part if m not in members]
        if missing:
            raise CubeError(f"{name} members {missing} are not in the cube ({p.member}: "
                            f"{', '.join(map(str, members))})")
    train = [m for m in members if m not in s.validation and m not in s.test]
    if not train:
        raise CubeError(f"no member is left to train on: the cube has {members}; hold out "
                        "fewer in split.validation and split.test")
    return MemberSplit(dim=p.member, train=train, validation=list(s.validation),
                       test=list(s.test))


def thickness_fit(thickness: xr.DataArray, target: xr.DataArray) -> dict[str, Any]:
    """The lazy sums of a least-squares line ``target = a + b * thickness``; evaluate them
    with :func:`dask.compute` and pass the result to :func:`_line`."""
    x, y = thickness.astype(np.float64), target.astype(np.float64)
    return {"n": x.count(), "sx": x.sum(), "sy": y.sum(), "sxx": (x * x).sum(),
            "sxy": (x * y).sum()}


def _line(sums: dict[str, Any]) -> tuple[float, float]:
    n, sx, sy = float(sums["n"]), float(sums["sx"]), float(sums["sy"])
    sxx, sxy = float(sums["sxx"]), float(sums["sxy"])
    var = sxx - sx * sx / n
    if not var > 0:
        raise CubeError("the thickness is constant over the training members: the "
                        "thickness_linear baseline cannot be fitted")
    slope = (sxy - sx * sy / n) / var
    return sy / n - slope * sx / n, slope


def plausible_range(target_range: list[float], margin: float) -> tuple[float, float]:
    """The training target's ``[min, max]`` widened by ``margin`` of its width each side.

    >>> plausible_range([250.0, 300.0], 0.1)
    (245.0, 305.0)
    """
    lo, hi = (float(v) for v in target_range)
    pad = margin * (hi - lo)
    return lo - pad, hi + pad


def _climatology(p: RegressPrepared, s: MemberSplit) -> xr.DataArray:
    """The training members' mean per grid cell (over members and time steps)."""
    t = p.fields[p.spec.target.label].sel({s.dim: s.train})
    y, x = p.dims.horizontal
    return t.mean([d for d in t.dims if d not in (y, x)])


def _stacked(p: RegressPrepared, members: list[int], labels: list[str]) -> np.ndarray:
    """(fields, channels, y, x) of ``members``, every other dim stacked into fields."""
    arrays = dask.compute(*(p.fields[lab].sel({p.member: members}) for lab in labels))
    y, x = p.dims.horizontal
    return np.stack([a.values.reshape(-1, a.sizes[y], a.sizes[x]) for a in arrays], axis=1)


class Regress(Job):
    """CNN regression of one field from others (document 000), split by member."""

    name = "regress"
    summary = ("CNN regression of one 2-D field from others (document 000's Conv2D 5x5 ELU "
               "network), split by ensemble member, against climatology and thickness baselines")
    title = "CNN regression"
    spec = RegressSpec

    def prepare(self, spec: RegressSpec) -> RegressPrepared:
        return prepare(spec)

    def split(self, prepared: RegressPrepared) -> MemberSplit:  # type: ignore[override]
        return member_split(prepared)

    def describe(self, p: RegressPrepared) -> str:  # type: ignore[override]
        s = member_split(p)
        return (f"target {p.spec.target.label} from "
                f"{', '.join(f.label for f in p.spec.features)}; members train {s.train}, "
                f"validation {s.validation}, test {s.test}; cube {dict(p.ds.sizes)}")

    def _model(self, p: RegressPrepared, stats: dict[str, np.ndarray]) -> Any:
        from engine.ml.fields import FieldStandardized
        from engine.ml.registry import build_architecture

        m = p.spec.model
        net = build_architecture(m.architecture, in_channels=len(p.spec.features),
                                 filters=m.filters, kernel_size=m.kernel_size)
        return FieldStandardized(net, stats["x_mean"], stats["x_std"], stats["y_mean"],
                                 stats["y_std"])

    def _statistics(self, p: RegressPrepared, s: MemberSplit) -> tuple[dict, Any]:
        """Standardisation statistics and the thickness line, from the training members
        only, in one distributed pass."""
        spec = p.spec
        y, x = p.dims.horizontal
        labels = [f.label for f in spec.features] + [spec.target.label]
        lazy: dict[str, Any] = {}
        for lab in labels:
            a = p.fields[lab].sel({s.dim: s.train}).astype(np.float64)
            over = [d for d in a.dims if d not in (y, x)]
            if spec.model.standardise == "cell":
                mean = a.mean(over)
                lazy[lab] = (mean, np.sqrt(((a - mean) ** 2).mean()))
            else:
                lazy[lab] = (a.mean(), a.std())
        target = p.fields[spec.target.label].sel({s.dim: s.train})
        lazy["target_range"] = (target.min(), target.max())
        if spec.thickness is not None:
            th = spec.thickness
            thick = p.fields[th.upper.label] - p.fields[th.lower.label]
            lazy["thickness"] = thickness_fit(thick.sel({s.dim: s.train}),
                                              p.fields[spec.target.label].sel({s.dim: s.train}))
        (res,) = dask.compute(lazy)

        def arr(v: Any) -> np.ndarray:
            v = np.asarray(v)
            return v.reshape(1, *v.shape) if v.ndim == 2 else v.reshape(1, 1, 1)

        feats = [f.label for f in spec.features]
        stats = {"x_mean": np.concatenate([arr(res[lab][0]) for lab in feats]),
                 "x_std": np.concatenate([arr(res[lab][1]).reshape(1, 1, 1) for lab in feats]),
                 "y_mean": arr(res[spec.target.label][0]),
                 "y_std": arr(res[spec.target.label][1]).reshape(1, 1, 1),
                 "target_range": np.array([float(v) for v in res["target_range"]])}
        line = _line(res["thickness"]) if "thickness" in res else None
        return stats, line

    def train(self, p: RegressPrepared, s: MemberSplit,  # type: ignore[override]
              ctx: RunContext) -> RegressTrained:
        from engine.ml.fields import FieldBatches
        from engine.ml.train import (
            load_checkpoint,
            model_hash,
            plot_loss,
            seed_everything,
            train_model,
        )

        spec = p.spec
        seed_everything(spec.seed)
        if ctx.previous is not None:
            info = ctx.previous
            y, x = p.dims.horizontal
            n_in, shape = len(spec.features), (p.ds.sizes[y], p.ds.sizes[x])
            cell = spec.model.standardise == "cell"
            zeros = {"x_mean": np.zeros((n_in, *shape) if cell else (n_in, 1, 1)),
                     "x_std": np.ones((n_in, 1, 1)),
                     "y_mean": np.zeros((1, *shape) if cell else (1, 1, 1)),
                     "y_std": np.ones((1, 1, 1))}
            model = self._model(p, zeros)
            ctx.log(f"resuming: reusing the trained model in {ctx.path(CHECKPOINT)}")
            load_checkpoint(model, ctx.path(CHECKPOINT))
            fresh = False
        else:
            stats, line = self._statistics(p, s)
            model = self._model(p, stats)
            feats = [f.label for f in spec.features]
            target = [spec.target.label]
            t = spec.train
            train = FieldBatches(_stacked(p, s.train, feats), _stacked(p, s.train, target),
                                 t.batch_size, shuffle=True, seed=spec.seed)
            val = FieldBatches(_stacked(p, s.validation, feats),
                               _stacked(p, s.validation, target), t.batch_size)
            ctx.log(f"training fields: {len(train)} ({len(s.train)} members), validation "
                    f"{len(val)}; {sum(q.numel() for q in model.net.parameters()):,} weights")
            res = train_model(model, train, val, epochs=t.epochs,
                              learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                              patience=t.patience, min_delta=t.min_delta,
                              checkpoint=ctx.path(CHECKPOINT), seed=spec.seed,
                              on_epoch=ctx.on_epoch)
            plot_loss(res.history, ctx.path("loss.png"),
                      title=f"{spec.name}: {spec.model.architecture}")
            info = {"n_train_fields": len(train), "n_validation_fields": len(val),
                    "target_range": [float(v) for v in stats["target_range"]],
                    "thickness_fit": None if line is None
                    else {"intercept": line[0], "slope": line[1]},
                    "best_epoch": res.best_epoch, "best_val_loss": res.best_val_loss,
                    "epochs_run": len(res.history), "stopped_early": res.stopped_early,
                    "seconds": res.seconds,
                    "fields_per_s": res.samples_per_s,
                    # pixels per second, the unit of the other kinds' training rates
                    "samples_per_s": res.samples_per_s * int(np.prod(train.y.shape[-2:])),
                    "history": res.history}
            fresh = True
        model.eval()
        fit = info.get("thickness_fit")
        return RegressTrained(model=model, info=info, model_hash=model_hash(model),
                              checkpoints=[CHECKPOINT], fresh=fresh,
                              thickness=None if fit is None
                              else (float(fit["intercept"]), float(fit["slope"])))

    def predict(self, p: RegressPrepared, s: MemberSplit,  # type: ignore[override]
                trained: RegressTrained, ctx: RunContext) -> xr.Dataset:
        from engine.ml.predict import predict

        spec = p.spec
        y, x = p.dims.horizontal
        tgt = spec.target.label
        test = {s.dim: s.test}
        feats = xr.Dataset({f.label: p.fields[f.label].sel(test) for f in spec.features})
        # whole fields, as the CNN was trained (per-cell statistics fit only the full grid)
        pred = predict(feats, trained.model, variables=[f.label for f in spec.features],
                       tile={y: p.ds.sizes[y], x: p.ds.sizes[x]}, overlap=0.0, blend="mean",
                       output_name=f"{tgt}_predicted")
        truth = p.fields[tgt].sel(test)
        src = p.fields[tgt].attrs
        units = src.get("units")

        def attrs(long_name: str, comment: str) -> dict[str, Any]:
            a = {"long_name": long_name, "comment": comment}
            return {**a, "units": units} if units else a

        lo, hi = plausible_range(trained.info["target_range"], spec.output.range_margin)
        ok = (pred >= lo) & (pred <= hi)
        flag = xr.where(ok, 0, 1).astype(np.int8)
        flag.attrs = {"long_name": f"whether {tgt}_predicted lies in the training range",
                      "flag_values": [0, 1],
                      "flag_meanings": "in_training_range outside_training_range_not_written",
                      "valid_range": [lo, hi]}
        out = {tgt: truth.assign_attrs({k: v for k, v in src.items()
                                        if k in ("units", "long_name", "standard_name")}),
               f"{tgt}_predicted": pred.where(ok).astype(np.float32).assign_attrs(attrs(
                   f"{tgt} predicted by the CNN", "NaN where outside the training range "
                   f"[{lo:.6g}, {hi:.6g}] (see {tgt}_flag); {pred.attrs.get('engine_predict')}")),
               f"{tgt}_flag": flag,
               f"{tgt}_climatology": _climatology(p, s).broadcast_like(truth)
               .astype(np.float32).assign_attrs(attrs(
                   f"{tgt} climatology baseline", "mean of the training members over members "
                   "and time steps, per grid cell"))}
        if trained.thickness is not None and spec.thickness is not None:
            a, b = trained.thickness
            th = spec.thickness
            thick = (p.fields[th.upper.label] - p.fields[th.lower.label]).sel(test)
            out[f"{tgt}_thickness_linear"] = (a + b * thick).astype(np.float32).assign_attrs(
                attrs(f"{tgt} from the {th.upper.label}-{th.lower.label} thickness",
                      f"least-squares line on the training members: {a:.6g} + {b:.6g} * "
                      f"({th.upper.label} - {th.lower.label})"))
        ds = xr.Dataset(out)
        ds = ds.chunk({d: truth.chunksizes[d][0] for d in truth.dims})
        ds.attrs.update({
            "engine_split": json.dumps(s.attrs()),
            "engine_target": tgt,
            "engine_features": json.dumps([f.label for f in spec.features]),
            "engine_model_kind": spec.model.architecture,
            "engine_standardise": spec.model.standardise,
        })
        return ds

    def evaluate(self, p: RegressPrepared, s: MemberSplit,  # type: ignore[override]
                 trained: RegressTrained, written: xr.Dataset,
                 ctx: RunContext) -> dict[str, Any]:
        spec = p.spec
        tgt = spec.target.label
        truth = written[tgt]
        baselines = {b: written[f"{tgt}_{b}"] for b in ("climatology", "thickness_linear")
                     if f"{tgt}_{b}" in written}
        # reference only: the same time step's mean of the training members, which a
        # forecast could not know; it measures how alike the members are
        same_time = p.fields[tgt].sel({s.dim: s.train}).mean(s.dim)
        scores = compute_metrics(truth, {"model": written[f"{tgt}_predicted"], **baselines,
                                         "member_mean_same_time": same_time},
                                 truth.notnull())
        model = scores.pop("model")
        reference = scores.pop("member_mean_same_time")
        info = trained.info
        return {
            "job": spec.name,
            "target": tgt,
            "features": [f.label for f in spec.features],
            "model_kind": spec.model.architecture,
            "model_hash": trained.model_hash,
            "standardise": spec.model.standardise,
            "split": s.attrs(),
            "weighting": "none: every grid cell of every test field counts once",
            "model": model,
            "baselines": scores,
            "baseline_definitions": {
                "climatology": "mean of the training members over members and time steps, "
                               "per grid cell",
                "thickness_linear": "least-squares line of the target on the thickness "
                                    "upper - lower, fitted on the training members",
            },
            "thickness_fit": info.get("thickness_fit"),
            "training_target_range": info["target_range"],
            "plausible_range": list(plausible_range(info["target_range"],
                                                    spec.output.range_margin)),
            "cells_outside_training_range": int((written[f"{tgt}_flag"] == 1).sum()),
            "comparison": {f"model_beats_{b}": model["rmse"] < v["rmse"]
                           for b, v in scores.items()},
            "reference": {"member_mean_same_time": reference,
                          "note": "the training members' mean at the same time step: not a "
                                  "baseline a prediction could use; it shows how little the "
                                  "members differ"},
            "training": {k: v for k, v in info.items()
                         if k not in ("history", "identity", "checkpoints")},
        }

    def report(self, p: RegressPrepared, s: MemberSplit,  # type: ignore[override]
               trained: RegressTrained, metrics: dict[str, Any], written: xr.Dataset,
               ctx: RunContext) -> Report:
        plot_maps(written, p, s, ctx.path("map.png"))
        rows = [("model", f"CNN ({', '.join(metrics['features'])})", metrics["model"])]
        rows += [(b, {"climatology": "climatology (per cell)",
                      "thickness_linear": "thickness, linear"}.get(b, b), v)
                 for b, v in metrics["baselines"].items()]
        m = metrics["model"]
        return Report(
            title=f"{p.spec.name}: test members {s.test} ({m['n']:,} cells)",
            columns=["model", "RMSE", "MAE", "R2"],
            rows=[[label, f"{v['rmse']:.4f}", f"{v['mae']:.4f}", f"{v['r2']:.4f}"]
                  for _, label, v in rows],
            notes=[f"trained on members {s.train}, early stopping on {s.validation}",
                   f"{metrics['cells_outside_training_range']:,} predictions outside the "
                   "training range (flagged, not written)"],
            files={"checkpoint": ctx.path(CHECKPOINT), "loss_plot": ctx.path("loss.png"),
                   "map_plot": ctx.path("map.png")},
            summary={"model_rmse": m["rmse"],
                     **{f"{b}_rmse": v["rmse"] for b, v in metrics["baselines"].items()}},
        )


def plot_maps(ds: xr.Dataset, p: RegressPrepared, s: MemberSplit, path: str) -> str:
    """Truth, CNN prediction and the errors of the CNN and of each baseline, for the first
    test member at ``output.plot_time``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tgt = p.spec.target.label
    y, x = p.dims.horizontal
    sel: dict[str, int] = {s.dim: 0}
    rest = [d for d in ds[tgt].dims if d not in (s.dim, y, x)]
    for d in rest:
        sel[str(d)] = p.spec.output.plot_time if d == p.dims.time else 0
    truth = ds[tgt].isel(sel).transpose(y, x).compute()
    when = f", {p.dims.time} {str(truth[p.dims.time].values)[:16]}" \
        if p.dims.time in truth.coords else ""
    names = [n for n in (f"{tgt}_predicted", f"{tgt}_climatology", f"{tgt}_thickness_linear")
             if n in ds]
    preds = {n: ds[n].isel(sel).transpose(y, x).compute() for n in names}
    xs, ys = truth[x].values, truth[y].values
    fig, axes = plt.subplots(2, 2, figsize=(12, 6.5), dpi=110, sharex=True, sharey=True)
    flat = axes.ravel()
    im = flat[0].pcolormesh(xs, ys, truth, cmap="RdYlBu_r", shading="auto")
    fig.colorbar(im, ax=flat[0], label=truth.attrs.get("units", ""))
    flat[0].set_title(f"{tgt}, member {s.test[0]}{when}", fontsize=9)
    lim = max(float(abs(preds[n] - truth).max()) for n in names) or 1.0
    for ax, n in zip(flat[1:], names, strict=False):
        err = preds[n] - truth
        rmse = float(np.sqrt((err**2).mean()))
        im = ax.pcolormesh(xs, ys, err, cmap="RdBu_r", vmin=-lim, vmax=lim, shading="auto")
        ax.set_title(f"{n.removeprefix(tgt + '_')} - truth (RMSE {rmse:.2f})", fontsize=9)
        fig.colorbar(im, ax=ax, label=truth.attrs.get("units", ""))
    for ax in flat[len(names) + 1:]:
        ax.set_visible(False)
    fig.suptitle(f"{p.spec.name}: {tgt} on a test member")
    fig.savefig(path)
    plt.close(fig)
    return path


JOB = Regress().as_kind()
