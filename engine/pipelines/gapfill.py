"""The gap-filling job (document 001): predict a target variable from features where it is
missing, with a block train/test split, early stopping and a filled cube written back.

A kind on the job interface (:mod:`engine.pipelines.job`), run by the shared runner.
Data flow: open the catalog entry lazily (``prepare``) -> block split + validation blocks
inside the train blocks (``split``) -> one distributed pass for train-only statistics and
the OLS baseline, then training samples streamed chunk by chunk (``train``) -> blockwise
prediction over the whole cube, gaps filled where the prediction lies in the training
range (``predict``) -> resumable Zarr write (runner) -> metrics on the test blocks, read
back from the written store (``evaluate``) -> map and table (``report``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import xarray as xr

from engine._version import code_version
from engine.dims import CubeDims, cube_dims
from engine.errors import CubeError, SpecError
from engine.ops.splits import block_split, random_split
from engine.ops.stats import check_variables, compute_metrics, compute_train_stats, valid_mask
from engine.pipelines.job import Job, JobResult, Prepared, Report, RunContext, Trained, open_input
from engine.pipelines.runner import RunPlan, plan_job, run_job
from engine.pipelines.spec import GapFillSpec

__all__ = ["GapFill", "GapFillPrepared", "GapFillSplit", "prepare", "plan_run", "run_gapfill",
           "build_output", "fill_range", "plot_maps",
           "FLAG_OBSERVED", "FLAG_FILLED", "FLAG_OUT_OF_RANGE", "JOB"]

#: ``filled_flag`` values (CF flag_values / flag_meanings).
FLAG_OBSERVED, FLAG_FILLED, FLAG_OUT_OF_RANGE = 0, 1, 2
_FLAG_MEANINGS = "observed_or_not_filled filled prediction_outside_training_range"


@dataclass(kw_only=True)
class GapFillPrepared(Prepared):
    """The opened cube with the features' variables and the mask of cells inside the mask
    where every feature is present, built and validated before anything is written."""

    spec: GapFillSpec
    dims: CubeDims
    inside: xr.DataArray
    #: The features' variable names in ``ds`` (a coordinate used as a feature is added
    #: under ``<name>__feature``), in the order of ``spec.features``.
    features: list[str] = field(default_factory=list)


@dataclass
class GapFillSplit:
    """The block split (1 train, 0 test) and the cells each part samples."""

    split: xr.DataArray
    train_where: xr.DataArray
    val_where: xr.DataArray
    test_where: xr.DataArray


@dataclass(kw_only=True)
class GapFillTrained(Trained):
    #: Train-only statistics and the OLS baseline (:func:`engine.ops.stats.compute_train_stats`).
    stats: Any


def _feature(ds: xr.Dataset, name: str, like: xr.DataArray) -> xr.DataArray:
    """A feature that is not a data variable: a numeric coordinate (``lat``, ``depth``) or an
    xarray virtual variable (``time.month``), broadcast to the target's grid and chunks."""
    try:
        var = ds[name]
    except KeyError:
        raise CubeError(f"feature {name!r} is not a variable or coordinate of the cube; its "
                        f"variables are {', '.join(map(str, ds.data_vars))}") from None
    if not np.issubdtype(var.dtype, np.number) or np.issubdtype(var.dtype, np.timedelta64):
        raise CubeError(f"feature {name!r} is a {var.dtype} coordinate, not numbers: use a "
                        f"numeric one (e.g. {name}.month for a time coordinate)")
    extra = [d for d in var.dims if d not in like.dims]
    if extra:
        raise CubeError(f"feature {name!r} has dims {extra} that the target does not have")
    out = var.reset_coords(drop=True).astype(np.float32).broadcast_like(like)
    out = out.transpose(*like.dims).chunk(dict(zip(like.dims, like.chunks or (), strict=False)))
    return out.assign_attrs(long_name=f"{name} (coordinate as a feature)")


