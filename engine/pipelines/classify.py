"""Tile classification (document 002's image classification) with geographic folds.

Each non-overlapping tile of ``patches.size`` x ``patches.size`` cells gets the class that
covers most of it (the majority of ``label.variable``, ties to the lower code); a
ResNet-18 trained from scratch (:class:`engine.ml.archs.ResNet18`; no pretrained weights
are downloaded, ``model.weights`` loads a user's state_dict) predicts it from the input
bands. The folds are the segmentation job's ``split.k`` contiguous longitude sectors:
training tiles lie wholly in the fold's training longitudes (a buffer of at least one
tile from the test sector), a tile belongs to the test sector that holds its centre.
Every fold is scored (accuracy, macro-F1, confusion matrix) against the majority-class
baseline of its own training tiles.

The output store is on the tile grid (tile-centre ``lat``/``lon``): ``label`` and
``predicted`` (class codes), ``probability`` (of the predicted class) and ``fold``; the
predictions run blockwise through :func:`engine.predict` with the classifier spread over
its tile (:class:`engine.ml.archs.TileBroadcast`, ``overlap=0``).

With a ``gradcam`` section (issue 12, section 4) the store also holds ``cam``, the Grad-CAM
or Grad-CAM++ map (:func:`engine.ml.gradcam.cube_gradcam`) of every tile on the cube's own
cell grid (dims ``<y>_cell``, ``<x>_cell``), computed lazily block by block with the model of
the fold whose test sector holds the tile, the model that made the tile's stored
prediction (a map never comes from a model that trained on its tile), and written with the
predictions through the same resumable write; ``report`` draws overlay plots of example
test tiles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import xarray as xr

from engine.errors import SpecError
from engine.pipelines._segcommon import (
    CodeLabelSpec,
    Fold,
    FoldEpochs,
    PatchJobSpec,
    PatchSpec,
    check_cube,
    class_names,
    count_patches,
    fit_fold,
    fmt,
    fold_region,
    folds_hash,
    geo_folds,
    multiclass_scores,
    open_patch_input,
    reload_folds,
    save_state,
    summary,
)
from engine.pipelines.job import Job, Prepared, Report, RunContext, Trained
from engine.pipelines.spec import TrainSpec

__all__ = ["ClassifySpec", "ClassLabelSpec", "ClassifyModelSpec", "ClassifyTrainSpec",
           "GradCAMSpec", "ClassifyJob", "tile_majority", "JOB"]

_IGNORE = -100  # target of a tile whose majority is not a listed class (not scored)
#: Where the default target layer of the maps is chosen: the ResNet-18's residual blocks,
#: whose outputs are post-activation (the last Conv2d alone, before batch norm and ReLU,
#: localises worse); the deepest that still resolves 4 x 4 positions of the tile is taken
#: (:func:`engine.ml.gradcam.resolving_layer`: torchvision's ``layer4`` on 224-pixel
#: images, ``layers.5`` on 16-cell tiles with the small stem, where ``layers.7`` is 2 x 2).
CAM_STAGES = tuple(f"layers.{i}" for i in range(8))
_MAX_PLOTS = 64


@dataclass(frozen=True)
class ClassLabelSpec(CodeLabelSpec):
    """The classes: codes of ``variable``; the majority code of a tile is its class."""

    #: Class codes, in the order of the model's outputs (default: IGBP 0..16).
    classes: list[int] = field(default_factory=lambda: list(range(17)))


@dataclass(frozen=True)
class ClassifyModelSpec:
    architecture: Literal["resnet18"] = "resnet18"
    #: Channels of the first stage (64: the published ResNet-18).
    width: int = 64
    #: "imagenet": 7x7 stride-2 stem with max pooling; "small": 3x3 stride 1 (small tiles).
    stem: Literal["imagenet", "small"] = "imagenet"
    #: A state_dict file (of the ResNet-18, or a fold checkpoint of this kind) that every
    #: fold starts from; null: from scratch.
    weights: str | None = None
    #: With weights: false evaluates them as they are, with no training.
    fine_tune: bool = True


@dataclass(frozen=True)
class ClassifyTrainSpec(TrainSpec):
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 4


@dataclass(frozen=True)
class GradCAMSpec:
    """Class activation maps of every tile, by the model of its fold (issue 12, section 4)."""

    method: Literal["gradcam", "gradcam++"] = "gradcam"
    #: A module of the ResNet-18 by its name in ``named_modules()`` (``layers.0`` ..
    #: ``layers.7``: its residual blocks, two per stage; ``layers.7.conv2``: the last
    #: convolution; ``stem.0``); null: the deepest block whose output still has 4 x 4
    #: positions on a tile (``layers.5`` for 16-cell tiles and the small stem).
    layer: str | None = None
    #: The class each map explains: ``predicted`` (the tile's predicted class), or one
    #: code of ``label.classes`` for every tile.
    target: Literal["predicted"] | int = "predicted"
    #: Overlay plots of example test tiles in the run folder (the most confident tile of
    #: each predicted class, most frequent class first); 0: none.
    plots: int = 4


@dataclass(frozen=True)
class ClassifySpec(PatchJobSpec):
    """A tile classification job: one ResNet-18 per geographic fold. The sections it shares
    with ``segment`` are :class:`~engine.pipelines._segcommon.PatchJobSpec`'s."""

    kind: Literal["classify"] = "classify"
    label: ClassLabelSpec = field(default_factory=ClassLabelSpec)
    patches: PatchSpec = field(default_factory=lambda: PatchSpec(size=64, random_share=0.0))
    model: ClassifyModelSpec = field(default_factory=ClassifyModelSpec)
    train: ClassifyTrainSpec = field(default_factory=ClassifyTrainSpec)
    #: Grad-CAM maps beside the predictions (null: none).
    gradcam: GradCAMSpec | None = None

    def check(self) -> None:
        super().check()
        self.label.check(at_least=2)
        g = self.gradcam
        if g is not None:
            if g.target != "predicted" and g.target not in self.label.classes:
                raise SpecError(f"gradcam.target {g.target!r} is not one of label.classes: "
                                "use predicted or a listed class code")
            if not 0 <= g.plots <= _MAX_PLOTS:
                raise SpecError(f"gradcam.plots must be in [0, {_MAX_PLOTS}], got {g.plots}")
        if not 4 <= self.model.width <= 256:
            raise SpecError(f"model.width must be in [4, 256], got {self.model.width}")
        if not self.model.fine_tune and not self.model.weights:
            raise SpecError("model.fine_tune: false evaluates model.weights without training: "
                            "give model.weights too")


