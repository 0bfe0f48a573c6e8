"""The gap-filling job (document 001): predict a target variable from features where it is
missing, with a block train/test split, early stopping and a filled cube written back.

Data flow: open the catalog entry lazily -> block split (+ validation blocks inside the
train blocks) -> one distributed pass for train-only statistics and the OLS baseline ->
stream training samples chunk by chunk -> blockwise prediction over the whole cube ->
resumable Zarr write -> metrics on the test blocks, read back from the written store.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr
import yaml

from engine._version import code_version
from engine.errors import SpecError
from engine.io.catalog import open_cube
from engine.ops.splits import block_split, random_split
from engine.ops.stats import check_variables, compute_metrics, compute_train_stats, valid_mask
from engine.pipelines.spec import GapFillSpec

__all__ = ["GapFillResult", "prepare", "run_gapfill", "spec_fingerprint"]


@dataclass
class GapFillResult:
    output_url: str
    run_dir: str
    metrics: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    write: Any = None


def spec_fingerprint(spec: GapFillSpec) -> str:
    """sha256 of the job spec as data (stable key order), the resume token of a run."""
    text = json.dumps(spec.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def output_locations(spec: GapFillSpec, output: str | None = None) -> tuple[str, str]:
    """The output store URL and the run directory (metrics, plots, checkpoint)."""
    url = output or spec.output.url
    if spec.output.dir:
        run_dir = spec.output.dir
    elif not _is_url(url):
        run_dir = os.path.dirname(os.path.abspath(url.removeprefix("file://"))) or "."
    else:
        run_dir = os.path.join("runs", spec.name)
    return url, run_dir


@dataclass
class Prepared:
    """Everything lazy that the job needs, built and validated before anything is written."""

    spec: GapFillSpec
    ds: xr.Dataset
    split: xr.DataArray
    train_where: xr.DataArray
    val_where: xr.DataArray
    test_where: xr.DataArray
    inside: xr.DataArray


def prepare(spec: GapFillSpec, chunks: dict[str, int] | None = None) -> Prepared:
    """Open the cube and build the lazy split and sample masks; validates names and sizes."""
    catalog = spec.resolve(spec.input.catalog)
    kwargs: dict[str, Any] = {}
    if chunks or spec.input.chunks:
        kwargs["chunks"] = chunks or spec.input.chunks
    if spec.input.storage_options:
        kwargs["storage_options"] = spec.input.storage_options
    ds = open_cube(catalog, spec.input.entry, **kwargs)
    check_variables(ds, [spec.target], "target")
    check_variables(ds, spec.features, "feature")
    if spec.mask:
        check_variables(ds, [spec.mask], "mask")
    s = spec.split
    if s.method == "block":
        split = block_split(ds, s.blocks, s.test_fraction, s.seed, s.buffer)
        val = block_split(ds, s.blocks, s.validation_fraction, s.seed + 1)
    else:
        split = random_split(ds, s.test_fraction, s.seed)
        val = random_split(ds, s.validation_fraction, s.seed + 1)
    tgt_dims = ds[spec.target].dims
    split = split.broadcast_like(ds[spec.target]).transpose(*tgt_dims)
    val = val.broadcast_like(ds[spec.target]).transpose(*tgt_dims)
    valid = valid_mask(ds, [spec.target, *spec.features], spec.mask)
    inside = valid_mask(ds, spec.features, spec.mask)
    return Prepared(
        spec=spec,
        ds=ds,
        split=split,
        train_where=valid & (split == 1) & (val != 0),
        val_where=valid & (split == 1) & (val == 0),
        test_where=valid & (split == 0),
        inside=inside,
    )


def build_output(p: Prepared, prediction: xr.DataArray, provenance: dict[str, Any]) -> xr.Dataset:
    """The output cube: original target, prediction, filled target, split and flags."""
    spec, ds = p.spec, p.ds
    t = spec.target
    target = ds[t]
    gap = ~np.isfinite(target) & p.inside
    filled = target.where(np.isfinite(target), prediction.where(gap))
    out = xr.Dataset(
        {
            t: target,
            f"{t}_predicted": prediction.astype(np.float32).assign_attrs(
                long_name=f"{target.attrs.get('long_name', t)} predicted by the model",
                units=target.attrs.get("units", ""),
            ),
            f"{t}_filled": filled.astype(np.float32).assign_attrs(
                long_name=f"{target.attrs.get('long_name', t)}, gaps filled by the model",
                units=target.attrs.get("units", ""),
                comment="observed where present; predicted in gaps inside the mask",
            ),
            "filled_flag": gap.astype(np.int8).assign_attrs(
                long_name="1 where the target was missing and is filled by the model",
                flag_values=[0, 1], flag_meanings="observed_or_outside filled",
            ),
            "split": p.split.astype(np.int8),
        }
    )
    if spec.mask:
        out[spec.mask] = ds[spec.mask]
    out.attrs.update(provenance)
    return out


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
) -> GapFillResult:
    """Run the whole job; every input is validated before anything is written."""
    import torch

    from engine.io.destination import check_destination
    from engine.io.writer import write
    from engine.ml.models import build_regressor
    from engine.ml.predict import predict
    from engine.ml.samples import PixelSamples
    from engine.ml.train import model_hash, plot_loss, train_model

    t_start = time.perf_counter()
    p = prepare(spec)
    url, run_dir = output_locations(spec, output)
    fp = spec_fingerprint(spec)
    fingerprint = {
        "job": fp,
        "code_version": code_version(),
        "input": f"{spec.input.catalog}#{spec.input.entry}",
    }
    # Refuse a foreign or different store *before* training, so a bad --output costs nothing.
    check_destination(url, fingerprint=fingerprint, overwrite=overwrite, restart=restart,
                      storage_options=spec.output.storage_options)
    if spec.tracking.mlflow:
        from engine.errors import require

        require("mlflow", "track")
    os.makedirs(run_dir, exist_ok=True)

    from engine.meter import Meter

    meter = Meter(client)
    meter.begin("train")
    # 1. statistics of the training blocks only, one distributed pass
    stats = compute_train_stats(p.ds, spec.features, spec.target, p.train_where)
    log(f"training samples: {stats.n:,} (train blocks only, inside the mask, no NaN)")

    # 2. model, trained on samples streamed chunk by chunk
    torch.manual_seed(spec.seed)
    model = build_regressor(spec.model.kind, len(spec.features), spec.model.hidden,
                            spec.model.activation)
    model.set_statistics([stats.mean[f] for f in spec.features],
                         [stats.std[f] for f in spec.features],
                         stats.mean[spec.target], stats.std[spec.target])
    ckpt = os.path.join(run_dir, "best.pt")
    train_json = os.path.join(run_dir, "train.json")
    streams: list = []
    reuse = (not restart and not overwrite and os.path.exists(ckpt) and os.path.exists(train_json)
             and json.load(open(train_json)).get("job_fingerprint") == fp)
    tracker = _Tracker(spec, run_dir) if spec.tracking.mlflow else None
    if reuse:
        log(f"resuming: reusing the trained model in {ckpt}")
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        model.eval()
        train_info = json.load(open(train_json))
    else:
        train_s = PixelSamples(p.ds, spec.features, spec.target, p.train_where,
                               batch_size=spec.train.batch_size, shuffle=True, seed=spec.seed,
                               client=client)
        val_s = PixelSamples(p.ds, spec.features, spec.target, p.val_where,
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
                          min_delta=spec.train.min_delta, checkpoint=ckpt, seed=spec.seed,
                          on_epoch=_epoch)
        # Release the cached sample blocks only after the write: they share input keys
        # with the prediction graph, and forgetting them while that graph is submitted
        # makes the scheduler cancel its tasks ("lost dependencies").
        streams = [train_s, val_s]
        train_info = {
            "job_fingerprint": fp,
            "best_epoch": res.best_epoch,
            "best_val_loss": res.best_val_loss,
            "epochs_run": len(res.history),
            "stopped_early": res.stopped_early,
            "seconds": res.seconds,
            "samples_per_s": res.samples_per_s,
            "history": res.history,
        }
        plot_loss(res.history, os.path.join(run_dir, "loss.png"),
                  title=f"{spec.name}: {spec.model.kind}")
        with open(train_json, "w") as f:
            json.dump(train_info, f, indent=2)
    mhash = model_hash(model)

    # 3. blockwise prediction over the whole cube, written through the resumable writer
    meter.begin("predict+write")
    prediction = predict(p.ds, model, variables=spec.features, tile=None,
                         output_name=f"{spec.target}_predicted")
    provenance = {
        "title": f"cube-engine gap filling: {spec.name}",
        "engine_job_spec": yaml.safe_dump(spec.to_dict(), sort_keys=True),
        "engine_job_fingerprint": fp,
        "engine_code_version": code_version(),
        "engine_model_hash": mhash,
        "engine_model_kind": spec.model.kind,
        "engine_seed": spec.seed,
        "engine_split": json.dumps({k: v for k, v in p.split.attrs.items()
                                    if k.startswith("split_")}, default=str),
        "engine_catalog": p.ds.attrs.get("engine_catalog", spec.resolve(spec.input.catalog)),
        "engine_catalog_entry": spec.input.entry,
        "engine_features": ",".join(spec.features),
        "engine_target": spec.target,
    }
    for k in ("history", "source", "institution", "references"):
        if k in p.ds.attrs:
            provenance[f"input_{k}"] = str(p.ds.attrs[k])
    out = build_output(p, prediction, provenance)
    t_write = time.perf_counter()
    wres = write(out, url, resume=not (overwrite or restart), overwrite=overwrite,
                 restart=restart, fingerprint=fingerprint,
                 storage_options=spec.output.storage_options, client=client,
                 progress=on_region)
    write_s = time.perf_counter() - t_write
    meter.end()
    for stream in streams:
        stream.release()

    # 4. metrics on the test blocks, from the written store (the model is not run twice)
    written = xr.open_zarr(url, storage_options=spec.output.storage_options)
    preds = {
        "model": written[f"{spec.target}_predicted"],
        "ols": stats.ols_predict(p.ds),
        "train_mean": xr.full_like(p.ds[spec.target], stats.mean[spec.target]),
    }
    scores = compute_metrics(written[spec.target], preds, p.test_where)
    n_gaps = int(written["filled_flag"].sum().compute())
    metrics = {
        "job": spec.name,
        "target": spec.target,
        "features": list(spec.features),
        "model_kind": spec.model.kind,
        "model_hash": mhash,
        "split": json.loads(provenance["engine_split"]),
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
        "cells_filled": n_gaps,
        "training": {k: v for k, v in train_info.items() if k != "history"},
        "code_version": code_version(),
    }
    files = {"metrics": os.path.join(run_dir, "metrics.json"), "checkpoint": ckpt,
             "loss_plot": os.path.join(run_dir, "loss.png"),
             "map_plot": os.path.join(run_dir, "map.png")}
    plot_maps(written, spec, files["map_plot"])
    n_out = int(np.prod([written.sizes[d] for d in written[spec.target].dims]))
    throughput = {
        "total_s": time.perf_counter() - t_start,
        "write_s": write_s,
        "output_pixels_per_s": n_out / write_s if write_s else None,
        "bytes_written": getattr(wres, "bytes_written", None),
        "mb_per_s_written": (wres.bytes_written / 1e6 / write_s) if write_s and wres else None,
        "train_samples_per_s": train_info.get("samples_per_s"),
        **meter.summary(),  # per phase: totals, per worker, per GPU
    }
    metrics["throughput"] = throughput
    with open(files["metrics"], "w") as f:
        json.dump(metrics, f, indent=2, default=float)
    if tracker:
        tracker.finish(metrics, files)
    return GapFillResult(output_url=url, run_dir=run_dir, metrics=metrics, files=files,
                         throughput=throughput, write=wres)


def plot_maps(ds: xr.Dataset, spec: GapFillSpec, path: str) -> str:
    """One time step before and after filling, with the filled cells outlined."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = spec.target
    dims = ds[t].dims
    tdim = [d for d in dims if d not in ("lat", "lon")]
    sel = {tdim[0]: spec.output.plot_time} if tdim else {}
    if tdim and not 0 <= spec.output.plot_time < ds.sizes[tdim[0]]:
        raise SpecError(f"output.plot_time must be in [0, {ds.sizes[tdim[0]]}), "
                        f"got {spec.output.plot_time}")
    before = ds[t].isel(sel).compute()
    after = ds[f"{t}_filled"].isel(sel).compute()
    flag = ds["filled_flag"].isel(sel).compute()
    vmin = float(np.nanpercentile(after, 1))
    vmax = float(np.nanpercentile(after, 99))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), dpi=110, sharey=True)
    label = str(before[tdim[0]].values)[:10] if tdim and tdim[0] in before.coords else ""
    for ax, arr, title in ((axes[0], before, "observed"), (axes[1], after, "gaps filled")):
        im = ax.pcolormesh(arr["lon"], arr["lat"], arr, vmin=vmin, vmax=vmax, cmap="RdYlBu_r",
                           shading="auto")
        ax.set_title(f"{t} {title} {label}")
        ax.set_xlabel("longitude")
    axes[1].contour(flag["lon"], flag["lat"], flag, levels=[0.5], colors="k", linewidths=0.4)
    axes[0].set_ylabel("latitude")
    fig.colorbar(im, ax=axes, label=ds[t].attrs.get("units", ""), shrink=0.9)
    fig.suptitle(f"{spec.name}: {int(flag.sum())} cells filled (outlined)")
    fig.savefig(path)
    plt.close(fig)
    return path


class _Tracker:
    """Optional mlflow tracking into a local file store under the run directory."""

    def __init__(self, spec: GapFillSpec, run_dir: str) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = spec.tracking.uri or "file://" + os.path.abspath(os.path.join(run_dir, "mlruns"))
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(spec.tracking.experiment)
        self.run = mlflow.start_run(run_name=spec.name)
        flat = json.loads(json.dumps(spec.to_dict(), default=str))
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
