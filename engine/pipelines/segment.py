"""Segmentation by patches with geographic cross-validation (documents 002 and 003).

Document 003 maps glaciers with a UNet on 256 x 256 multi-band patches centred on glacier
pixels, trained with binary cross-entropy and evaluated on five contiguous longitude
folds (its Table 1: accuracy, IoU, precision, recall, F1 per fold, mean +- std). This
kind runs the same experiment on any cube with a class-coded label; the shipped jobs use
the land-cover cube (:mod:`engine.io.landcover`): Blue Marble colour and the ETOPO1 relief
image as inputs, MODIS IGBP "permanent snow and ice" (code 15) as the glacier analogue.

Steps (:mod:`engine.pipelines.job`): ``prepare`` opens the cube and builds the lazy 0/1
label ``label.classes``; ``split`` makes the ``split.k`` longitude folds (buffer >= one
patch, a validation sector inside each fold's training longitudes); ``train`` fits one
model per fold on label-centred patches lying wholly in the fold's training region
(:func:`engine.ops.sampling.sample_patches`), standardised by that region's statistics,
with early stopping on the validation sector; ``predict`` runs each fold's model on its own
test sector through :func:`engine.predict` (every pixel is predicted out of fold) and
returns ``label``, ``probability`` and ``fold``; ``evaluate`` scores each fold from the
written store and sums predicted and labelled areas per latitude band; ``report`` prints
the Table-1 layout and draws one map per fold.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import dask
import numpy as np
import xarray as xr

from engine.errors import SpecError
from engine.pipelines._segcommon import (
    CodeLabelSpec,
    Fold,
    FoldEpochs,
    PatchJobSpec,
    binary_scores,
    check_cube,
    class_names,
    count_patches,
    fit_fold,
    fmt,
    fold_region,
    folds_hash,
    geo_folds,
    open_patch_input,
    reload_folds,
    save_state,
    summary,
)
from engine.pipelines.job import Job, Prepared, Report, RunContext, Trained
from engine.pipelines.spec import TrainSpec

__all__ = ["SegmentSpec", "LabelSpec", "SegmentModelSpec", "SegmentTrainSpec", "SegmentJob",
           "band_areas", "cell_area_km2", "JOB"]

#: Earth radius of the area sums (km): the IUGG mean radius.
EARTH_RADIUS_KM = 6371.0088
_SCORES = ("accuracy", "iou", "precision", "recall", "f1")


@dataclass(frozen=True)
class LabelSpec(CodeLabelSpec):
    """The label: cells whose ``variable`` holds one of ``classes`` are 1, the rest 0."""

    #: Class codes of the positive class (IGBP: 15 permanent snow and ice, 0 water, ...).
    classes: list[int] = field(default_factory=lambda: [15])


@dataclass(frozen=True)
class SegmentModelSpec:
    architecture: Literal["unet", "unet_small"] = "unet"
    base: int = 32
    depth: int = 4
    loss: Literal["bce", "bce_dice"] = "bce"
    #: Weight of the positive class in the BCE (null: 1).
    pos_weight: float | None = None
    #: A state_dict file of the same UNet to start every fold from (null: from scratch).
    weights: str | None = None


@dataclass(frozen=True)
class SegmentTrainSpec(TrainSpec):
    """Training of each fold's model (batches of patches)."""

    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 1e-3
    patience: int = 5


