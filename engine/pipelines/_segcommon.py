"""What the patch kinds ``segment`` and ``classify`` share: the land-cover spec sections,
geographic folds with their validation sectors, per-fold training through
:func:`engine.ml.fit.fit`, checkpoints and the binary / multi-class scores.

Folds are document 003's: ``k`` contiguous longitude sectors (:func:`engine.ops.splits.
geo_kfold`, periodic), each tested by a model trained on the others, with a buffer of at
least one patch width around the test sector. Training patches must lie *wholly* in the
fold's training region (:func:`engine.ops.sampling.sample_patches`), so no training pixel
is ever a test pixel, whatever the buffer. Early stopping uses a validation sector cut out
of the middle of the training longitudes (the part farthest from the test sector that does
not cross the dateline).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import xarray as xr

from engine.dims import cube_dims
from engine.errors import CubeError, SpecError
from engine.pipelines.spec import (
    MAX_EPOCHS,
    InputSpec,
    JobSpecBase,
    OutputSpec,
    TrackingSpec,
    TrainSpec,
)

__all__ = [
    # spec sections
    "PatchJobSpec", "CodeLabelSpec", "GeoFoldSpec", "PatchSpec", "InferenceSpec",
    "InputSpec", "OutputSpec", "TrainSpec", "TrackingSpec", "check_common_patch_spec",
    # folds and training
    "Fold", "geo_folds", "fold_region", "fit_fold", "FoldEpochs", "count_patches",
    "save_state", "load_state", "reload_folds", "folds_hash",
    # scores
    "binary_scores", "multiclass_scores", "summary", "fmt",
    # the cube
    "check_cube", "open_patch_input", "class_names",
]


@dataclass(frozen=True)
class GeoFoldSpec:
    """Geographic k-fold cross-validation along longitude (document 003's Figure A1)."""

    k: int = 5
    #: Cells between a test sector and the training region; default (null): the patch size.
    #: Must be at least the patch size.
    buffer: int | None = None
    #: Share of each fold's training longitudes held out for early stopping (a contiguous
    #: sector in the middle of them, farthest from the test sector).
    validation: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class PatchSpec:
    """Patch (segment) or tile (classify) size in cells, and the sampling of training
    patches."""

    size: int = 256
    #: Window step of the training patches; default (null): size // 4 (segment), size
    #: (classify: non-overlapping tiles).
    stride: int | None = None
    #: Share of windows not centred on a labelled pixel kept for training (segment).
    random_share: float = 0.1


@dataclass(frozen=True)
class InferenceSpec:
    """Blockwise prediction (:func:`engine.predict`)."""

    overlap: float = 0.5
    batch_size: int = 32
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@dataclass(frozen=True)
class CodeLabelSpec:
    """A class-coded label: the integer variable and the class codes a job uses (the kinds
    subclass it for their own default codes and their meaning)."""

    variable: str = "landcover"
    classes: list[int] = field(default_factory=lambda: [15])

    def check(self, at_least: int) -> None:
        """At least ``at_least`` distinct codes, each in [0, 254] (one line naming the field)."""
        c = self.classes
        if len(c) < at_least or len(set(c)) != len(c) or not all(0 <= v <= 254 for v in c):
            many = "one" if at_least == 1 else str(at_least)
            raise SpecError(f"label.classes must list {many} or more distinct class codes "
                            f"(integers in [0, 254]), got {c}")


@dataclass(frozen=True)
class PatchJobSpec(JobSpecBase):
    """The sections every patch kind's spec has (``segment``, ``classify``); a kind adds
    ``kind``, ``label``, ``model`` and ``train`` (and may change a section's default)."""

    name: str
    input: InputSpec
    output: OutputSpec
    features: list[str] = field(default_factory=lambda: ["red", "green", "blue", "relief"])
    patches: PatchSpec = field(default_factory=PatchSpec)
    split: GeoFoldSpec = field(default_factory=GeoFoldSpec)
    predict: InferenceSpec = field(default_factory=InferenceSpec)
    #: Where training and inference run: auto (CUDA when there is one), cpu, cuda, cuda:N.
    device: str = "auto"
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    seed: int = 0
    base_dir: str = "."

    def check(self) -> None:
        super().check()
        check_common_patch_spec(self)


def check_common_patch_spec(spec: Any) -> None:
    """Cube-free checks of the fold, patch, train and predict sections (one line each)."""
    f, p = spec.split, spec.patches
    if not 2 <= f.k <= 100:
        raise SpecError(f"split.k must be in [2, 100], got {f.k}")
    if not 0 < f.validation < 1:
        raise SpecError(f"split.validation must be in (0, 1), got {f.validation}")
    if not 0 <= f.seed < 2**63:
        raise SpecError(f"split.seed must be in [0, 2**63), got {f.seed}")
    if not 4 <= p.size <= 4096:
        raise SpecError(f"patches.size must be in [4, 4096] cells, got {p.size}")
    if p.stride is not None and not 1 <= p.stride <= p.size:
        raise SpecError(f"patches.stride must be in [1, patches.size={p.size}], got {p.stride}")
    if f.buffer is not None and f.buffer < p.size:
        raise SpecError(f"split.buffer ({f.buffer}) must be at least patches.size "
                        f"({p.size}) so no training patch reaches a test sector")
    if not 0 <= p.random_share <= 1:
        raise SpecError(f"patches.random_share must be in [0, 1], got {p.random_share}")
    if not 0 <= spec.predict.overlap < 1:
        raise SpecError(f"predict.overlap must be in [0, 1), got {spec.predict.overlap}")
    if not 1 <= spec.predict.batch_size <= 65536:
        raise SpecError(f"predict.batch_size must be in [1, 65536], got "
                        f"{spec.predict.batch_size}")
    if not 1 <= spec.train.epochs <= MAX_EPOCHS:
        raise SpecError(f"train.epochs must be in [1, {MAX_EPOCHS}], got {spec.train.epochs}")
    if not spec.features or len(set(spec.features)) != len(spec.features):
        raise SpecError("features must list each input variable once, e.g. "
                        "[red, green, blue, relief]")


@dataclass(frozen=True)
class Fold:
    """One geographic fold: its test sector ``[lo, hi)`` along x and its regions (1-D bool
    along x): ``train`` (training patches), ``val`` (early stopping), ``test``."""

    number: int
    lo: int
    hi: int
    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)
    test: np.ndarray = field(repr=False)

    def lon_range(self, x: np.ndarray) -> tuple[float, float]:
        """First and last cell centre of the test sector."""
        return float(x[self.lo]), float(x[self.hi - 1])


