"""The gap-filling job (document 001): predict a target variable from features where it is
missing, with a block train/test split, early stopping and a filled cube written back.

Data flow: open the catalog entry lazily -> block split (+ validation blocks inside the
train blocks) -> one distributed pass for train-only statistics and the OLS baseline ->
stream training samples chunk by chunk -> blockwise prediction over the whole cube ->
resumable Zarr write -> metrics on the test blocks, read back from the written store.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import xarray as xr

from engine._version import code_version
from engine.dims import CubeDims, cube_dims
from engine.errors import CubeError, SpecError
from engine.io.catalog import open_cube, read_entry
from engine.ops.splits import block_split, random_split
from engine.ops.stats import check_variables, compute_metrics, compute_train_stats, valid_mask
from engine.pipelines.registry import JobKind
from engine.pipelines.spec import GapFillSpec
from engine.redact import redact

__all__ = ["GapFillResult", "RunPlan", "prepare", "plan_run", "run_gapfill",
           "spec_fingerprint", "job_identity", "output_locations", "check_outputs",
           "FLAG_OBSERVED", "FLAG_FILLED", "FLAG_OUT_OF_RANGE", "JOB"]

#: ``filled_flag`` values (CF flag_values / flag_meanings).
FLAG_OBSERVED, FLAG_FILLED, FLAG_OUT_OF_RANGE = 0, 1, 2
_FLAG_MEANINGS = "observed_or_not_filled filled prediction_outside_training_range"


@dataclass
class GapFillResult:
    output_url: str
    run_dir: str
    metrics: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    write: Any = None
    trained: bool = True


def spec_fingerprint(spec: GapFillSpec) -> str:
    """sha256 of the job spec as data (stable key order, credentials redacted so rotating a
    secret never changes it): the job part of a run's resume identity."""
    text = json.dumps(redact(spec.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def output_locations(spec: GapFillSpec, output: str | None = None) -> tuple[str, str]:
    """The output store URL and its run folder (checkpoint, metrics, plots).

    The run folder belongs to the store: ``<store>.run`` beside a local store (``.zarr``
    dropped), so two jobs writing into one folder never share a checkpoint; for a remote
    store ``runs/<job name>/<store name>.run`` here.
    """
    url = output or spec.output.url
    if spec.output.dir:
        return url, spec.resolve(spec.output.dir) if not _is_url(spec.output.dir) \
            else spec.output.dir
    stem = url.rstrip("/").rsplit("/", 1)[-1]
    stem = stem[:-5] if stem.endswith(".zarr") else stem
    if not _is_url(url):
        path = os.path.abspath(url.removeprefix("file://"))
        return url, os.path.join(os.path.dirname(path), f"{stem}.run")
    return url, os.path.join("runs", spec.name, f"{stem}.run")


@dataclass
class Prepared:
    """Everything lazy that the job needs, built and validated before anything is written."""

    spec: GapFillSpec
    ds: xr.Dataset
    dims: CubeDims
    split: xr.DataArray
    train_where: xr.DataArray
    val_where: xr.DataArray
    test_where: xr.DataArray
    inside: xr.DataArray
    #: The features' variable names in ``ds`` (a coordinate used as a feature is added
    #: under ``<name>__feature``), in the order of ``spec.features``.
    features: list[str] = field(default_factory=list)
    input_url: str | None = None
    input_storage_options: dict[str, Any] = field(default_factory=dict)


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


def prepare(spec: GapFillSpec, chunks: dict[str, int] | None = None) -> Prepared:
    """Open the cube and build the lazy split and sample masks; validates every name and
    size the job uses against the cube, so ``validate`` finds what a run would."""
    catalog = spec.resolve(spec.input.catalog)
    kwargs: dict[str, Any] = {}
    if chunks or spec.input.chunks:
        kwargs["chunks"] = chunks or spec.input.chunks
    if spec.input.storage_options:
        kwargs["storage_options"] = spec.input.storage_options
    ds = open_cube(catalog, spec.input.entry, **kwargs)
    entry = read_entry(catalog, spec.input.entry)
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
    valid = valid_mask(ds, [spec.target, *features], spec.mask)
    inside = valid_mask(ds, features, spec.mask)
    return Prepared(
        spec=spec,
        ds=ds,
        dims=dims,
        split=split,
        train_where=valid & (split == 1) & (val != 0),
        val_where=valid & (split == 1) & (val == 0),
        test_where=valid & (split == 0),
        inside=inside,
        features=features,
        input_url=entry.url,
        input_storage_options=dict(entry.storage_options or {}),
    )


def _map_dim(dims: CubeDims, var: xr.DataArray) -> str | None:
    """The dim that ``output.plot_time`` indexes: time, else the first non-horizontal dim."""
    if dims.time is not None and dims.time in var.dims:
        return dims.time
    rest = [d for d in var.dims if d not in (dims.y, dims.x)]
    return str(rest[0]) if rest else None


def job_identity(spec: GapFillSpec, p: Prepared) -> dict[str, str]:
    """What the job's values depend on, besides the model: the job spec, the code and the
    input data (the source store's content identity). A finished store or a trained model
    is reused only when all of these are unchanged."""
    from engine.io.stores import store_identity

    ident = {"job": spec_fingerprint(spec), "code_version": code_version(),
             "input_entry": f"{spec.input.entry}"}
    if p.input_url is not None:
        so = {**p.input_storage_options, **(spec.input.storage_options or {})}
        ident["input"] = store_identity(p.input_url, so)
    return ident


def check_outputs(spec: GapFillSpec, p: Prepared, url: str, run_dir: str, identity: dict,
                  *, overwrite: bool, restart: bool, must_resume: bool = True) -> str:
    """Every destination check a run needs, before a cluster starts or anything is written:
    the store (foreign, different, unwritable, or overlapping an input) and the run folder
    (writable, not inside an input)."""
    from engine.io.destination import check_destination, check_outside_inputs, probe_writable

    inputs = [u for u in (p.input_url,) if u]
    action = check_destination(url, spec.output.storage_options, fingerprint=identity,
                               overwrite=overwrite, restart=restart, must_resume=must_resume,
                               inputs=inputs)
    check_outside_inputs(run_dir, inputs)
    if not _is_url(run_dir):
        probe_writable(run_dir)
    return action


@dataclass
class RunPlan:
    """What a run will do, found before a cluster starts: the opened cube, where it writes,
    its resume identity and what happens to the store (create, resume or replace)."""

    prepared: Prepared
    url: str
    run_dir: str
    identity: dict[str, str]
    action: str


def plan_run(spec: GapFillSpec, output: str | None = None, *, overwrite: bool = False,
             restart: bool = False, must_resume: bool = True) -> RunPlan:
    """Open the cube, compute the resume identity and check every destination, once: the
    command line plans before it starts a cluster and hands the plan to :func:`run_gapfill`
    (the input store is listed for its identity once per run, not twice)."""
    p = prepare(spec)
    url, run_dir = output_locations(spec, output)
    identity = job_identity(spec, p)
    action = check_outputs(spec, p, url, run_dir, identity, overwrite=overwrite,
                           restart=restart, must_resume=must_resume)
    return RunPlan(prepared=p, url=url, run_dir=run_dir, identity=identity, action=action)


def fill_range(lo: float, hi: float, margin: float) -> tuple[float, float]:
    """The interval a prediction must lie in to be written as a fill: the training target's
    [min, max] widened by ``margin`` times its width on each side."""
    pad = margin * (hi - lo)
    return lo - pad, hi + pad


def build_output(p: Prepared, prediction: xr.DataArray, provenance: dict[str, Any],
                 valid_range: tuple[float, float]) -> xr.Dataset:
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
    split = p.split.astype(np.int8)
    split.attrs = {k: v for k, v in p.split.attrs.items()
                   if k in ("long_name", "flag_values", "flag_meanings")}
    out = xr.Dataset({t: target, f"{t}_predicted": pred, f"{t}_filled": filled,
                      "filled_flag": flag, "split": split})
    if spec.mask:
        out[spec.mask] = ds[spec.mask]
    out.attrs.update(provenance)
    return out


def _provenance(spec: GapFillSpec, p: Prepared, identity: dict[str, str], mhash: str,
                split_attrs: dict[str, Any]) -> dict[str, Any]:
    """Global attributes: CF (Conventions, history, date_created, the input's licence) and
    the engine's provenance; JSON values as JSON, credentials redacted."""
    now = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
    history = f"{now}: cube-engine {code_version()} gap filling, job {spec.name}"
    if p.ds.attrs.get("history"):
        history = f"{p.ds.attrs['history']}\n{history}"
    prov: dict[str, Any] = {
        "Conventions": "CF-1.10",
        "title": f"cube-engine gap filling: {spec.name}",
        "history": history,
        "date_created": now,
        "engine_job_spec": json.dumps(redact(spec.to_dict()), sort_keys=True, default=str),
        "engine_job_fingerprint": identity["job"],
        "engine_input_identity": identity.get("input", ""),
        "engine_code_version": code_version(),
        "engine_model_hash": mhash,
        "engine_model_hash_kind": "sha256 of the state_dict tensors (name order)",
        "engine_model_kind": spec.model.kind,
        "engine_seed": spec.seed,
        "engine_split": json.dumps(split_attrs, default=str),
        "engine_catalog": redact(p.ds.attrs.get("engine_catalog",
                                                spec.resolve(spec.input.catalog))),
        "engine_catalog_entry": spec.input.entry,
        "engine_features": json.dumps(list(spec.features)),
        "engine_target": spec.target,
    }
    for k in ("license", "source", "institution", "references"):
        if k in p.ds.attrs:
            prov[k if k == "license" else f"input_{k}"] = str(p.ds.attrs[k])
    return prov


def _target_range(p: Prepared) -> tuple[float, float]:
    t = p.ds[p.spec.target].where(p.train_where)
    lo, hi = dask.compute(t.min(), t.max())
    return float(lo), float(hi)


def _load_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default, allow_nan=False)
    os.replace(tmp, path)


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _finite(x: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _reusable_model(ckpt: str, train_json: str, identity: dict[str, str], log) -> dict | None:
    """The trained model's record when it was trained by this job on these inputs."""
    info = _load_json(train_json)
    if info is None or not os.path.exists(ckpt):
        return None
    if info.get("identity") != identity:
        old = info.get("identity") or {}
        changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        log(f"not reusing {ckpt}: it was trained with a different {', '.join(changed)}")
        return None
    return info


def run_gapfill(
    spec: GapFillSpec,
    *,
    output: str | None = None,
    overwrite: bool = False,
    restart: bool = False,
    client=None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_region: Callable[..., None] | None = None,
    log: Callable[[str], None] = lambda s: None,
    plan: RunPlan | None = None,
) -> GapFillResult:
    """Run the whole job; every input is validated before anything is written. ``plan``:
    the :func:`plan_run` of the same arguments, when the caller made it already."""
    from engine.io.writer import write
    from engine.meter import Meter
    from engine.ml.models import build_regressor
    from engine.ml.predict import predict
    from engine.ml.train import load_checkpoint, model_hash, plot_loss, seed_everything

    t_start = time.perf_counter()
    # Refuse a foreign, different or input-overlapping store *before* training.
    plan = plan or plan_run(spec, output, overwrite=overwrite, restart=restart)
    p, url, run_dir, identity = plan.prepared, plan.url, plan.run_dir, plan.identity
    tracker = _Tracker(spec, run_dir) if spec.tracking.mlflow else None
    os.makedirs(run_dir, exist_ok=True)
    files = {"metrics": os.path.join(run_dir, "metrics.json"),
             "checkpoint": os.path.join(run_dir, "best.pt"),
             "loss_plot": os.path.join(run_dir, "loss.png"),
             "map_plot": os.path.join(run_dir, "map.png")}
    train_json = os.path.join(run_dir, "train.json")

    meter = Meter(client)
    meter.begin("train")
    # 1. statistics of the training blocks only, one distributed pass
    stats = compute_train_stats(p.ds, p.features, spec.target, p.train_where)
    log(f"training samples: {stats.n:,} (train blocks only, inside the mask, no NaN)")

    # 2. the model: reused when trained by this job on these inputs, else trained now
    seed_everything(spec.seed)
    model = build_regressor(spec.model.kind, len(p.features), spec.model.hidden,
                            spec.model.activation)
    model.set_statistics([stats.mean[f] for f in p.features],
                         [stats.std[f] for f in p.features],
                         stats.mean[spec.target], stats.std[spec.target])
    info = None if (restart or overwrite) else _reusable_model(files["checkpoint"], train_json,
                                                              identity, log)
    streams: list = []
    if info is not None:
        log(f"resuming: reusing the trained model in {files['checkpoint']}")
        load_checkpoint(model, files["checkpoint"])
        trained = False
    else:
        info, streams = _train(spec, p, model, files, identity, stats, tracker, on_epoch,
                               client)
        _write_json(train_json, info)
        plot_loss(info["history"], files["loss_plot"], title=f"{spec.name}: {spec.model.kind}")
        trained = True
    model.eval()
    mhash = model_hash(model)
    lo, hi = fill_range(info["target_range"][0], info["target_range"][1],
                        spec.output.fill_margin)

    # 3. blockwise prediction over the whole cube, written through the resumable writer
    meter.begin("predict+write")
    prediction = predict(p.ds, model, variables=p.features, tile=None,
                         output_name=f"{spec.target}_predicted")
    split_attrs = {k: v for k, v in p.split.attrs.items() if k.startswith("split_")}
    out = build_output(p, prediction, _provenance(spec, p, identity, mhash, split_attrs),
                       (lo, hi))
    wres = write(out, url, resume=not (overwrite or restart), overwrite=overwrite,
                 restart=restart, fingerprint=identity,
                 identity={**identity, "model_hash": mhash},
                 storage_options=spec.output.storage_options, client=client,
                 progress=on_region)
    meter.end()
    for stream in streams:
        stream.release()

    # 4. metrics on the test blocks, from the written store (the model is not run twice)
    metrics = _evaluate(spec, p, url, stats, mhash, split_attrs, info, (lo, hi))
    plot_maps(xr.open_zarr(url, storage_options=spec.output.storage_options), spec,
              files["map_plot"], dims=p.dims)
    metrics["identity"] = identity
    metrics["throughput"] = _throughput(files["metrics"], wres, trained, info, meter,
                                        time.perf_counter() - t_start, identity)
    _write_json(files["metrics"], _finite(metrics))
    if tracker:
        tracker.finish(metrics, files)
    return GapFillResult(output_url=url, run_dir=run_dir, metrics=metrics, files=files,
                         throughput=metrics["throughput"], write=wres, trained=trained)


def _train(spec: GapFillSpec, p: Prepared, model, files: dict[str, str],
           identity: dict[str, str], stats, tracker, on_epoch, client) -> tuple[dict, list]:
    from engine.ml.samples import PixelSamples
    from engine.ml.train import train_model

    target_range = _target_range(p)
    train_s = PixelSamples(p.ds, p.features, spec.target, p.train_where,
                           batch_size=spec.train.batch_size, shuffle=True, seed=spec.seed,
                           client=client)
    val_s = PixelSamples(p.ds, p.features, spec.target, p.val_where,
                         batch_size=max(spec.train.batch_size, 8192), shuffle=False,
                         client=client)

    def _epoch(rec):
        if tracker:
            tracker.epoch(rec)
        if on_epoch:
            on_epoch(rec)

    res = train_model(model, train_s, val_s, epochs=spec.train.epochs,
                      learning_rate=spec.train.learning_rate,
                      weight_decay=spec.train.weight_decay, patience=spec.train.patience,
                      min_delta=spec.train.min_delta, checkpoint=files["checkpoint"],
                      seed=spec.seed, on_epoch=_epoch)
    # Release the cached sample blocks only after the write: they share input keys with
    # the prediction graph, and forgetting them while that graph is submitted makes the
    # scheduler cancel its tasks ("lost dependencies").
    info = {
        "identity": identity,
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
    return _finite(info), [train_s, val_s]


def _evaluate(spec: GapFillSpec, p: Prepared, url: str, stats, mhash: str,
              split_attrs: dict[str, Any], info: dict[str, Any],
              valid_range: tuple[float, float]) -> dict[str, Any]:
    written = xr.open_zarr(url, storage_options=spec.output.storage_options)
    preds = {
        "model": written[f"{spec.target}_predicted"],
        "ols": stats.ols_predict(p.ds),
        "train_mean": xr.full_like(p.ds[spec.target], stats.mean[spec.target]),
    }
    scores = compute_metrics(written[spec.target], preds, p.test_where)
    flag = written["filled_flag"]
    n_filled, n_out = dask.compute((flag == FLAG_FILLED).sum(),
                                   (flag == FLAG_OUT_OF_RANGE).sum())
    return {
        "job": spec.name,
        "target": spec.target,
        "features": list(spec.features),
        "model_kind": spec.model.kind,
        "model_hash": mhash,
        "split": split_attrs,
        "n_train": stats.n,
        "test": scores,
        "comparison": {
            "rmse_ratio_model_to_ols": scores["model"]["rmse"] / scores["ols"]["rmse"],
            "rmse_ratio_model_to_train_mean":
                scores["model"]["rmse"] / scores["train_mean"]["rmse"],
            "model_beats_train_mean": scores["model"]["rmse"] < scores["train_mean"]["rmse"],
            "model_beats_ols": scores["model"]["rmse"] < scores["ols"]["rmse"],
            "model_within_2pct_of_ols":
                abs(scores["model"]["rmse"] / scores["ols"]["rmse"] - 1) <= 0.02,
        },
        "ols_coefficients": dict(zip(["intercept", *spec.features],
                                     map(float, stats.ols_coef), strict=True)),
        "training_target_range": list(info["target_range"]),
        "fill_valid_range": list(valid_range),
        "cells_filled": int(n_filled),
        "cells_out_of_range": int(n_out),
        "training": {k: v for k, v in info.items() if k not in ("history", "identity")},
        "code_version": code_version(),
    }


def _throughput(metrics_path: str, wres, trained: bool, info: dict[str, Any], meter,
                total_s: float, identity: dict[str, str]) -> dict[str, Any]:
    """This run's rates: what it actually did (no write rate when nothing was written, no
    training rate when the model was reused). A run that did nothing new keeps the first
    run's figures and records itself as a resume."""
    wrote = bool(wres.n_written)
    this = {
        "total_s": total_s,
        "trained": trained,
        "regions_written": wres.n_written,
        "regions_skipped": wres.n_skipped,
        "write_s": wres.seconds if wrote else None,
        "bytes_written": wres.bytes_written,
        "mb_per_s_written": wres.bytes_written / 1e6 / wres.seconds
        if wrote and wres.seconds else None,
        "train_samples_per_s": info.get("samples_per_s") if trained else None,
        **meter.summary(),  # per phase: totals, per worker, per GPU
    }
    pw = (this.get("phases") or {}).get("predict+write", {}).get("total", {})
    this["output_pixels_per_s"] = pw.get("output_pixels_per_s") if wrote else None
    if trained or wrote:
        return this
    old = _load_json(metrics_path)
    first = (old or {}).get("throughput")
    if first is None or (old or {}).get("identity", identity) != identity:
        return this
    first = dict(first)
    first["resumed_runs"] = [*first.get("resumed_runs", []),
                             {"total_s": total_s, "regions_written": 0,
                              "regions_skipped": wres.n_skipped, "trained": False}]
    return first


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


class _Tracker:
    """Optional mlflow tracking; parameters are logged with credentials redacted."""

    def __init__(self, spec: GapFillSpec, run_dir: str) -> None:
        from engine.errors import require

        mlflow = require("mlflow", "track")
        self.mlflow = mlflow
        # mlflow's default (a file store in the working directory) is refused by current
        # mlflow; default to a SQLite store inside the run folder.
        uri = spec.tracking.uri or "sqlite:///" + os.path.abspath(
            os.path.join(run_dir, "mlflow.db"))
        os.makedirs(run_dir, exist_ok=True)
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(spec.tracking.experiment)
            self.run = mlflow.start_run(run_name=spec.name)
        except Exception as err:
            from engine.redact import redact_text

            raise SpecError(f"tracking.uri {redact_text(uri)!r} cannot be used by mlflow "
                            f"({type(err).__name__}: {redact_text(str(err)).splitlines()[0]})"
                            "; fix tracking.uri or set tracking.mlflow: false") from None
        flat = json.loads(json.dumps(redact(spec.to_dict()), default=str))
        mlflow.log_params({k: str(v)[:250] for k, v in _flatten(flat).items()})

    def epoch(self, rec: dict[str, float]) -> None:
        self.mlflow.log_metrics({"train_loss": rec["train_loss"], "val_loss": rec["val_loss"]},
                                step=int(rec["epoch"]))

    def finish(self, metrics: dict[str, Any], files: dict[str, str]) -> None:
        for name, m in metrics["test"].items():
            self.mlflow.log_metrics({f"test_{name}_{k}": v for k, v in m.items()})
        for path in files.values():
            if os.path.exists(path):
                self.mlflow.log_artifact(path)
        self.mlflow.end_run()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


JOB = JobKind(
    name="gapfill",
    summary="fill gaps of a target variable from features with a block split, early "
            "stopping and a resumable filled cube (document 001)",
    spec=GapFillSpec,
    run=run_gapfill,
    plan=plan_run,
)