def prepare(spec: GapFillSpec, chunks: dict[str, int] | None = None) -> GapFillPrepared:
    """Open the cube and build the lazy feature variables and masks; validates every name
    and size the job uses against the cube, so ``validate`` finds what a run would."""
    base = open_input(spec, chunks)
    ds = base.ds
    check_variables(ds, [spec.target], "target")
    if spec.target not in ds.data_vars:
        raise CubeError(f"target {spec.target!r} is a coordinate; name a data variable")
    dims = cube_dims(ds[spec.target], spec.input.dims)
    dims.horizontal  # noqa: B018 -- raises a one-line CubeError naming input.dims
    target = ds[spec.target]
    features = []
    for name in spec.features:
        if name in ds.data_vars:
            features.append(name)
            continue
        internal = f"{name}__feature"
        ds = ds.assign({internal: _feature(ds, name, target)})
        features.append(internal)
    if spec.mask:
        check_variables(ds, [spec.mask], "mask")
    for name in (*features, *([spec.mask] if spec.mask else [])):
        extra = [d for d in ds[name].dims if d not in target.dims]
        if extra:
            raise CubeError(f"variable {name!r} has dims {extra} that the target "
                            f"{spec.target!r} does not have ({', '.join(map(str, target.dims))})")
    tdim = _map_dim(dims, target)
    if tdim is not None and not spec.output.plot_time < ds.sizes[tdim]:
        raise SpecError(f"output.plot_time must be in [0, {ds.sizes[tdim]}) ({tdim} has "
                        f"{ds.sizes[tdim]} steps), got {spec.output.plot_time}")
    inside = valid_mask(ds, features, spec.mask)
    return GapFillPrepared(spec=spec, ds=ds, dims=dims, inside=inside, features=features,
                           input_url=base.input_url,
                           input_storage_options=base.input_storage_options)


def split_cells(p: GapFillPrepared) -> GapFillSplit:
    """The lazy block (or random) split and the train / validation / test cells: valid
    target and features inside the mask; validation blocks lie inside the train blocks."""
    spec, ds = p.spec, p.ds
    target = ds[spec.target]
    s = spec.split
    if s.method == "block":
        split = block_split(ds, s.blocks, s.test_fraction, s.seed, s.buffer)
        val = block_split(ds, s.blocks, s.validation_fraction, s.seed + 1)
    else:
        split = random_split(ds, s.test_fraction, s.seed)
        val = random_split(ds, s.validation_fraction, s.seed + 1)
    tgt_dims = target.dims
    split = split.broadcast_like(target).transpose(*tgt_dims)
    val = val.broadcast_like(target).transpose(*tgt_dims)
    valid = valid_mask(ds, [spec.target, *p.features], spec.mask)
    return GapFillSplit(split=split,
                        train_where=valid & (split == 1) & (val != 0),
                        val_where=valid & (split == 1) & (val == 0),
                        test_where=valid & (split == 0))


def _map_dim(dims: CubeDims, var: xr.DataArray) -> str | None:
    """The dim that ``output.plot_time`` indexes: time, else the first non-horizontal dim."""
    if dims.time is not None and dims.time in var.dims:
        return dims.time
    rest = [d for d in var.dims if d not in (dims.y, dims.x)]
    return str(rest[0]) if rest else None


def fill_range(lo: float, hi: float, margin: float) -> tuple[float, float]:
    """The interval a prediction must lie in to be written as a fill: the training target's
    [min, max] widened by ``margin`` times its width on each side."""
    pad = margin * (hi - lo)
    return lo - pad, hi + pad


def build_output(p: GapFillPrepared, s: GapFillSplit, prediction: xr.DataArray,
                 provenance: dict[str, Any], valid_range: tuple[float, float]) -> xr.Dataset:
    """The output cube: original target, prediction, filled target, split and flags.

    A gap is filled only where the prediction lies in ``valid_range`` (what the training
    data supports); elsewhere the gap stays NaN and ``filled_flag`` is 2.
    """
    spec, ds = p.spec, p.ds
    t = spec.target
    target = ds[t]
    lo, hi = valid_range
    gap = ~np.isfinite(target) & p.inside
    in_range = (prediction >= lo) & (prediction <= hi)
    fill = gap & in_range
    filled = target.where(np.isfinite(target), prediction.where(fill))
    flag = xr.where(fill, FLAG_FILLED, xr.where(gap, FLAG_OUT_OF_RANGE, FLAG_OBSERVED))
    units = target.attrs.get("units")
    name = target.attrs.get("long_name", t)

    def _attrs(**kw: Any) -> dict[str, Any]:
        return {k: v for k, v in kw.items() if v is not None}

    pred = prediction.astype(np.float32)
    pred.attrs = _attrs(long_name=f"{name} predicted by the model", units=units,
                        comment=prediction.attrs.get("engine_predict"))
    filled = filled.astype(np.float32)
    filled.attrs = _attrs(long_name=f"{name}, gaps filled by the model", units=units,
                          standard_name=target.attrs.get("standard_name"),
                          comment="observed where present; predicted in gaps inside the mask "
                                  "where the prediction lies in valid_range (the training "
                                  "target range); see filled_flag",
                          valid_range=[float(lo), float(hi)])
    flag = flag.astype(np.int8)
    flag.attrs = {"long_name": f"how {t}_filled was made",
                  "flag_values": [FLAG_OBSERVED, FLAG_FILLED, FLAG_OUT_OF_RANGE],
                  "flag_meanings": _FLAG_MEANINGS}
    split = s.split.astype(np.int8)
    split.attrs = {k: v for k, v in s.split.attrs.items()
                   if k in ("long_name", "flag_values", "flag_meanings")}
    out = xr.Dataset({t: target, f"{t}_predicted": pred, f"{t}_filled": filled,
                      "filled_flag": flag, "split": split})
    if spec.mask:
        out[spec.mask] = ds[spec.mask]
    out.attrs.update(provenance)
    return out