def geo_folds(ds: xr.Dataset, like: str, k: int, buffer: int, validation: float,
              min_width: int) -> tuple[str, str, list[Fold]]:
    """The ``k`` folds of ``ds`` along its x dim: ``(y dim, x dim, folds)``.

    The fold labels come from :func:`engine.ops.splits.geo_kfold` (periodic, with
    ``buffer``); the validation sector is the middle ``validation`` share of the training
    longitudes in periodic order, so it is as far as possible from the test sector.
    """
    from engine.ops.splits import geo_kfold

    y, x = cube_dims(ds[like]).horizontal
    n = int(ds.sizes[x])
    if k * 1 > n:
        raise SpecError(f"split.k = {k} is more than the {n} cells along {x}")
    labels = np.asarray(geo_kfold(ds[[like]], k=k, dim=x, buffer=buffer,
                                  periodic=True).values)
    folds = []
    for i in range(k):
        test = labels[i] == 0
        idx = np.flatnonzero(test)
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        order = (hi + np.arange(n)) % n            # periodic order starting after the test
        train_order = order[labels[i][order] == 1]
        if _longest_run(labels[i] == 1, n) < 2 * min_width:
            raise SpecError(
                f"fold {i}: the training longitudes hold no run of {2 * min_width} cells (a "
                f"patch for training and one for validation): use fewer folds (split.k), a "
                f"smaller split.buffer or patches.size")
        n_val = max(1, int(round(validation * len(train_order))))
        # the run of n_val cells nearest the middle that does not cross the dateline
        # (patches do not wrap around it)
        starts = [s for s in range(len(train_order) - n_val + 1)
                  if train_order[s + n_val - 1] - train_order[s] == n_val - 1]
        if not starts:
            raise SpecError(f"fold {i}: no contiguous validation sector of {n_val} cells: "
                            "use fewer folds (split.k) or a smaller split.buffer")
        middle = (len(train_order) - n_val) / 2
        start = min(starts, key=lambda s: (abs(s - middle), s))
        val = np.zeros(n, bool)
        val[train_order[start:start + n_val]] = True
        train = (labels[i] == 1) & ~val
        for what, region in (("training", train), ("validation", val)):
            if _longest_run(region, n) < min_width:
                raise SpecError(
                    f"fold {i}: the {what} longitudes hold no run of {min_width} cells (a "
                    f"patch): use fewer folds (split.k), a smaller split.buffer or "
                    f"patches.size, or another split.validation")
        folds.append(Fold(i, lo, hi, train, val, test))
    return str(y), str(x), folds