@dataclass(kw_only=True)
class ClassifyPrepared(Prepared):
    y: str
    x: str
    work: xr.Dataset
    #: The target layer of the maps (a module of the ResNet-18), None without ``gradcam``.
    cam_layer: str | None = None


@dataclass(kw_only=True)
class ClassifyTrained(Trained):
    baselines: list[int] = field(default_factory=list)


def tile_majority(codes: np.ndarray) -> np.ndarray:
    """Majority code of each tile ``(n, h, w)`` (ties: the lower code), int64 ``(n,)``.

    >>> tile_majority(np.array([[[3, 3], [5, 1]], [[2, 4], [4, 2]]]))
    array([3, 2])
    """
    c = np.asarray(codes).reshape(len(codes), -1).astype(np.int64)
    counts = np.zeros((len(c), int(c.max(initial=0)) + 1), np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(c)), c.shape[1]), c.ravel()), 1)
    return counts.argmax(axis=1)


def _mode_reduce(x: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """``coarsen(...).reduce`` function: majority over the two window axes."""
    moved = np.moveaxis(x, axis, (-2, -1))
    lead = moved.shape[:-2]
    flat = moved.reshape(-1, moved.shape[-2], moved.shape[-1])
    return tile_majority(flat).reshape(lead).astype(x.dtype)


class _Targets:
    """Tile targets from the code channel: class index of the majority, -100 otherwise."""

    def __init__(self, classes: list[int]) -> None:
        self.lut = np.full(256, _IGNORE, np.int64)
        self.lut[classes] = np.arange(len(classes))

    def __call__(self, extra: np.ndarray) -> np.ndarray:
        return self.lut[np.clip(tile_majority(extra[:, 0]), 0, 255)]


class ClassifyJob(Job):
    name = "classify"
    summary = ("ResNet-18 tile classification (majority class per tile) with geographic "
               "k-fold cross-validation against the majority-class baseline (document 002)")
    title = "tile classification"
    spec = ClassifySpec

    def prepare(self, spec: ClassifySpec) -> ClassifyPrepared:
        base = open_patch_input(spec)
        ds = base.ds
        y, x = check_cube(ds, spec.features, spec.label.variable)
        lab = ds[spec.label.variable]
        for d in (y, x):
            if 2 * spec.patches.size > ds.sizes[d]:
                raise SpecError(f"patches.size {spec.patches.size} leaves fewer than two tiles "
                                f"along {d} ({ds.sizes[d]} cells): use smaller tiles")
        work = ds[spec.features].assign(__code=lab.astype(np.float32))
        p = ClassifyPrepared(**vars(base), y=y, x=x, work=work)
        if spec.model.weights:  # a bad weights file is one line before anything is written
            self._load_user_weights(self._model(spec, len(spec.features)), spec)
        if spec.gradcam is not None:  # so is a layer the maps cannot be taken from
            p.cam_layer = self._cam_layer(spec)
        return p

    def _cam_layer(self, spec: ClassifySpec) -> str:
        """The target layer of the maps, tried on one blank tile with an untrained model: a
        layer that is not in the network, or whose output is no ``(B, C, h, w)`` map that
        reaches the logits, is one line."""
        from engine.ml.gradcam import blank_tile, gradcam, map_sizes, resolving_layer

        assert spec.gradcam is not None
        model = self._model(spec, len(spec.features))
        t = spec.patches.size
        blank = blank_tile(len(spec.features), t)
        layer = spec.gradcam.layer
        if layer is None:
            return resolving_layer(model.core, blank, CAM_STAGES, min_size=4)
        names = [n for n, _ in model.core.named_modules() if n]
        if layer not in names:
            raise SpecError(f"gradcam.layer {layer!r} is not a module of the ResNet-18: use "
                            f"null (the deepest block resolving the tile), a block "
                            f"{CAM_STAGES[0]} .. {CAM_STAGES[-1]}, or a convolution such as "
                            "layers.7.conv2 or stem.0")
        fix = (f"name a block ({CAM_STAGES[0]} .. {CAM_STAGES[-1]}) or a convolution of the "
               "ResNet-18, or null")
        try:
            gradcam(model, blank, layer=f"core.{layer}", method=spec.gradcam.method)
        except (SpecError, RuntimeError) as err:
            raise SpecError(f"gradcam.layer {layer!r} gives no class activation map "
                            f"({str(err).splitlines()[0]}): {fix}") from None
        side = map_sizes(model.core, blank, [layer])[layer]
        if side < 2:
            raise SpecError(f"gradcam.layer {layer!r} has a {side} x {side} output on a "
                            f"{t}-cell tile, a map that localises nothing: {fix}")
        return layer

    @staticmethod
    def _load_user_weights(model: Any, spec: ClassifySpec) -> None:
        """``model.weights`` into ``model``: a checkpoint of this kind (statistics
        included) or a state_dict of the ResNet-18 alone."""
        from engine.ml.archs import load_weights

        assert spec.model.weights is not None
        path = spec.resolve(spec.model.weights)
        try:
            load_weights(model, path)
        except SpecError:
            load_weights(model.core, path)

    def split(self, p: ClassifyPrepared) -> list[Fold]:  # type: ignore[override]
        s = p.spec
        buffer = s.split.buffer if s.split.buffer is not None else s.patches.size
        return geo_folds(p.ds, s.label.variable, s.split.k, buffer, s.split.validation,
                         s.patches.size)[2]

    def describe(self, p: ClassifyPrepared) -> str:  # type: ignore[override]
        s = p.spec
        cam = "" if s.gradcam is None else f"; {s.gradcam.method} maps of {p.cam_layer}"
        return (f"classify {s.patches.size}x{s.patches.size} tiles into {len(s.label.classes)} "
                f"classes of {s.label.variable} from {', '.join(s.features)}; {s.split.k} "
                f"longitude folds{cam}; cube {dict(p.ds.sizes)}")

    def _model(self, spec: ClassifySpec, n_in: int) -> Any:
        from engine.ml.archs import Normalized
        from engine.ml.registry import build_architecture

        core = build_architecture(spec.model.architecture, in_channels=n_in,
                                  out_channels=len(spec.label.classes),
                                  width=spec.model.width, stem=spec.model.stem)
        return Normalized(core, n_in)

    def train(self, p: ClassifyPrepared, folds: list[Fold],  # type: ignore[override]
              ctx: RunContext) -> ClassifyTrained:
        from engine.ml.archs import classification_loss
        from engine.ml.train import seed_everything
        from engine.ops.sampling import region_statistics, sample_patches

        spec: ClassifySpec = p.spec
        nf = len(spec.features)
        names = [f"fold{f.number}.pt" for f in folds]
        if ctx.previous is not None:
            models = reload_folds(lambda: self._model(spec, nf), names, ctx)
            return ClassifyTrained(model=models, info=ctx.previous,
                                   model_hash=folds_hash(models), checkpoints=names,
                                   fresh=False, baselines=ctx.previous["baselines"])
        t = spec.patches.size
        size = {p.y: t, p.x: t}
        stride = spec.patches.stride or t
        targets = _Targets(spec.label.classes)
        variables = [*spec.features, "__code"]
        models, records, resources, baselines = [], [], [], []
        total_samples, total_seconds = 0, 0.0
        for f, name in zip(folds, names, strict=True):
            train_r = fold_region(p.ds, p.x, f.train)
            val_r = fold_region(p.ds, p.x, f.val)
            seed = spec.seed + 1000 * f.number
            common = dict(size=size, stride=stride, seed=seed, batch_size=spec.train.batch_size,
                          cache=True, client=ctx.client)
            train_s = sample_patches(p.work, variables, train_r, shuffle=True, **common)
            val_s = sample_patches(p.work, variables, val_r, shuffle=False, **common)
            resources += [train_s, val_s]
            # the majority baseline: the most frequent class of the training tiles
            hist = np.zeros(len(spec.label.classes), np.int64)
            for b in train_s:
                tt = targets(b.data[:, nf:])
                hist += np.bincount(tt[tt >= 0], minlength=len(hist))
            n_val = count_patches(val_s)
            if hist.sum() == 0 or n_val == 0:
                raise SpecError(f"fold {f.number}: {int(hist.sum())} training and {n_val} "
                                "validation tiles: use smaller tiles (patches.size) or a "
                                "smaller split.buffer")
            baselines.append(int(spec.label.classes[int(hist.argmax())]))
            seed_everything(seed)  # the initial weights too are a function of the seed
            model = self._model(spec, nf)
            mean, std, n_px = region_statistics(p.work, spec.features, train_r)
            model.set_statistics(mean, std)
            if spec.model.weights:
                self._load_user_weights(model, spec)
            record: dict[str, Any] = {"fold": f.number, "n_train_tiles": int(hist.sum()),
                                      "n_val_tiles": n_val, "n_train_cells": n_px,
                                      "class_counts": hist.tolist(),
                                      "baseline_class": baselines[-1]}
            if spec.model.fine_tune:
                res = fit_fold(model, train_s, val_s, nf, targets, classification_loss,
                               spec.train, spec.device, seed, FoldEpochs(ctx, f.number))
                model = res.model
                total_samples += res.samples
                total_seconds += res.seconds
                record.update(best_epoch=res.best_epoch, epochs_run=len(res.history),
                              stopped_early=res.stopped_early, seconds=res.seconds,
                              samples_per_s=res.samples_per_s, history=res.history)
            model.eval()
            ctx.log(f"fold {f.number}: {int(hist.sum())} training, {n_val} validation tiles; "
                    f"majority class {baselines[-1]}")
            save_state(model, ctx.path(name))
            models.append(model)
            records.append(record)
        info = {"folds": records, "baselines": baselines, "samples": total_samples,
                "seconds": total_seconds,
                "samples_per_s": total_samples / total_seconds if total_seconds else None}
        return ClassifyTrained(model=models, info=info, model_hash=folds_hash(models),
                               checkpoints=names, fresh=True, baselines=baselines,
                               resources=resources)

    def predict(self, p: ClassifyPrepared, folds: list[Fold],  # type: ignore[override]
                trained: Trained, ctx: RunContext) -> xr.Dataset:
        from engine.ml.archs import TileBroadcast
        from engine.ml.predict import predict

        spec: ClassifySpec = p.spec
        t = spec.patches.size
        n = p.ds.sizes[p.x]
        n_tiles = n // t
        rows = p.ds.sizes[p.y] // t * t
        classes = np.array(spec.label.classes)
        tile_fold = np.full(n_tiles, -1, np.int8)
        parts = []
        for f, model in zip(folds, trained.model, strict=True):
            model.output = "logits"
            centres = np.arange(n_tiles) * t + t // 2
            mine = np.flatnonzero((centres >= f.lo) & (centres < f.hi))
            if mine.size == 0:
                continue
            tile_fold[mine] = f.number
            j0, j1 = int(mine[0]), int(mine[-1]) + 1
            # whole tiles only: a window over the last, incomplete row of tiles would be
            # blended into the row above, which would then not be its tiles' own prediction
            sub = p.ds[spec.features].isel({p.y: slice(0, rows), p.x: slice(j0 * t, j1 * t)})
            probs = predict(sub, TileBroadcast(model), variables=spec.features,
                            tile={p.y: t, p.x: t}, overlap=0.0, blend="mean",
                            batch_size=spec.predict.batch_size, device=spec.device,
                            precision=spec.predict.precision,
                            out_channels=len(classes), output_name="probabilities",
                            boundary="reflect")
            parts.append(probs)
        pix = xr.concat(parts, dim=p.x)
        # every pixel of a tile holds the tile's probabilities: the mean is the tile's
        tiles = pix.coarsen({p.y: t, p.x: t}, boundary="trim").mean()
        chan = str([d for d in tiles.dims if d not in (p.y, p.x)][0])
        idx = tiles.argmax(chan)
        codes8 = classes.astype(np.uint8)
        predicted = idx.copy(data=idx.data.map_blocks(lambda a: codes8[a], dtype=np.uint8))
        probability = tiles.max(chan).astype(np.float32)
        label = p.ds[spec.label.variable].isel({p.x: slice(0, n_tiles * t)})
        label = label.coarsen({p.y: t, p.x: t}, boundary="trim").reduce(_mode_reduce)
        label = label.astype(np.uint8)
        grid = probability
        fold = xr.DataArray(tile_fold, dims=(p.x,)).broadcast_like(grid).transpose(*grid.dims)
        chunks = {d: -1 for d in grid.dims}
        out = xr.Dataset({
            "label": label.drop_vars(chan, errors="ignore").chunk(chunks),
            "predicted": predicted.drop_vars(chan, errors="ignore").chunk(chunks),
            "probability": probability.chunk(chunks),
            "fold": fold.chunk(chunks).astype(np.int8),
        })
        codes = list(map(int, classes))
        meanings = _meanings(p.ds, spec.label.variable, codes)
        out["label"].attrs = {"long_name": f"majority {spec.label.variable} class of the "
                                           f"{t}x{t}-cell tile",
                              "flag_values": codes, "flag_meanings": meanings}
        out["predicted"].attrs = {"long_name": "class predicted out of fold (ResNet-18)",
                                  "flag_values": codes, "flag_meanings": meanings}
        out["probability"].attrs = {"long_name": "softmax probability of the predicted class",
                                    "units": "1", "valid_range": [0.0, 1.0]}
        if spec.gradcam is not None:
            out["cam"] = self._cam(p, folds, trained.model)
        out["fold"].attrs = {"long_name": "fold whose test sector holds the tile centre",
                             "flag_values": list(range(len(folds))),
                             "flag_meanings": " ".join(f"fold_{f.number}" for f in folds)}
        for d in (p.y, p.x):
            if d in p.ds.coords:
                out[d].attrs = {**p.ds[d].attrs, "comment": f"centre of {t}-cell tiles"}
        out.attrs.update({
            "engine_split": json.dumps({"method": "geo_kfold", "k": spec.split.k,
                                        "tile": t, "sectors": [[f.lo, f.hi] for f in folds]}),
            "engine_label_variable": spec.label.variable,
            "engine_architecture": f"{spec.model.architecture} width {spec.model.width} "
                                   f"stem {spec.model.stem}",
        })
        if spec.gradcam is not None:
            out.attrs["engine_gradcam"] = json.dumps({
                "method": spec.gradcam.method,
                "layer": p.cam_layer,
                "target": spec.gradcam.target, "dims": list(out["cam"].dims)})
        return out

    def _cam(self, p: ClassifyPrepared, folds: list[Fold], models: list[Any]) -> xr.DataArray:
        """The lazy class activation map of every tile on the cube's cell grid: each fold's
        model explains the tiles of its own test sector (those it predicted)."""
        from engine.ml.gradcam import cube_gradcam

        spec: ClassifySpec = p.spec
        g = spec.gradcam
        assert g is not None
        t = spec.patches.size
        n = p.ds.sizes[p.x]
        n_tiles = n // t
        layer = p.cam_layer
        assert layer is not None
        target = None if g.target == "predicted" else spec.label.classes.index(int(g.target))
        centres = np.arange(n_tiles) * t + t // 2
        parts = []
        for f, model in zip(folds, models, strict=True):
            mine = np.flatnonzero((centres >= f.lo) & (centres < f.hi))
            if mine.size == 0:
                continue
            j0, j1 = int(mine[0]), int(mine[-1]) + 1
            sector = p.ds[spec.features].isel({p.x: slice(j0 * t, j1 * t)})
            bands = sector.to_array("__band").transpose("__band", p.y, p.x)
            model.output = "logits"  # the map explains a logit, not a probability
            cam = cube_gradcam(model, bands, {p.y: t, p.x: t}, channel_dim="__band",
                               target=target, layer=f"core.{layer}", method=g.method,
                               batch_size=spec.predict.batch_size)["cam"]
            parts.append((j0, cam))
        parts.sort(key=lambda jc: jc[0])
        cam = xr.concat([c for _, c in parts], dim=p.x)
        if cam.sizes[p.x] < n:  # cells right of the last whole tile: no map
            cam = cam.pad({p.x: (0, n - cam.sizes[p.x])}, constant_values=np.nan)
        # the store's chunks: the input's, rounded to whole tiles (chunks never split a tile)
        src = p.ds[spec.features[0]]
        given = dict(zip(src.dims, src.chunks or tuple((m,) for m in src.shape), strict=True))
        chunks = {str(d): max(t, (max(c) // t) * t) for d, c in given.items()}
        cam = cam.drop_vars([v for v in cam.coords if v not in cam.dims]).chunk(chunks)
        cell = {p.y: f"{p.y}_cell", p.x: f"{p.x}_cell"}
        cam = cam.rename(cell).astype(np.float32)
        for d, name in cell.items():
            if d in p.ds.coords:
                cam = cam.assign_coords({name: (name, p.ds[d].values, {
                    **p.ds[d].attrs, "comment": f"cell centres of the input grid (cam's {d})"})})
        explained = ("predicted class (see predicted)" if target is None else
                     f"class {g.target} ({_meanings(p.ds, spec.label.variable, [int(g.target)])})")
        cam.attrs = {
            "long_name": f"{'Grad-CAM++' if g.method == 'gradcam++' else 'Grad-CAM'} class "
                         f"activation map of the {explained}",
            "units": "1", "valid_range": [0.0, 1.0],
            "method": g.method, "layer": layer, "explained_class": explained,
            "tile": f"{t}x{t} cells",
            "comment": "each tile explained by the model of the fold whose test sector holds "
                       "its centre (the model of its prediction, see fold), divided by the "
                       "tile's maximum; NaN right of and below the last whole tile and on "
                       "tiles with a missing input",
        }
        return cam

    def evaluate(self, p: ClassifyPrepared, folds: list[Fold],  # type: ignore[override]
                 trained: Trained, written: xr.Dataset, ctx: RunContext) -> dict[str, Any]:
        spec: ClassifySpec = p.spec
        classes = list(spec.label.classes)
        index = {c: i for i, c in enumerate(classes)}
        lab = written["label"].values.ravel()
        pred = written["predicted"].values.ravel()
        fold = written["fold"].values.ravel()
        baselines = getattr(trained, "baselines", None) or trained.info["baselines"]
        rows = []
        for f in folds:
            sel = (fold == f.number) & np.isin(lab, classes)
            conf = np.zeros((len(classes), len(classes)), np.int64)
            for a, b in zip(lab[sel], pred[sel], strict=True):
                conf[index[int(a)], index[int(b)]] += 1
            base = np.zeros_like(conf)
            base[:, index[baselines[f.number]]] = conf.sum(axis=1)
            m, bm = multiclass_scores(conf), multiclass_scores(base)
            rows.append({"fold": f.number, "n_tiles": m["n_tiles"], "accuracy": m["accuracy"],
                         "macro_f1": m["macro_f1"], "baseline_class": baselines[f.number],
                         "baseline_accuracy": bm["accuracy"],
                         "baseline_macro_f1": bm["macro_f1"],
                         "classes_present": m["classes_present"],
                         "confusion": conf.tolist()})
        keys = ("accuracy", "macro_f1", "baseline_accuracy", "baseline_macro_f1")
        pooled = multiclass_scores(np.sum([r["confusion"] for r in rows], axis=0))
        cam = {}
        if spec.gradcam is not None and "cam" in written:
            cam = {"gradcam": {"method": spec.gradcam.method, "layer": p.cam_layer,
                               "target": spec.gradcam.target, "variable": "cam",
                               "cells_mapped": int(np.isfinite(written["cam"]).sum())}}
        return {
            "job": spec.name, "kind": "classify",
            "classes": classes,
            "class_names": _meanings(p.ds, spec.label.variable, classes).split(),
            "tile": spec.patches.size,
            "folds": rows,
            "summary": summary(rows, keys),
            "pooled": {k: pooled[k] for k in ("accuracy", "macro_f1", "n_tiles")},
            "model_hash": trained.model_hash,
            "training": [{k: v for k, v in r.items() if k != "history"}
                         for r in trained.info.get("folds", [])],
            **cam,
        }

    def report(self, p: ClassifyPrepared, folds: list[Fold],  # type: ignore[override]
               trained: Trained, metrics: dict[str, Any], written: xr.Dataset,
               ctx: RunContext) -> Report:
        spec: ClassifySpec = p.spec
        rows = [[str(r["fold"]), str(r["n_tiles"]), fmt(r["accuracy"]), fmt(r["macro_f1"]),
                 fmt(r["baseline_accuracy"]), fmt(r["baseline_macro_f1"])]
                for r in metrics["folds"]]
        s = metrics["summary"]
        keys = ("accuracy", "macro_f1", "baseline_accuracy", "baseline_macro_f1")
        rows.append(["mean", "", *(fmt(s[k]["mean"]) for k in keys)])
        rows.append(["std", "", *(fmt(s[k]["std"]) for k in keys)])
        files = {}
        for r in metrics["folds"]:
            path = ctx.path(f"confusion_fold{r['fold']}.png")
            _plot_confusion(np.array(r["confusion"]), metrics["classes"], path,
                            f"{spec.name} fold {r['fold']}: accuracy {fmt(r['accuracy'])}, "
                            f"macro-F1 {fmt(r['macro_f1'])}")
            files[f"confusion_fold{r['fold']}"] = path
            jpath = ctx.path(f"confusion_fold{r['fold']}.json")
            with open(jpath, "w") as fh:
                json.dump({"fold": r["fold"], "classes": metrics["classes"],
                           "rows": "true class", "columns": "predicted class",
                           "confusion": r["confusion"]}, fh)
            files[f"confusion_fold{r['fold']}_json"] = jpath
        notes = [f"majority-class baseline: accuracy {fmt(s['baseline_accuracy']['mean'])}, "
                 f"macro-F1 {fmt(s['baseline_macro_f1']['mean'])} (the most frequent class of "
                 "each fold's training tiles)"]
        if spec.gradcam is not None and "cam" in written:
            g = spec.gradcam
            plots = _plot_cams(p, written, metrics["class_names"], g.plots, ctx)
            files.update(plots)
            notes.append(f"{g.method} maps of layer {p.cam_layer} (each tile by its fold's "
                         f"model) in the store as cam; {len(plots)} overlay plots")
        return Report(title=f"{spec.name}: {spec.patches.size}x{spec.patches.size} tiles, "
                            f"{len(spec.label.classes)} classes, {spec.split.k} geographic folds",
                      columns=["fold", "tiles", "accuracy", "macro-F1", "majority acc",
                               "majority F1"], rows=rows, notes=notes, files=files,
                      summary={"accuracy_mean": s["accuracy"]["mean"],
                               "macro_f1_mean": s["macro_f1"]["mean"]})


def _meanings(ds: xr.Dataset, variable: str, classes: list[int]) -> str:
    return " ".join(class_names(ds, variable, classes))


def cam_examples(written: xr.Dataset, tile: int, n: int) -> list[tuple[int, int]]:
    """``n`` example tiles ``(row, column)`` of the tile grid whose map is complete: the
    most confident tile of each predicted class, the most frequent class first, then the
    next most confident tiles (ties: the first in row-major order)."""
    pred = written["predicted"].values.ravel()
    prob = np.nan_to_num(written["probability"].values.ravel().astype(float), nan=-1.0)
    ny, nx = written["predicted"].shape
    cam = written["cam"].values[:ny * tile, :nx * tile].reshape(ny, tile, nx, tile)
    complete = np.isfinite(cam).all(axis=(1, 3)).ravel()
    order = np.lexsort((np.arange(prob.size), -prob))  # most confident first
    order = order[complete[order]]
    classes, counts = np.unique(pred[order], return_counts=True)
    chosen = [int(order[pred[order] == c][0]) for c in classes[np.lexsort((classes, -counts))]]
    chosen += [int(i) for i in order if int(i) not in chosen]
    return [divmod(i, nx) for i in chosen[:n]]


def _plot_cams(p: ClassifyPrepared, written: xr.Dataset, names: list[str], n: int,
               ctx: RunContext) -> dict[str, str]:
    """Overlay plots (:func:`engine.ml.gradcam.overlay_plot`) of ``n`` example tiles
    (:func:`cam_examples`), each over its input (the first three features as RGB, else the
    first): run-folder files by role."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from engine.ml.gradcam import overlay_plot

    spec: ClassifySpec = p.spec
    g = spec.gradcam
    assert g is not None
    t = spec.patches.size
    name = dict(zip(spec.label.classes, names, strict=True))
    explains = "predicted class" if g.target == "predicted" else name[int(g.target)]
    bands = spec.features[:3] if len(spec.features) >= 3 else spec.features[:1]
    cam = written["cam"]
    files = {}
    for k, (i, j) in enumerate(cam_examples(written, t, n)):
        rows, cols = slice(i * t, (i + 1) * t), slice(j * t, (j + 1) * t)
        tile = np.stack([p.ds[b].isel({p.y: rows, p.x: cols}).values for b in bands])
        heat = cam.isel({cam.dims[0]: rows, cam.dims[1]: cols}).values
        pred, lab = int(written["predicted"].values[i, j]), int(written["label"].values[i, j])
        title = (f"fold {int(written['fold'].values[i, j])}, tile ({i}, {j}): predicted "
                 f"{name.get(pred, pred)} ({float(written['probability'].values[i, j]):.2f})\n"
                 f"label {name.get(lab, lab)}; {g.method} of the {explains}")
        path = ctx.path(f"gradcam_tile{k}.png")
        plt.close(overlay_plot(tile, heat, title=title, path=path))
        files[f"gradcam_tile{k}"] = path
    return files


def _plot_confusion(conf: np.ndarray, classes: list[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    norm = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i, j in zip(*np.nonzero(conf), strict=True):
        ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=6,
                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes], fontsize=7)
    ax.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (tile majority)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of the true class")
    fig.savefig(path)
    plt.close(fig)


JOB = ClassifyJob().as_kind()