def _target_range(p: GapFillPrepared, s: GapFillSplit) -> tuple[float, float]:
    t = p.ds[p.spec.target].where(s.train_where)
    lo, hi = dask.compute(t.min(), t.max())
    return float(lo), float(hi)


def _fit(spec: GapFillSpec, p: GapFillPrepared, s: GapFillSplit, model, ctx: RunContext,
         stats) -> tuple[dict, list]:
    from engine.ml.samples import PixelSamples
    from engine.ml.train import train_model

    target_range = _target_range(p, s)
    train_s = PixelSamples(p.ds, p.features, spec.target, s.train_where,
                           batch_size=spec.train.batch_size, shuffle=True, seed=spec.seed,
                           client=ctx.client)
    val_s = PixelSamples(p.ds, p.features, spec.target, s.val_where,
                         batch_size=max(spec.train.batch_size, 8192), shuffle=False,
                         client=ctx.client)
    res = train_model(model, train_s, val_s, epochs=spec.train.epochs,
                      learning_rate=spec.train.learning_rate,
                      weight_decay=spec.train.weight_decay, patience=spec.train.patience,
                      min_delta=spec.train.min_delta, checkpoint=ctx.path(CHECKPOINT),
                      seed=spec.seed, on_epoch=ctx.on_epoch)
    # The cached sample blocks are released only after the write (Trained.resources):
    # they share input keys with the prediction graph, and forgetting them while that
    # graph is submitted makes the scheduler cancel its tasks ("lost dependencies").
    info = {
        "n_train": stats.n,
        "target_range": list(target_range),
        "best_epoch": res.best_epoch,
        "best_val_loss": res.best_val_loss,
        "epochs_run": len(res.history),
        "stopped_early": res.stopped_early,
        "seconds": res.seconds,
        "samples_per_s": res.samples_per_s,
        "history": res.history,
    }
    return info, [train_s, val_s]


CHECKPOINT = "best.pt"