@dataclass(frozen=True)
class SegmentSpec(PatchJobSpec):
    """A segmentation job: a UNet per geographic fold, every pixel predicted out of fold.
    The sections it shares with ``classify`` are :class:`~engine.pipelines._segcommon.
    PatchJobSpec`'s."""

    kind: Literal["segment"] = "segment"
    label: LabelSpec = field(default_factory=LabelSpec)
    model: SegmentModelSpec = field(default_factory=SegmentModelSpec)
    train: SegmentTrainSpec = field(default_factory=SegmentTrainSpec)
    #: Probability at or above which a pixel is predicted positive.
    threshold: float = 0.5
    #: Latitude bands of the area table, degrees.
    area_band: float = 30.0

    def check(self) -> None:
        super().check()
        self.label.check(at_least=1)
        m = self.model
        if not 1 <= m.depth <= 6 or not 1 <= m.base <= 256:
            raise SpecError(f"model.depth must be in [1, 6] and model.base in [1, 256], got "
                            f"{m.depth}, {m.base}")
        if self.patches.size % 2**m.depth:
            raise SpecError(f"patches.size {self.patches.size} must be divisible by "
                            f"2**model.depth = {2**m.depth} (the UNet pools {m.depth} times)")
        if m.pos_weight is not None and not m.pos_weight > 0:
            raise SpecError(f"model.pos_weight must be > 0, got {m.pos_weight}")
        if not 0 < self.threshold < 1:
            raise SpecError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0 < self.area_band <= 180:
            raise SpecError(f"area_band must be in (0, 180] degrees, got {self.area_band}")


@dataclass(kw_only=True)
class SegmentPrepared(Prepared):
    label: xr.DataArray
    y: str
    x: str
    #: The cube with the 0/1 label as ``__label`` (float32), the channels of the sampler.
    work: xr.Dataset


@dataclass(kw_only=True)
class SegmentTrained(Trained):
    folds: list[Any] = field(default_factory=list)