def _longest_run(mask: np.ndarray, n: int) -> int:
    best = run = 0
    for v in mask:  # not periodic: patches do not wrap around the dateline
        run = run + 1 if v else 0
        best = max(best, run)
    return best


def fold_region(ds: xr.Dataset, x: str, mask: np.ndarray) -> xr.DataArray:
    """A 1-D region along ``x`` as a lazy-friendly DataArray (broadcast by the sampler)."""
    return xr.DataArray(mask, dims=(x,), coords={x: ds[x]} if x in ds.coords else None)


def state_bytes(model: Any) -> bytes:
    from engine.ml.train import state_dict_bytes

    return state_dict_bytes(model)


def save_state(model: Any, path: str) -> None:
    """Write ``model``'s state_dict to ``path`` atomically."""
    data = state_bytes(model)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_state(model: Any, path: str) -> None:
    """Load a checkpoint this job wrote (weights only)."""
    from engine.ml.archs import load_weights

    load_weights(model, path)


def reload_folds(make: Callable[[], Any], names: Iterable[str], ctx: Any) -> list[Any]:
    """The fold models of a previous run of the same job (``ctx.previous``): ``make()``
    builds each, its checkpoint ``ctx.path(name)`` fills it, in eval mode as fit leaves a
    trained model."""
    models = []
    for name in names:
        m = make()
        load_state(m, ctx.path(name))
        m.eval()
        models.append(m)
    ctx.log(f"resuming: reusing the {len(models)} fold models in {ctx.run_dir}")
    return models


def folds_hash(models: Iterable[Any]) -> str:
    """sha256 over the per-fold model hashes (the output's ``engine_model_hash``)."""
    from engine.ml.train import model_hash

    h = hashlib.sha256()
    for m in models:
        h.update(model_hash(m).encode())
    return h.hexdigest()


def _batches(stream: Any, n_in: int, target: Callable[[np.ndarray], np.ndarray]
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for b in stream:
        yield np.ascontiguousarray(b.data[:, :n_in]), target(b.data[:, n_in:])


def count_patches(stream: Any) -> int:
    """Patches one pass of ``stream`` yields (a cached stream computes its chunks once)."""
    return sum(len(b) for b in stream)


class FoldEpochs:
    """``on_epoch`` of one fold: the runner's callback with the record's ``fold`` added."""

    def __init__(self, ctx: Any, fold: int) -> None:
        self.ctx, self.fold = ctx, fold

    def __call__(self, record: dict[str, Any]) -> None:
        self.ctx.on_epoch({**record, "fold": self.fold})


def fit_fold(model: Any, train_stream: Any, val_stream: Any, n_in: int,
             target: Callable[[np.ndarray], np.ndarray], loss: Any, train: TrainSpec,
             device: str, seed: int, on_epoch: Callable[[dict[str, Any]], None]) -> Any:
    """Train one fold's model with :func:`engine.ml.fit.fit`: shuffled epochs of the
    training patches, early stopping on the validation patches (best weights restored)."""
    from engine.ml.fit import fit

    def _train(epoch: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        train_stream.set_epoch(epoch)
        return _batches(train_stream, n_in, target)

    return fit(model, _train, loss=loss, epochs=train.epochs, lr=train.learning_rate,
               weight_decay=train.weight_decay,
               val=lambda: _batches(val_stream, n_in, target), patience=train.patience,
               device=device, seed=seed, on_epoch=on_epoch)


# -- scores ---------------------------------------------------------------------------------
def binary_scores(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | int]:
    """Accuracy, IoU, precision, recall and F1 of a binary map (document 003's Table 1).

    A score whose denominator is zero (no labelled and no predicted pixel) is NaN.

    >>> s = binary_scores(tp=8, fp=2, fn=2, tn=88)
    >>> s["iou"], s["precision"], s["f1"], s["accuracy"]
    (0.6666666666666666, 0.8, 0.8, 0.96)
    """
    def _div(a: float, b: float) -> float:
        return float(a) / float(b) if b else float("nan")

    n = tp + fp + fn + tn
    return {"accuracy": _div(tp + tn, n), "iou": _div(tp, tp + fp + fn),
            "precision": _div(tp, tp + fp), "recall": _div(tp, tp + fn),
            "f1": _div(2 * tp, 2 * tp + fp + fn), "n_pixels": int(n)}


def summary(rows: list[dict[str, Any]], keys: Iterable[str]) -> dict[str, dict[str, float]]:
    """Mean and (population) standard deviation of each key over the folds, NaN ignored."""
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows], float)
        v = v[np.isfinite(v)]
        out[k] = {"mean": float(v.mean()) if v.size else float("nan"),
                  "std": float(v.std()) if v.size else float("nan")}
    return out