class GapFill(Job):
    """Gap filling on the job interface: a pixel model (linear or MLP) from features."""

    name = "gapfill"
    summary = ("fill gaps of a target variable from features with a block split, early "
               "stopping and a resumable filled cube (document 001)")
    title = "gap filling"
    spec = GapFillSpec

    def prepare(self, spec: GapFillSpec) -> GapFillPrepared:
        return prepare(spec)

    def split(self, prepared: GapFillPrepared) -> GapFillSplit:  # type: ignore[override]
        return split_cells(prepared)

    def describe(self, prepared: GapFillPrepared) -> str:  # type: ignore[override]
        spec = prepared.spec
        y, x = prepared.dims.horizontal
        return (f"target {spec.target} from {', '.join(spec.features)}; cube "
                f"{dict(prepared.ds.sizes)} (y={y}, x={x})")

    def train(self, p: GapFillPrepared, s: GapFillSplit,  # type: ignore[override]
              ctx: RunContext) -> GapFillTrained:
        from engine.ml.models import build_regressor
        from engine.ml.train import load_checkpoint, model_hash, plot_loss, seed_everything

        spec = p.spec
        # statistics of the training blocks only, one distributed pass
        stats = compute_train_stats(p.ds, p.features, spec.target, s.train_where)
        ctx.log(f"training samples: {stats.n:,} (train blocks only, inside the mask, no NaN)")
        # the model: reused when trained by this job on these inputs, else trained now
        seed_everything(spec.seed)
        model = build_regressor(spec.model.kind, len(p.features), spec.model.hidden,
                                spec.model.activation)
        model.set_statistics([stats.mean[f] for f in p.features],
                             [stats.std[f] for f in p.features],
                             stats.mean[spec.target], stats.std[spec.target])
        streams: list = []
        if ctx.previous is not None:
            ctx.log(f"resuming: reusing the trained model in {ctx.path(CHECKPOINT)}")
            load_checkpoint(model, ctx.path(CHECKPOINT))
            info = ctx.previous
        else:
            info, streams = _fit(spec, p, s, model, ctx, stats)
            plot_loss(info["history"], ctx.path("loss.png"),
                      title=f"{spec.name}: {spec.model.kind}")
        model.eval()
        return GapFillTrained(model=model, info=info, model_hash=model_hash(model),
                              checkpoints=[CHECKPOINT], fresh=ctx.previous is None,
                              resources=streams, stats=stats)

    def predict(self, p: GapFillPrepared, s: GapFillSplit,  # type: ignore[override]
                trained: GapFillTrained, ctx: RunContext) -> xr.Dataset:
        from engine.ml.predict import predict

        spec = p.spec
        lo, hi = _valid_range(trained.info, spec)
        prediction = predict(p.ds, trained.model, variables=p.features, tile=None,
                             output_name=f"{spec.target}_predicted")
        extra = {
            "engine_model_kind": spec.model.kind,
            "engine_split": json.dumps(_split_attrs(s), default=str),
            "engine_features": json.dumps(list(spec.features)),
            "engine_target": spec.target,
        }
        return build_output(p, s, prediction, extra, (lo, hi))

    def evaluate(self, p: GapFillPrepared, s: GapFillSplit,  # type: ignore[override]
                 trained: GapFillTrained, written: xr.Dataset,
                 ctx: RunContext) -> dict[str, Any]:
        spec, stats, info = p.spec, trained.stats, trained.info
        preds = {
            "model": written[f"{spec.target}_predicted"],
            "ols": stats.ols_predict(p.ds),
            "train_mean": xr.full_like(p.ds[spec.target], stats.mean[spec.target]),
        }
        scores = compute_metrics(written[spec.target], preds, s.test_where)
        flag = written["filled_flag"]
        n_filled, n_out = dask.compute((flag == FLAG_FILLED).sum(),
                                       (flag == FLAG_OUT_OF_RANGE).sum())
        return {
            "job": spec.name,
            "target": spec.target,
            "features": list(spec.features),
            "model_kind": spec.model.kind,
            "model_hash": trained.model_hash,
            "split": _split_attrs(s),
            "n_train": stats.n,
            "test": scores,
            "comparison": {
                "rmse_ratio_model_to_ols": scores["model"]["rmse"] / scores["ols"]["rmse"],
                "rmse_ratio_model_to_train_mean":
                    scores["model"]["rmse"] / scores["train_mean"]["rmse"],
                "model_beats_train_mean":
                    scores["model"]["rmse"] < scores["train_mean"]["rmse"],
                "model_beats_ols": scores["model"]["rmse"] < scores["ols"]["rmse"],
                "model_within_2pct_of_ols":
                    abs(scores["model"]["rmse"] / scores["ols"]["rmse"] - 1) <= 0.02,
            },
            "ols_coefficients": dict(zip(["intercept", *spec.features],
                                         map(float, stats.ols_coef), strict=True)),
            "training_target_range": list(info["target_range"]),
            "fill_valid_range": list(_valid_range(info, spec)),
            "cells_filled": int(n_filled),
            "cells_out_of_range": int(n_out),
            "training": {k: v for k, v in info.items()
                         if k not in ("history", "identity", "checkpoints")},
            "code_version": code_version(),
        }

    def report(self, p: GapFillPrepared, s: GapFillSplit,  # type: ignore[override]
               trained: GapFillTrained, metrics: dict[str, Any], written: xr.Dataset,
               ctx: RunContext) -> Report:
        spec = p.spec
        plot_maps(written, spec, ctx.path("map.png"), dims=p.dims)
        labels = {"model": f"{spec.model.kind} ({', '.join(spec.features)})",
                  "ols": "least squares", "train_mean": "training mean"}
        test = metrics["test"]
        return Report(
            title=f"{spec.name}: test blocks ({test['model']['n']:,} cells)",
            columns=["model", "RMSE", "MAE", "R2"],
            rows=[[label, f"{test[k]['rmse']:.4f}", f"{test[k]['mae']:.4f}",
                   f"{test[k]['r2']:.4f}"] for k, label in labels.items()],
            notes=[f"filled {metrics['cells_filled']:,} cells, "
                   f"{metrics['cells_out_of_range']:,} predictions outside the training "
                   "range not filled"],
            files={"checkpoint": ctx.path(CHECKPOINT), "loss_plot": ctx.path("loss.png"),
                   "map_plot": ctx.path("map.png")},
            summary={"cells_filled": metrics["cells_filled"],
                     "cells_out_of_range": metrics["cells_out_of_range"]},
        )