class SegmentJob(Job):
    name = "segment"
    summary = ("UNet segmentation of label classes on label-centred patches with geographic "
               "k-fold cross-validation, every pixel predicted out of fold (documents 002, 003)")
    title = "segmentation by patches"
    spec = SegmentSpec

    # -- prepare / split ---------------------------------------------------------------
    def prepare(self, spec: SegmentSpec) -> SegmentPrepared:
        base = open_patch_input(spec)
        ds = base.ds
        y, x = check_cube(ds, spec.features, spec.label.variable)
        lab = ds[spec.label.variable]
        known = lab.attrs.get("flag_values")
        if known is not None:
            unknown = sorted(set(spec.label.classes) - {int(v) for v in np.atleast_1d(known)})
            if unknown:
                raise SpecError(f"label.classes {unknown} are not codes of "
                                f"{spec.label.variable!r} (its flag_values are "
                                f"{[int(v) for v in np.atleast_1d(known)]})")
        for d in (y, x):
            if spec.patches.size > ds.sizes[d]:
                raise SpecError(f"patches.size {spec.patches.size} is larger than the cube "
                                f"({d} has {ds.sizes[d]} cells): use a smaller patch")
        label = lab.isin(spec.label.classes).astype(np.uint8)
        work = ds[spec.features].assign(__label=label.astype(np.float32))
        return SegmentPrepared(**vars(base), label=label, y=y, x=x, work=work)

    def split(self, p: SegmentPrepared) -> list[Fold]:  # type: ignore[override]
        s = p.spec
        buffer = s.split.buffer if s.split.buffer is not None else s.patches.size
        _, _, folds = geo_folds(p.ds, s.label.variable, s.split.k, buffer,
                                s.split.validation, s.patches.size)
        return folds

    def describe(self, p: SegmentPrepared) -> str:  # type: ignore[override]
        s = p.spec
        names = class_names(p.ds, s.label.variable, s.label.classes)
        return (f"segment {'+'.join(names)} ({s.label.variable} in {s.label.classes}) from "
                f"{', '.join(s.features)}; {s.split.k} longitude folds, patches "
                f"{s.patches.size}; cube {dict(p.ds.sizes)}")

    # -- train ---------------------------------------------------------------------------
    def _model(self, spec: SegmentSpec, n_in: int) -> Any:
        from engine.ml.archs import Normalized
        from engine.ml.registry import build_architecture

        core = build_architecture(spec.model.architecture, in_channels=n_in, out_channels=1,
                                  base=spec.model.base, depth=spec.model.depth)
        return Normalized(core, n_in)

    def train(self, p: SegmentPrepared, folds: list[Fold],  # type: ignore[override]
              ctx: RunContext) -> SegmentTrained:
        from engine.ml.archs import load_weights, segmentation_loss
        from engine.ml.train import seed_everything
        from engine.ops.sampling import region_statistics, sample_patches

        spec: SegmentSpec = p.spec
        nf = len(spec.features)
        names = [f"fold{f.number}.pt" for f in folds]
        if ctx.previous is not None:
            models = reload_folds(lambda: self._model(spec, nf), names, ctx)
            return SegmentTrained(model=models, info=ctx.previous, model_hash=folds_hash(models),
                                  checkpoints=names, fresh=False, folds=folds)
        size = {p.y: spec.patches.size, p.x: spec.patches.size}
        stride = spec.patches.stride or max(1, spec.patches.size // 4)
        loss = segmentation_loss(spec.model.loss, spec.model.pos_weight)
        variables = [*spec.features, "__label"]
        models, records, resources = [], [], []
        total_samples, total_seconds = 0, 0.0
        for f, name in zip(folds, names, strict=True):
            train_r = fold_region(p.ds, p.x, f.train)
            val_r = fold_region(p.ds, p.x, f.val)
            mean, std, n_px = region_statistics(p.work, spec.features, train_r)
            seed = spec.seed + 1000 * f.number
            common = dict(size=size, stride=stride, centre=p.work["__label"],
                          random_share=spec.patches.random_share, seed=seed,
                          batch_size=spec.train.batch_size, cache=True, client=ctx.client)
            train_s = sample_patches(p.work, variables, train_r, shuffle=True, **common)
            val_s = sample_patches(p.work, variables, val_r, shuffle=False, **common)
            resources += [train_s, val_s]
            n_train, n_val = count_patches(train_s), count_patches(val_s)
            if n_train == 0 or n_val == 0:
                raise SpecError(f"fold {f.number}: {n_train} training and {n_val} validation "
                                "patches are centred on the label or drawn at random: raise "
                                "patches.random_share, lower patches.size or patches.stride")
            ctx.log(f"fold {f.number}: {n_train} training, {n_val} validation patches "
                    f"(standardised by {n_px:,} training cells)")
            seed_everything(seed)  # the initial weights too are a function of the seed
            model = self._model(spec, nf)
            model.set_statistics(mean, std)
            if spec.model.weights:
                load_weights(model.core, spec.resolve(spec.model.weights))
            res = fit_fold(model, train_s, val_s, nf, _identity, loss, spec.train,
                           spec.device, seed, FoldEpochs(ctx, f.number))
            save_state(res.model, ctx.path(name))
            models.append(res.model)
            total_samples += res.samples
            total_seconds += res.seconds
            records.append({"fold": f.number, "n_train_patches": n_train,
                            "n_val_patches": n_val, "n_train_cells": n_px,
                            "mean": mean, "std": std, "best_epoch": res.best_epoch,
                            "epochs_run": len(res.history), "stopped_early": res.stopped_early,
                            "seconds": res.seconds, "samples_per_s": res.samples_per_s,
                            "history": res.history})
        info = {"folds": records, "samples": total_samples, "seconds": total_seconds,
                "samples_per_s": total_samples / total_seconds if total_seconds else None}
        _plot_losses(records, ctx.path("loss.png"), spec.name)
        return SegmentTrained(model=models, info=info, model_hash=folds_hash(models),
                              checkpoints=names, fresh=True, folds=folds,
                              resources=resources)

    # -- predict -------------------------------------------------------------------------
    def predict(self, p: SegmentPrepared, folds: list[Fold],  # type: ignore[override]
                trained: Trained, ctx: RunContext) -> xr.Dataset:
        from engine.ml.predict import predict

        spec: SegmentSpec = p.spec
        size = spec.patches.size
        parts = []
        n = p.ds.sizes[p.x]
        for f, model in zip(folds, trained.model, strict=True):
            model.output = "sigmoid"
            lo, hi = max(0, f.lo - size), min(n, f.hi + size)  # context around the sector
            sub = p.ds[spec.features].isel({p.x: slice(lo, hi)})
            prob = predict(sub, model, variables=spec.features, tile={p.y: size, p.x: size},
                           overlap=spec.predict.overlap, batch_size=spec.predict.batch_size,
                           device=spec.device, precision=spec.predict.precision,
                           output_name="probability", boundary="reflect")
            parts.append(prob.isel({p.x: slice(f.lo - lo, f.hi - lo)}))
        like = p.label
        chunks = dict(zip(like.dims, like.chunks or (), strict=False))
        probability = xr.concat(parts, dim=p.x).transpose(*like.dims).chunk(chunks)
        probability = probability.astype(np.float32)
        names = class_names(p.ds, spec.label.variable, spec.label.classes)
        probability.attrs = {
            "long_name": f"probability of {' or '.join(names)}, predicted out of fold",
            "units": "1", "valid_range": [0.0, 1.0],
            "comment": "each pixel predicted by the model of the fold whose test sector holds "
                       "it (see fold); Gaussian-blended patch predictions (engine.predict)"}
        fold_idx = np.full(n, -1, np.int8)
        for f in folds:
            fold_idx[f.test] = f.number
        fold = xr.DataArray(fold_idx, dims=(p.x,)).broadcast_like(like).transpose(*like.dims)
        fold = fold.chunk(chunks).astype(np.int8)
        fold.attrs = {"long_name": "cross-validation fold whose test sector holds the pixel",
                      "flag_values": list(range(len(folds))),
                      "flag_meanings": " ".join(f"fold_{f.number}" for f in folds)}
        label = p.label.astype(np.uint8)
        label.attrs = {"long_name": f"{' or '.join(names)} ({spec.label.variable} in "
                                    f"{spec.label.classes})",
                       "flag_values": [0, 1], "flag_meanings": f"other {'_or_'.join(names)}"}
        out = xr.Dataset({"label": label, "probability": probability, "fold": fold})
        for d in (p.y, p.x):
            if d in p.ds.coords:
                out = out.assign_coords({d: p.ds[d]})
        out.attrs.update({
            "engine_split": json.dumps(_split_attrs(spec, folds, p.ds, p.x)),
            "engine_label_variable": spec.label.variable,
            "engine_label_classes": json.dumps(spec.label.classes),
            "engine_architecture": spec.model.architecture,
        })
        return out

    # -- evaluate / report ---------------------------------------------------------------
    def evaluate(self, p: SegmentPrepared, folds: list[Fold],  # type: ignore[override]
                 trained: Trained, written: xr.Dataset, ctx: RunContext) -> dict[str, Any]:
        spec: SegmentSpec = p.spec
        lab = written["label"] == 1
        pred = written["probability"] >= spec.threshold
        fold = written["fold"]
        counts = []
        for f in folds:
            inf = fold == f.number
            counts.append([(lab & pred & inf).sum(), (~lab & pred & inf).sum(),
                           (lab & ~pred & inf).sum(), (~lab & ~pred & inf).sum()])
        areas = band_areas(written, p.y, p.x, spec.threshold, spec.area_band)
        counts, areas = dask.compute(counts, areas)
        info = {r["fold"]: r for r in trained.info.get("folds", [])}
        xs = p.ds[p.x].values if p.x in p.ds.coords else np.arange(p.ds.sizes[p.x])
        rows = []
        for f, (tp, fp, fn, tn) in zip(folds, counts, strict=True):
            lon = f.lon_range(xs)
            rows.append({"fold": f.number, "lon_min": lon[0], "lon_max": lon[1],
                         "n_patches": info.get(f.number, {}).get("n_train_patches"),
                         **binary_scores(int(tp), int(fp), int(fn), int(tn)),
                         "n_labelled": int(tp + fn), "n_predicted": int(tp + fp)})
        pooled = binary_scores(*(int(sum(c[j] for c in counts)) for j in range(4)))
        names = class_names(p.ds, spec.label.variable, spec.label.classes)
        return {
            "job": spec.name, "kind": "segment",
            "label": {"variable": spec.label.variable, "classes": spec.label.classes,
                      "names": names},
            "threshold": spec.threshold,
            "folds": rows,
            "summary": summary(rows, _SCORES),
            "pooled": pooled,
            "area_km2": areas,
            "reference": {"document": "003", "what": "glacier UNet, Sentinel-2 + DEM, Alps",
                          "iou_mean": 0.83, "iou_std": 0.05, "accuracy_mean": 0.96,
                          "precision_mean": 0.92, "recall_mean": 0.89, "f1_mean": 0.90},
            "split": _split_attrs(spec, folds, p.ds, p.x),
            "model_hash": trained.model_hash,
            "training": [{k: v for k, v in r.items() if k != "history"}
                         for r in trained.info.get("folds", [])],
        }

    def report(self, p: SegmentPrepared, folds: list[Fold],  # type: ignore[override]
               trained: Trained, metrics: dict[str, Any], written: xr.Dataset,
               ctx: RunContext) -> Report:
        spec: SegmentSpec = p.spec
        rows = [[str(r["fold"]), f"{r['lon_min']:.0f}..{r['lon_max']:.0f}",
                 str(r["n_patches"] if r["n_patches"] is not None else "-"),
                 *(fmt(r[k]) for k in _SCORES)]
                for r in metrics["folds"]]
        s = metrics["summary"]
        rows.append(["mean", "", "", *(fmt(s[k]["mean"]) for k in _SCORES)])
        rows.append(["std", "", "", *(fmt(s[k]["std"]) for k in _SCORES)])
        files = {}
        for f in folds:
            files[f"map_fold{f.number}"] = _plot_fold(written, f, p.y, p.x, spec,
                                                      metrics["folds"][f.number],
                                                      ctx.path(f"map_fold{f.number}.png"))
        if os.path.exists(ctx.path("loss.png")):
            files["loss_plot"] = ctx.path("loss.png")
        a = metrics["area_km2"]["total"]
        notes = [f"area {'+'.join(metrics['label']['names'])}: predicted "
                 f"{a['predicted_km2']:,.0f} km2, labelled {a['labelled_km2']:,.0f} km2 "
                 f"(ratio {fmt(a['ratio'])}); per {spec.area_band:g}-degree latitude band in "
                 "metrics.json area_km2",
                 f"document 003 (glaciers, Alps): IoU 0.83±0.05; this run: IoU "
                 f"{fmt(s['iou']['mean'])}±{fmt(s['iou']['std'])}"]
        return Report(title=f"{spec.name}: {spec.split.k} geographic folds, label "
                            f"{spec.label.variable} in {spec.label.classes}",
                      columns=["fold", "lon", "patches", "acc", "IoU", "prec", "recall", "F1"],
                      rows=rows, notes=notes, files=files,
                      summary={"iou_mean": s["iou"]["mean"], "iou_std": s["iou"]["std"]})


def _identity(y: np.ndarray) -> np.ndarray:
    return y


def _split_attrs(spec: SegmentSpec, folds: list[Fold], ds: xr.Dataset, x: str) -> dict:
    xs = ds[x].values if x in ds.coords else np.arange(ds.sizes[x])
    return {"method": "geo_kfold", "dim": x, "k": spec.split.k, "periodic": True,
            "buffer": spec.split.buffer if spec.split.buffer is not None
            else spec.patches.size,
            "validation": spec.split.validation, "seed": spec.split.seed,
            "sectors": [{"fold": f.number, "lo": f.lo, "hi": f.hi,
                         "lon": list(f.lon_range(xs))} for f in folds]}


def cell_area_km2(lat: np.ndarray, dlon_deg: float) -> np.ndarray:
    """Area (km2) of the cells of a regular grid centred at ``lat`` (degrees), exact on a
    sphere: ``R**2 * dlon * (sin(lat_top) - sin(lat_bottom))``, i.e. cos-latitude weighted.

    >>> round(float(cell_area_km2(np.array([0.0]), 1.0)[0]))  # one degree at the equator
    12364
    """
    lat = np.asarray(lat, float)
    dlat = abs(float(lat[1] - lat[0])) if lat.size > 1 else abs(dlon_deg)
    top = np.radians(np.clip(lat + dlat / 2, -90, 90))
    bottom = np.radians(np.clip(lat - dlat / 2, -90, 90))
    return EARTH_RADIUS_KM**2 * np.radians(abs(dlon_deg)) * np.abs(np.sin(top) - np.sin(bottom))


def band_areas(written: xr.Dataset, y: str, x: str, threshold: float,
               band: float) -> Any:
    """Labelled and predicted area (km2) per latitude band, as a lazy dask object that
    computes to ``{"bands": [...], "total": {...}}``."""
    lat = written[y].values
    lon = written[x].values
    dlon = abs(float(lon[1] - lon[0])) if lon.size > 1 else 360.0
    area = cell_area_km2(lat, dlon)
    lab = (written["label"] == 1).sum(x).data
    pred = (written["probability"] >= threshold).sum(x).data
    edges = np.arange(-90.0, 90.0 + band / 2, band)

    def _table(lab_rows: np.ndarray, pred_rows: np.ndarray) -> dict[str, Any]:
        bands = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sel = (lat >= lo) & (lat < hi) if hi < 90 else (lat >= lo) & (lat <= hi)
            lk = float((lab_rows[sel] * area[sel]).sum())
            pk = float((pred_rows[sel] * area[sel]).sum())
            bands.append({"lat_min": float(lo), "lat_max": float(hi), "labelled_km2": lk,
                          "predicted_km2": pk, "ratio": pk / lk if lk else None})
        lk, pk = float((lab_rows * area).sum()), float((pred_rows * area).sum())
        return {"bands": bands, "total": {"labelled_km2": lk, "predicted_km2": pk,
                                          "ratio": pk / lk if lk else None},
                "cell_area": "spherical, R = 6371.0088 km (cos-latitude weighted)"}

    return dask.delayed(_table)(lab, pred)


def _plot_fold(written: xr.Dataset, f: Fold, y: str, x: str, spec: SegmentSpec,
               row: dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    sector = written.isel({x: slice(f.lo, f.hi)})
    step = max(1, max(sector.sizes[y], sector.sizes[x]) // 1200)  # plotting resolution
    sector = sector.isel({y: slice(None, None, step), x: slice(None, None, step)})
    lab = sector["label"].values == 1
    prob = sector["probability"].values
    pred = prob >= spec.threshold
    err = np.select([lab & pred, ~lab & pred, lab & ~pred], [1, 2, 3], 0)
    ext = [float(sector[x][0]), float(sector[x][-1]), float(sector[y][-1]),
           float(sector[y][0])] if x in sector.coords else None
    fig, axes = plt.subplots(1, 3, figsize=(13, 5), dpi=100, sharey=True)
    axes[0].imshow(lab, extent=ext, cmap="Blues", vmin=0, vmax=1, aspect="auto",
                   interpolation="nearest")
    axes[0].set_title("label")
    im = axes[1].imshow(prob, extent=ext, cmap="viridis", vmin=0, vmax=1, aspect="auto",
                        interpolation="nearest")
    axes[1].set_title("probability (out of fold)")
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    cmap = ListedColormap(["#f0f0f0", "#2b8cbe", "#e34a33", "#fdbb84"])
    axes[2].imshow(err, extent=ext, cmap=cmap, vmin=-0.5, vmax=3.5, aspect="auto",
                   interpolation="nearest")
    axes[2].set_title("TP blue, FP red, FN orange")
    fig.suptitle(f"{spec.name} fold {f.number}: IoU {fmt(row['iou'])}, precision "
                 f"{fmt(row['precision'])}, recall {fmt(row['recall'])}")
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_losses(records: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for r in records:
        h = r["history"]
        ep = [e["epoch"] for e in h]
        line = ax.plot(ep, [e["train_loss"] for e in h], label=f"fold {r['fold']} train")[0]
        ax.plot(ep, [e.get("val_loss", np.nan) for e in h], "--", color=line.get_color(),
                label=f"fold {r['fold']} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.savefig(path)
    plt.close(fig)


JOB = SegmentJob().as_kind()