def fmt(v: Any) -> str:
    """A score for a table: three decimals, ``nan`` for a missing or non-finite one."""
    return "nan" if v is None or not np.isfinite(v) else f"{v:.3f}"


def multiclass_scores(confusion: np.ndarray) -> dict[str, Any]:
    """Accuracy and macro-F1 of a confusion matrix (rows true, columns predicted); the
    macro average runs over the classes present in the truth or the predictions.

    >>> round(multiclass_scores(np.array([[3, 1], [0, 4]]))["macro_f1"], 4)
    0.873
    """
    c = np.asarray(confusion, float)
    tp = np.diag(c)
    true, pred = c.sum(1), c.sum(0)
    present = (true + pred) > 0
    f1 = np.where(present, 2 * tp / np.where(present, true + pred, 1), 0.0)
    return {"accuracy": float(tp.sum() / c.sum()) if c.sum() else float("nan"),
            "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
            "n_tiles": int(c.sum()),
            "classes_present": [int(i) for i in np.flatnonzero(present)]}


def open_patch_input(spec: Any) -> Any:
    """:func:`engine.pipelines.job.open_input`, with the command that makes a missing
    land-cover cube (``catalogs/data/landcover_<res>.zarr``) in the error."""
    import re

    from engine.errors import CatalogError
    from engine.pipelines.job import open_input

    try:
        return open_input(spec)
    except CatalogError as err:
        found = re.search(r"(\S*landcover_(\d+)p(\d+)\.zarr) does not exist", str(err))
        if not found:
            raise
        res = f"{found.group(2)}.{found.group(3)}"
        raise CatalogError(f"{err}; make the land-cover cube first: python -m "
                           f"engine.io.landcover --resolution {res} {found.group(1)}") from None


def class_names(ds: xr.Dataset, variable: str, classes: Iterable[int]) -> list[str]:
    """The names of ``classes`` in ``variable``'s CF ``flag_meanings`` (``class_<code>``
    for a code it does not name)."""
    attrs = ds[variable].attrs
    values = [int(v) for v in np.atleast_1d(attrs.get("flag_values", []))]
    names = dict(zip(values, str(attrs.get("flag_meanings", "")).split(), strict=False))
    return [names.get(c, f"class_{c}") for c in classes]


def check_cube(ds: xr.Dataset, features: list[str], label: str) -> tuple[str, str]:
    """Features and the label exist and are 2-D on the same (y, x) grid, the label holds
    integer class codes; returns the ``(y, x)`` dims."""
    missing = [v for v in [*features, label] if v not in ds.data_vars]
    if missing:
        raise CubeError(f"variables {missing} are not in the cube (it has "
                        f"{', '.join(map(str, ds.data_vars))}): fix features or label.variable")
    dims = ds[label].dims
    for v in features:
        if ds[v].dims != dims:
            raise CubeError(f"feature {v!r} has dims {ds[v].dims}, the label {label!r} "
                            f"{dims}: use variables on one 2-D grid")
    if len(dims) != 2:
        raise CubeError(f"the label {label!r} has dims {dims}: the patch kinds need a 2-D "
                        "(y, x) cube")
    if not np.issubdtype(ds[label].dtype, np.integer):
        raise CubeError(f"label.variable {label!r} is {ds[label].dtype}, not class codes: "
                        "name an integer class variable (e.g. landcover)")
    return str(dims[0]), str(dims[1])