def _valid_range(info: dict[str, Any], spec: GapFillSpec) -> tuple[float, float]:
    lo, hi = info["target_range"]
    return fill_range(float(lo), float(hi), spec.output.fill_margin)


def _split_attrs(s: GapFillSplit) -> dict[str, Any]:
    return {k: v for k, v in s.split.attrs.items() if k.startswith("split_")}


def plot_maps(ds: xr.Dataset, spec: GapFillSpec, path: str, dims: CubeDims | None = None) -> str:
    """One map step before and after filling: filled cells outlined, predictions outside the
    training range marked, colour limits from the observed values with extend arrows."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = spec.target
    var = ds[t]
    dims = dims or cube_dims(var, spec.input.dims)
    y, x = dims.horizontal
    mdim = _map_dim(dims, var)
    sel: dict[str, int] = {str(d): 0 for d in var.dims if d not in (y, x) and d != mdim}
    if mdim is not None:
        sel[mdim] = spec.output.plot_time
    before = var.isel(sel).transpose(y, x).compute()
    after = ds[f"{t}_filled"].isel(sel).transpose(y, x).compute()
    flag = ds["filled_flag"].isel(sel).transpose(y, x).compute()
    pred = ds[f"{t}_predicted"].isel(sel).transpose(y, x).compute()
    obs = np.asarray(before)
    finite = obs[np.isfinite(obs)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    xs = before[x].values if x in before.coords else np.arange(before.sizes[x])
    ys = before[y].values if y in before.coords else np.arange(before.sizes[y])
    out_range = np.asarray(flag) == FLAG_OUT_OF_RANGE
    shown = np.where(out_range, np.asarray(pred), np.asarray(after))
    cmap = plt.get_cmap("RdYlBu_r").with_extremes(over="magenta", under="black")
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), dpi=110, sharey=True)
    label = ""
    if mdim is not None and mdim in before.coords:
        label = f"{mdim}={str(before[mdim].values)[:10]}"
    im: Any = None
    for ax, arr, title in ((axes[0], obs, "observed"),
                           (axes[1], shown, "gaps filled (+ rejected predictions)")):
        im = ax.pcolormesh(xs, ys, arr, vmin=vmin, vmax=vmax, cmap=cmap, shading="auto")
        ax.set_title(f"{t} {title} {label}".strip(), fontsize=9)
        ax.set_xlabel(str(var[x].attrs.get("long_name", x)) if x in var.coords else x)
    axes[1].contour(xs, ys, (np.asarray(flag) == FLAG_FILLED).astype(float), levels=[0.5],
                    colors="k", linewidths=0.4)
    if out_range.any():
        jy, ix = np.nonzero(out_range)
        axes[1].scatter(xs[ix], ys[jy], s=6, marker="x", c="magenta", linewidths=0.6,
                        label="prediction outside the training range (not filled)")
        axes[1].legend(loc="lower left", fontsize=7)
    axes[0].set_ylabel(str(var[y].attrs.get("long_name", y)) if y in var.coords else y)
    fig.colorbar(im, ax=axes, label=var.attrs.get("units", ""), shrink=0.9, extend="both")
    fig.suptitle(f"{spec.name}: {int((np.asarray(flag) == FLAG_FILLED).sum())} cells filled "
                 f"(outlined), {int(out_range.sum())} rejected (x)")
    fig.savefig(path)
    plt.close(fig)
    return path


GAPFILL = GapFill()
JOB = GAPFILL.as_kind()
#: ``plan_run(spec, output, *, overwrite, restart, must_resume)``: the runner's plan.
plan_run = functools.partial(plan_job, GAPFILL)


def run_gapfill(spec: GapFillSpec, *, output: str | None = None, overwrite: bool = False,
                restart: bool = False, client=None,
                on_epoch: Callable[[dict[str, float]], None] | None = None,
                on_region: Callable[..., None] | None = None,
                log: Callable[[str], None] = lambda s: None,
                plan: RunPlan | None = None) -> JobResult:
    """Run the whole gap-filling job through the shared runner (:func:`run_job`)."""
    return run_job(GAPFILL, spec, output=output, overwrite=overwrite, restart=restart,
                   client=client, on_epoch=on_epoch, on_region=on_region, log=log, plan=plan)
