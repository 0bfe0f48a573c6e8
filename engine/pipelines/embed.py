"""Tile embeddings of cloud organisation (document 004; issue 12, sections 1-4).

A kind on the job interface (:mod:`engine.pipelines.job`); its job file is
:mod:`engine.pipelines._embedspec`. Data flow: open the cube (a catalog entry, or the
seeded synthetic organisation fields of :mod:`engine.testing.organisation_fields`) and
check the variables and tile sizes (``prepare``) -> time steps to train and test folds
(``split``; the last ``split.test_fraction`` of the steps, or ``split.test_steps``) -> an
embedder trained on the training steps only with :func:`engine.ml.fit.fit`: a ResNet-18
on triplets (:mod:`engine.ops.triplets`, :mod:`engine.ml.embed`), or a convolutional
autoencoder reconstructing the triplets' tiles (``model.architecture: autoencoder``); with
``embed.scale_models: per_scale`` one more model per extra scale (``train``) -> every tile
of a window grid with a stride over all steps embedded on the cluster
(:func:`engine.ml.embed_grid.embed_grid`: one task per step and band of tile rows), one row
per tile in ``embedding (tile, dim)`` with its centre ``time``/``y``/``x``, size, fold,
validity, label and simple tile statistics; k-means clusters fitted on the training steps'
tiles (``cluster (tile)``) (``predict``) -> scores of the clusters against the labels on
the test steps (NMI, ARI, silhouette, purity with bootstrap intervals that resample whole
time steps), the same for two baselines (k-means of simple tile statistics, and of the
same network untrained), and an NMI-vs-scale table over ``embed.scales`` (``evaluate``) ->
the table (``report``).

Validation triplets (early stopping) come from the training steps too, with triplet
indices no training epoch uses; the test steps are never seen before scoring.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import xarray as xr

from engine.errors import CubeError, SpecError
from engine.ml.embed_grid import STATISTICS, tile_statistics, window_grid
from engine.ops.stats import check_variables
from engine.ops.triplets import (
    TripletSampler,
    grid_spacing_km,
    tile_pixels,
    triplet_batches,
    triplet_sampler,
)
from engine.pipelines._embedspec import (
    ClusterSpec,
    EmbedGridSpec,
    EmbedInputSpec,
    EmbedModelSpec,
    EmbedSpec,
    EmbedSplitSpec,
    SyntheticInputSpec,
    TileSpec,
    TripletLossSpec,
    TripletSpec,
)
from engine.pipelines.job import Job, Prepared, Report, RunContext, Trained, open_input

__all__ = ["SyntheticInputSpec", "EmbedInputSpec", "TileSpec", "TripletSpec", "EmbedSplitSpec",
           "EmbedModelSpec", "TripletLossSpec", "EmbedGridSpec", "ClusterSpec", "EmbedSpec",
           "EmbedJob", "window_grid", "tile_statistics", "JOB"]

CHECKPOINT = "best.pt"
#: The figure of one time step: input, embeddings' principal components as RGB, clusters.
MAPS = "embedding_maps.png"
#: Ward's tree of the training tiles' embeddings, with example tiles per leaf.
DENDROGRAM = "dendrogram.png"
#: NMI (with its interval) against tile size.
SCALES = "nmi_vs_scale.png"
#: Validation triplets use indices from here on: no training epoch reaches them.
_VAL_OFFSET = 1 << 40


@dataclass(kw_only=True)
class EmbedPrepared(Prepared):
    spec: EmbedSpec
    #: (time, channel, y, x) float32, lazy.
    data: xr.DataArray
    labels: xr.DataArray | None
    dy_km: float
    dx_km: float
    tile: int
    stride: int
    #: ``data`` in memory, read once for the triplets when small (``triplets.cache_mib``).
    triplet_data: xr.DataArray | None = None

    @property
    def tiles_source(self) -> xr.DataArray:
        return self.data if self.triplet_data is None else self.triplet_data


@dataclass(frozen=True)
class TimeSplit:
    """Time-step indices of each fold (0 train, 1 test)."""

    train: list[int]
    test: list[int]

    def folds(self, n_time: int) -> np.ndarray:
        f = np.zeros(n_time, np.int8)
        f[self.test] = 1
        return f

    def attrs(self) -> dict[str, Any]:
        return {"split_method": "time_steps", "split_train": self.train,
                "split_test": self.test}


@dataclass(kw_only=True)
class EmbedTrained(Trained):
    #: Models trained per extra scale (``embed.scale_models: per_scale``), by tile px.
    scale_models: dict[int, Any] = field(default_factory=dict)


def build_model(spec: EmbedSpec, tile: int) -> Any:
    """The untrained embedder of ``spec`` for tiles of ``tile`` px."""
    from engine.ml.embed import autoencoder_embedder, tile_embedder

    m = spec.model
    if m.architecture == "autoencoder":
        return autoencoder_embedder(len(spec.variables), tile, m.dim, m.width, m.depth)
    return tile_embedder(len(spec.variables), m.dim, m.width, m.stem, m.hidden, m.dropout)


def scale_checkpoint(tile: int) -> str:
    """Checkpoint file of the model trained for tiles of ``tile`` px (``per_scale``)."""
    return f"best-{tile}px.pt"


def _open(spec: EmbedSpec) -> Prepared:
    if spec.input.synthetic is not None:
        from engine.testing.organisation_fields import organisation_fields

        s = spec.input.synthetic
        ds = organisation_fields(s.n_time, s.size, dx_km=s.dx_km, seed=s.seed)
        ds.attrs["engine_catalog"] = "synthetic:engine.testing.organisation_fields"
        ds.attrs["engine_entry"] = f"organisation_fields(n_time={s.n_time}, size={s.size}, " \
                                   f"dx_km={s.dx_km}, seed={s.seed})"
        return Prepared(spec=spec, ds=ds)
    return open_input(spec)


def prepare(spec: EmbedSpec) -> EmbedPrepared:
    """Open the cube; check variables, dims, labels and tile sizes against it."""
    from engine.dims import cube_dims

    base = _open(spec)
    ds = base.ds
    check_variables(ds, list(spec.variables), "variables")
    dims = cube_dims(ds[spec.variables[0]], spec.input.dims)
    y, x = dims.horizontal
    tdim = dims.time
    arrays = []
    for v in spec.variables:
        a = ds[v]
        if tdim not in a.dims:
            raise CubeError(f"variable {v!r} has no time dim {tdim!r}: triplets take the "
                            "distant tile from another time step")
        extra = [d for d in a.dims if d not in (tdim, y, x)]
        if extra:
            raise CubeError(f"variable {v!r} has dims {extra} besides time, {y} and {x}; "
                            "select them in the catalog entry")
        arrays.append(a.transpose(tdim, y, x))
    data = xr.concat(arrays, dim="channel").transpose(tdim, "channel", y, x)
    data = data.astype(np.float32).rename({tdim: "time", y: "y", x: "x"})
    dy, dx = grid_spacing_km(data)
    labels = None
    if spec.labels is not None:
        check_variables(ds, [spec.labels], "labels")
        lab = ds[spec.labels]
        if tdim not in lab.dims or not set(lab.dims) <= {tdim, y, x}:
            raise CubeError(f"labels {spec.labels!r} must be on (time) or (time, y, x), got "
                            f"{lab.dims}")
        labels = lab.rename({d: n for d, n in ((tdim, "time"), (y, "y"), (x, "x"))
                             if d in lab.dims})
    spacing = min(dy, dx)
    tile = tile_pixels(spec.tiles.size, spec.tiles.unit, spacing)
    stride = tile // 2 if spec.tiles.stride is None else \
        tile_pixels(spec.tiles.stride, spec.tiles.unit, spacing)
    ny, nx = data.sizes["y"], data.sizes["x"]
    if tile > min(ny, nx):
        raise SpecError(f"tiles.size {spec.tiles.size:g} {spec.tiles.unit} is {tile} px, "
                        f"larger than the grid ({ny} x {nx}): use smaller tiles")
    for s in spec.embed.scales:
        px = tile_pixels(s, spec.tiles.unit, spacing)
        if px > min(ny, nx):
            raise SpecError(f"embed.scales {s:g} {spec.tiles.unit} is {px} px, larger than "
                            f"the grid ({ny} x {nx})")
    if data.sizes["time"] < 2 and spec.triplets.distant == "other_time":
        raise CubeError("the cube has one time step: the distant tile of 'other_time' "
                        "needs two or more (use triplets.distant: min_distance)")
    if data.sizes["time"] < 2 and spec.split.test_steps != []:
        raise CubeError("the cube has one time step: a test fold needs two or more (set "
                        "split.test_steps: [] to embed and cluster it without scores)")
    m = spec.model
    if m.architecture == "autoencoder":  # every tile size must suit the bottleneck
        for px in {tile, *(tile_pixels(v, spec.tiles.unit, spacing)
                           for v in spec.embed.scales)}:
            build_model(spec, px)
    if m.weights is not None:
        # a missing or mismatched weights file is one line before anything is written
        from engine.ml.archs import load_weights

        load_weights(build_model(spec, tile), spec.resolve(m.weights))
    return EmbedPrepared(spec=spec, ds=ds, dims=dims, data=data, labels=labels, dy_km=dy,
                         dx_km=dx, tile=tile, stride=stride, input_url=base.input_url,
                         input_storage_options=base.input_storage_options)


def time_split(p: EmbedPrepared) -> TimeSplit:
    """The listed test steps, or the last ``test_fraction`` of them; the rest train."""
    n = p.data.sizes["time"]
    s = p.spec.split
    if s.test_steps is not None:
        bad = [t for t in s.test_steps if not 0 <= t < n]
        if bad or len(s.test_steps) >= n:
            raise SpecError(f"split.test_steps {bad or s.test_steps} must be step indices "
                            f"in [0, {n}) that leave a training step")
        test = sorted(set(s.test_steps))
    else:
        k = max(1, math.ceil(s.test_fraction * n))
        test = list(range(n - k, n))
    train = [t for t in range(n) if t not in test]
    if len(train) < 2 and p.spec.triplets.distant == "other_time":
        raise SpecError(f"{len(train)} training time step(s): the 'other_time' rule needs "
                        "two; hold out fewer steps")
    return TimeSplit(train=train, test=test)


def _valid_folds(p: EmbedPrepared, s: TimeSplit) -> np.ndarray:
    """Fold of every pixel (time, y, x): 0 train, 1 test, -1 where a channel is missing."""
    (ok,) = dask.compute(p.data.notnull().all("channel").data)
    f = s.folds(p.data.sizes["time"])[:, None, None]
    return np.where(np.asarray(ok), f, -1).astype(np.int8)


class EmbedJob(Job):
    """Tile embeddings (document 004) trained on triplets or as an autoencoder, clustered
    and scored."""

    name = "embed"
    summary = ("Tile2Vec embeddings (document 004): a ResNet-18 trained on triplets in km "
               "(or a convolutional autoencoder), whole-domain embeddings per tile on the "
               "cluster, k-means clusters scored against labels")
    title = "tile embeddings"
    spec = EmbedSpec

    def prepare(self, spec: EmbedSpec) -> EmbedPrepared:
        return prepare(spec)

    def split(self, prepared: EmbedPrepared) -> TimeSplit:  # type: ignore[override]
        return time_split(prepared)

    def describe(self, p: EmbedPrepared) -> str:  # type: ignore[override]
        s = time_split(p)
        return (f"{', '.join(p.spec.variables)}: {p.spec.model.architecture} embedder, "
                f"tiles {p.tile} px ({p.tile * p.dx_km:g} km), stride {p.stride} px; train "
                f"steps {len(s.train)}, test steps {s.test}; cube {dict(p.data.sizes)}")

    def _sampler(self, p: EmbedPrepared, folds: np.ndarray, tile: int) -> TripletSampler:
        """Triplets for tiles of ``tile`` px; distances in km scale with the tile."""
        t = p.spec.triplets
        k = tile / p.tile
        nb = [v * k for v in t.neighbour_km]
        return triplet_sampler(folds, tile=tile,
                               neighbour_km=float(nb[0]) if len(nb) == 1 else (nb[0], nb[1]),
                               distant=t.distant,
                               min_distance_km=None if t.min_distance_km is None
                               else t.min_distance_km * k,
                               seed=p.spec.seed, dx_km=p.dx_km, dy_km=p.dy_km)

    def _val(self, p: EmbedPrepared, sampler: TripletSampler) -> Any:
        n = p.spec.triplets.n_validation
        idx = np.arange(_VAL_OFFSET, _VAL_OFFSET + n)
        return lambda: triplet_batches(p.tiles_source, sampler, idx, fold=0,
                                       batch_size=p.spec.train.batch_size, augment=False)

    def _fit_one(self, p: EmbedPrepared, sampler: TripletSampler, tile: int,
                 stats: tuple[list[float], list[float]], ctx: RunContext,
                 checkpoint: str) -> tuple[Any, dict[str, Any]]:
        """Train a fresh embedder for tiles of ``tile`` px; save it as ``checkpoint``."""
        from engine.ml.archs import load_weights
        from engine.ml.embed import (
            Reconstruction,
            reconstruction_loss,
            save_weights,
            triplet_loss,
        )
        from engine.ml.fit import fit
        from engine.ml.train import seed_everything

        spec = p.spec
        m, t, tr = spec.model, spec.train, spec.triplets
        seed_everything(spec.seed)
        model = build_model(spec, tile)
        model.set_statistics(*stats)
        if m.weights and tile == p.tile:
            load_weights(model, spec.resolve(m.weights))
        ctx.log(f"training the {m.architecture} embedder on {sampler.n_positions(0):,} "
                f"positions of {tile} px tiles; "
                f"{sum(q.numel() for q in model.parameters()):,} weights")

        def batches(epoch: int) -> Any:
            idx = np.arange(epoch * tr.n_train, (epoch + 1) * tr.n_train)
            return triplet_batches(p.tiles_source, sampler, idx, fold=0,
                                   batch_size=t.batch_size, augment=tr.augment, epoch=epoch)

        auto = m.architecture == "autoencoder"
        # the autoencoder reconstructs each of a triplet's three tiles (all training tiles)
        net, loss = ((Reconstruction(model), reconstruction_loss) if auto else
                     (model, triplet_loss(spec.loss.margin, spec.loss.distance)))
        res = fit(net, batches, loss=loss, epochs=t.epochs, lr=t.learning_rate,
                  weight_decay=t.weight_decay, val=self._val(p, sampler),
                  patience=t.patience, device="auto", seed=spec.seed, on_epoch=ctx.on_epoch)
        # fit trains ``net`` in place (best weights restored): ``model`` is inside it
        save_weights(model, ctx.path(checkpoint))
        placed = sampler.sample(np.arange(_VAL_OFFSET, _VAL_OFFSET + tr.n_validation), 0)
        info = {"seconds": res.seconds, "samples_per_s": res.samples_per_s,
                "triplets_seen": res.samples, "best_epoch": res.best_epoch,
                "epochs_run": len(res.history), "stopped_early": res.stopped_early,
                "objective": "reconstruction" if auto else "triplet",
                "tile_px": tile, "tile_km": [tile * p.dy_km, tile * p.dx_km],
                "neighbour_km_mean": float(placed.neighbour_km.mean()),
                "neighbour_overlap_mean": float(placed.overlap.mean()),
                "history": res.history}
        return model, info

    def _scale_tiles(self, p: EmbedPrepared) -> list[int]:
        """Tile sizes (px) of the extra scales that get their own model."""
        spec = p.spec
        if spec.embed.scale_models != "per_scale":
            return []
        px = {tile_pixels(v, spec.tiles.unit, min(p.dy_km, p.dx_km))
              for v in spec.embed.scales}
        return sorted(px - {p.tile})

    def train(self, p: EmbedPrepared, s: TimeSplit,  # type: ignore[override]
              ctx: RunContext) -> EmbedTrained:
        from engine.ml.embed import models_hash, triplet_accuracy
        from engine.ml.train import load_checkpoint

        spec = p.spec
        if p.data.nbytes <= spec.triplets.cache_mib * 2**20:
            ctx.log(f"reading the cube ({p.data.nbytes / 2**20:.1f} MiB) into memory for "
                    "the triplets")
            p.triplet_data = p.data.copy(data=np.asarray(p.data.data))
        folds = _valid_folds(p, s)
        sampler = self._sampler(p, folds, p.tile)
        scale_tiles = self._scale_tiles(p)
        names = [CHECKPOINT, *(scale_checkpoint(px) for px in scale_tiles)]
        scale_models: dict[int, Any] = {}
        if ctx.previous is not None:
            ctx.log(f"resuming: reusing the trained embedder(s) in {', '.join(names)}")
            model = build_model(spec, p.tile)
            load_checkpoint(model, ctx.path(CHECKPOINT))
            for px in scale_tiles:
                scale_models[px] = build_model(spec, px)
                load_checkpoint(scale_models[px], ctx.path(scale_checkpoint(px)))
            info, fresh = ctx.previous, False
        else:
            train_data = p.data.isel(time=s.train)
            mean, std = dask.compute(train_data.mean(["time", "y", "x"]),
                                     train_data.std(["time", "y", "x"]))
            stats = ([float(v) for v in mean], [float(v) for v in std])
            model, info = self._fit_one(p, sampler, p.tile, stats, ctx, CHECKPOINT)
            per_scale = []
            for px in scale_tiles:
                scale_models[px], sub = self._fit_one(p, self._sampler(p, folds, px), px,
                                                      stats, ctx, scale_checkpoint(px))
                per_scale.append({k: v for k, v in sub.items() if k != "history"})
            if per_scale:
                info["scale_models"] = per_scale
            fresh = True
        acc, n = triplet_accuracy(model, self._val(p, sampler)(), "auto", spec.loss.distance)
        info = {**info, "validation_triplet_accuracy": acc, "validation_triplets": n}
        for m in (model, *scale_models.values()):
            m.to("cpu").eval()
        digest = models_hash([model, *(scale_models[px] for px in scale_tiles)])
        return EmbedTrained(model=model, info=info, model_hash=digest, checkpoints=names,
                            fresh=fresh, scale_models=scale_models)

    def _embed_grid(self, p: EmbedPrepared, model: Any, tile: int,
                    stride: int) -> xr.Dataset:
        """Every window of the grid at every time step, embedded on the cluster and kept
        there (persisted): ``embedding``, ``tile_statistics``, ``valid`` on ``tile``."""
        from engine.ml.embed_grid import embed_grid

        spec = p.spec
        g = embed_grid(p.data, model, tile=tile, stride=stride,
                       batch_size=spec.embed.batch_size, device="auto",
                       threshold=spec.cluster.cloud_threshold,
                       band_bytes=int(spec.embed.band_mib * 2**20))
        return g.persist()

    def _tile_labels(self, p: EmbedPrepared, g: Any, tile: int) -> np.ndarray | None:
        """The label of each tile of ``g`` (``time_index``/``y0``/``x0``): the step's
        label, or the majority of a pixel label grid over the tile (ties to the lower
        code; -1 where the tile has no label)."""
        if p.labels is None:
            return None
        t, y0, x0 = (np.asarray(g[k]) for k in ("time_index", "y0", "x0"))
        if p.labels.ndim == 1:
            (lab,) = dask.compute(p.labels.data)
            return np.asarray(lab)[t].astype(np.int32)
        out = np.full(len(t), -1, np.int32)
        for step in np.unique(t):
            rows = np.flatnonzero(t == step)
            (grid,) = dask.compute(p.labels.isel(time=int(step)).data)
            grid = np.asarray(grid)
            ok = np.isfinite(grid) if grid.dtype.kind == "f" else np.ones(grid.shape, bool)
            codes = np.where(ok, grid, 0).astype(np.int64)
            win = np.lib.stride_tricks.sliding_window_view(codes, (tile, tile))
            okw = np.lib.stride_tricks.sliding_window_view(ok, (tile, tile))
            w = win[y0[rows], x0[rows]].reshape(len(rows), -1)
            v = okw[y0[rows], x0[rows]].reshape(len(rows), -1)
            classes = np.unique(codes[ok])
            if classes.size == 0:
                continue
            counts = np.stack([((w == c) & v).sum(1) for c in classes], 1)
            out[rows] = np.where(counts.max(1) > 0, classes[counts.argmax(1)], -1)
        return out

    def _k(self, p: EmbedPrepared, labels: np.ndarray | None) -> int:
        if p.spec.cluster.k is not None:
            return p.spec.cluster.k
        return int(len(np.unique(labels[labels >= 0]))) if labels is not None else 4

    def _fit_rows(self, g: xr.Dataset, fit_rows: np.ndarray, seed: int,
                  max_fit: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings of ``fit_rows`` in memory (a seeded subsample of ``max_fit`` rows
        where there are more: mini-batch k-means needs no more), and their row numbers."""
        if fit_rows.size > max_fit:
            rng = np.random.default_rng([seed, 7])
            fit_rows = np.sort(rng.choice(fit_rows, max_fit, replace=False))
        return np.asarray(g["embedding"].data[fit_rows].compute()), fit_rows

    def _clusters(self, g: xr.Dataset, fit_rows: np.ndarray, k: int, seed: int,
                  fitted: tuple[np.ndarray, np.ndarray] | None = None) -> Any:
        """k-means fitted on ``fit_rows`` of ``g``'s embeddings (``fitted``: those rows
        already read by :meth:`_fit_rows`) and the nearest centre of every valid tile (-1
        elsewhere), lazily over the persisted embeddings."""
        from engine.ml.cluster import kmeans

        x, _ = fitted or self._fit_rows(g, fit_rows, seed)
        centers = kmeans(x, k, seed=seed).centers.astype(np.float32)
        return g["embedding"].data.map_blocks(_nearest, centers, drop_axis=1, dtype=np.int32)

    def _ward(self, p: EmbedPrepared, g: xr.Dataset, fitted: tuple[np.ndarray, np.ndarray],
              k: int, ctx: RunContext) -> Any:
        """Ward clusters (same k) of a subsample of the training tiles ``fitted`` (from
        :meth:`_fit_rows`), every valid tile by nearest centroid; the dendrogram with
        example tiles per leaf drawn in the run folder."""
        from engine.ml.cluster import dendrogram_plot, ward
        from engine.ops.triplets import read_tiles

        spec = p.spec
        x, rows = fitted
        w = ward(x, k, subsample=spec.cluster.ward_subsample, seed=spec.seed)
        labels = g["embedding"].data.map_blocks(_nearest, w.centroids.astype(np.float32),
                                                drop_axis=1, dtype=np.int32)
        try:
            t, y0, x0 = (np.asarray(g[c].values) for c in ("time_index", "y0", "x0"))
            examples = {}
            for j in range(k):
                pick = rows[w.sample_index[w.sample_labels == j][:3]]
                tiles = read_tiles(p.tiles_source, t[pick], y0[pick], x0[pick], p.tile)
                examples[j] = list(tiles[:, 0])
            fig = dendrogram_plot(w.linkage, k, examples, path=ctx.path(DENDROGRAM))
            import matplotlib.pyplot as plt

            plt.close(fig)
        except Exception as e:  # a figure is never worth a failed run
            ctx.log(f"no {DENDROGRAM}: {type(e).__name__}: {e}")
        return labels

    def predict(self, p: EmbedPrepared, s: TimeSplit,  # type: ignore[override]
                trained: EmbedTrained, ctx: RunContext) -> xr.Dataset:
        spec = p.spec
        g = self._embed_grid(p, trained.model, p.tile, p.stride)
        valid = np.asarray(g["valid"].values)
        t = np.asarray(g["time_index"].values)
        y0, x0 = np.asarray(g["y0"].values), np.asarray(g["x0"].values)
        labels = self._tile_labels(p, g, p.tile)
        fold = s.folds(p.data.sizes["time"])[t]
        k = self._k(p, labels)
        fit_rows = np.flatnonzero(valid & (fold == 0))
        if fit_rows.size < k:
            raise CubeError(f"{fit_rows.size} complete tiles in the training steps, fewer "
                            f"than cluster.k={k}: use smaller tiles or fewer clusters")
        fitted = self._fit_rows(g, fit_rows, spec.seed)  # read once for both clusterings
        cluster = self._clusters(g, fit_rows, k, spec.seed, fitted)
        ward = (self._ward(p, g, fitted, k, ctx) if spec.cluster.ward_subsample else None)
        yv, xv = p.data["y"].values, p.data["x"].values
        yc = 0.5 * (yv[y0] + yv[y0 + p.tile - 1])  # centre of the first and last
        xc = 0.5 * (xv[x0] + xv[x0 + p.tile - 1])  # pixel centres of the tile
        size_km = [p.tile * p.dy_km, p.tile * p.dx_km]
        ycoord, xcoord = p.data["y"].attrs, p.data["x"].attrs
        kind = ("tile2vec-resnet18" if spec.model.architecture == "resnet18"
                else "autoencoder")
        out = xr.Dataset(
            {"embedding": (("tile", "dim"), g["embedding"].data,
                           {"long_name": f"tile embedding ({kind}); NaN where the tile "
                                         "misses a value", "units": "1"}),
             "cluster": ("tile", cluster,
                         {"long_name": f"k-means cluster of the embedding (k={k}, fitted on "
                                       "the training steps' tiles); -1: no embedding"}),
             "valid": ("tile", valid.astype(np.int8),
                       {"long_name": "the tile has every value of every variable",
                        "flag_values": [0, 1], "flag_meanings": "incomplete complete"}),
             "fold": ("tile", fold.astype(np.int8),
                      {"long_name": "fold of the tile's time step", "flag_values": [0, 1],
                       "flag_meanings": "train test"}),
             "tile_statistics": (("tile", "statistic"), g["tile_statistics"].data,
                                 {"long_name": "mean, standard deviation and cloud fraction "
                                               "of the tile's first variable",
                                  "statistics": " ".join(STATISTICS)})},
            coords={"time": ("tile", p.data["time"].values[t]),
                    "y": ("tile", yc, {**ycoord, "long_name": "tile centre y"}),
                    "x": ("tile", xc, {**xcoord, "long_name": "tile centre x"}),
                    "time_index": ("tile", t.astype(np.int32)),
                    "y0": ("tile", y0.astype(np.int32),
                           {"long_name": "first row of the tile (pixel index)"}),
                    "x0": ("tile", x0.astype(np.int32),
                           {"long_name": "first column of the tile (pixel index)"}),
                    "tile_height": ("tile", np.full(len(yc), size_km[0], np.float32),
                                    {"units": "km", "long_name": "tile size along y",
                                     "pixels": p.tile}),
                    "tile_width": ("tile", np.full(len(xc), size_km[1], np.float32),
                                   {"units": "km", "long_name": "tile size along x",
                                    "pixels": p.tile})})
        if ward is not None:
            out["cluster_ward"] = xr.DataArray(
                ward, dims="tile",
                attrs={"long_name": f"Ward cluster of the embedding (k={k}, on a subsample "
                                    "of the training steps' tiles, the rest by nearest "
                                    "centroid); -1: no embedding"})
        if labels is not None:
            out["label"] = xr.DataArray(labels, dims="tile",
                                        attrs={"long_name": f"{spec.labels} of the tile "
                                                            "(majority over its pixels); -1: "
                                                            "none"})
        out = out.chunk({"tile": 8192})
        out.attrs.update({"engine_split": json.dumps(s.attrs()),
                          "engine_tile_px": p.tile, "engine_stride_px": p.stride,
                          "engine_variables": json.dumps(list(spec.variables)),
                          "engine_model_kind": kind})
        return out

    def _score(self, lab: np.ndarray, pred: np.ndarray, emb: np.ndarray, test: np.ndarray,
               groups: np.ndarray, spec: EmbedSpec) -> dict[str, Any]:
        """Scores on the ``test`` rows; the bootstrap resamples whole time steps (tiles of
        one step are correlated)."""
        from engine.ml.cluster import scores

        return scores(lab[test], pred[test], emb[test], n_boot=spec.cluster.n_boot,
                      seed=spec.seed, groups=groups[test])

    def evaluate(self, p: EmbedPrepared, s: TimeSplit,  # type: ignore[override]
                 trained: EmbedTrained, written: xr.Dataset,
                 ctx: RunContext) -> dict[str, Any]:
        from engine.ml.cluster import kmeans

        spec = p.spec
        kind = written.attrs.get("engine_model_kind", spec.model.architecture)
        out: dict[str, Any] = {
            "job": spec.name, "model_kind": kind,
            "model_hash": trained.model_hash, "split": s.attrs(),
            "tiles": int(written.sizes["tile"]), "tile_px": p.tile, "stride_px": p.stride,
            "tile_km": [p.tile * p.dy_km, p.tile * p.dx_km],
            "training": {k: v for k, v in trained.info.items() if k != "history"},
        }
        try:
            _maps_plot(p, s, written, ctx.path(MAPS))
            out["maps"] = MAPS
        except Exception as e:  # a figure is never worth a failed run
            ctx.log(f"no {MAPS}: {type(e).__name__}: {e}")
        if "label" not in written or not s.test:
            out["scores"] = None
            out["scores_reason"] = ("no label variable" if "label" not in written else
                                    "split.test_steps is empty: nothing is held out")
            return out
        w = written[["fold", "label", "valid", "cluster", "tile_statistics", "time_index",
                     *(["cluster_ward"] if "cluster_ward" in written else [])]].compute()
        fold, lab, t = w["fold"].values, w["label"].values, w["time_index"].values
        valid = w["valid"].values.astype(bool)
        out["incomplete_tiles"] = int((~valid).sum())
        test = (fold == 1) & (lab >= 0) & valid
        rows = np.flatnonzero(test)
        emb = np.zeros((len(fold), written.sizes["dim"]), np.float32)
        emb[rows] = written["embedding"].data[rows].compute()
        k = self._k(p, lab)
        out["k"] = k
        out["scores"] = {"embedding_kmeans": self._score(lab, w["cluster"].values, emb,
                                                         test, t, spec)}
        if "cluster_ward" in w:
            out["scores"]["embedding_ward"] = self._score(lab, w["cluster_ward"].values, emb,
                                                          test, t, spec)
        # baseline: the same k-means on standardised tile statistics (no network)
        st = w["tile_statistics"].values
        fit = valid & (fold == 0)
        sd = st[fit].std(0)
        z = np.where(valid[:, None], (st - st[fit].mean(0)) / np.where(sd > 0, sd, 1.0), 0)
        km = kmeans(z[fit], k, seed=spec.seed)
        out["scores"]["tile_statistics_kmeans"] = self._score(lab, _nearest(z, km.centers),
                                                              z, test, t, spec)
        # baseline: the same network untrained (its seed's initial weights, the trained
        # model's standardisation): what the training adds
        g = self._embed_grid(p, self._untrained(p, trained.model, p.tile), p.tile, p.stride)
        pred = self._clusters(g, np.flatnonzero(fit), k, spec.seed).compute()
        ge = np.zeros_like(emb)
        ge[rows] = g["embedding"].data[rows].compute()
        out["scores"]["untrained_network_kmeans"] = self._score(lab, pred, ge, test, t, spec)
        out["score_rows"] = ("complete tiles of the test time steps; intervals resample "
                             "whole time steps")
        out["baseline_definition"] = {
            "tile_statistics_kmeans": "k-means (same k, fitted on the training steps) on the "
                                      "standardised mean, standard deviation and cloud "
                                      "fraction of each tile",
            "untrained_network_kmeans": "the same embedder with its initial (seeded) weights "
                                        "and the trained standardisation, clustered the same "
                                        "way"}
        if spec.embed.scales:
            out["nmi_vs_scale"] = scale_rows = self._scales(p, s, trained, k,
                                                            out["scores"]["embedding_kmeans"])
            try:
                from engine.ml.cluster import nmi_vs_scale_plot

                table = [{"scale": r["size"], "nmi": r["nmi"],
                          "nmi_low": (r.get("nmi_ci") or [None, None])[0],
                          "nmi_high": (r.get("nmi_ci") or [None, None])[1]}
                         for r in scale_rows if r["nmi"] is not None]
                fig = nmi_vs_scale_plot(table, spec.tiles.unit, path=ctx.path(SCALES))
                import matplotlib.pyplot as plt

                plt.close(fig)
            except Exception as e:  # a figure is never worth a failed run
                ctx.log(f"no {SCALES}: {type(e).__name__}: {e}")
        return out

    def _untrained(self, p: EmbedPrepared, model: Any, tile: int) -> Any:
        from engine.ml.train import seed_everything

        seed_everything(p.spec.seed)
        net = build_model(p.spec, tile)
        net.set_statistics(model.mean.ravel().tolist(), model.std.ravel().tolist())
        return net.eval()

    def _scales(self, p: EmbedPrepared, s: TimeSplit, trained: EmbedTrained, k: int,
                main: dict[str, Any]) -> list[dict[str, Any]]:
        """The NMI-vs-scale rows; the job's own tile size on its own grid is ``main`` (the
        scores of the stored clusters), not embedded and clustered again."""
        spec = p.spec
        rows = []
        keys = ("nmi", "nmi_ci", "ari", "ari_ci", "silhouette", "silhouette_ci")
        sizes = sorted({float(spec.tiles.size), *map(float, spec.embed.scales)})
        for size in sizes:
            tile = tile_pixels(size, spec.tiles.unit, min(p.dy_km, p.dx_km))
            if tile == p.tile and max(1, tile // 2) == p.stride:
                rows.append({"size": size, "unit": spec.tiles.unit, "tile_px": tile,
                             "tile_km": tile * min(p.dy_km, p.dx_km), "tiles": main["n"],
                             "model": "trained at this size", "trained_size": True,
                             **{key: main[key] for key in keys}})
                continue
            model = trained.scale_models.get(tile, trained.model)
            g = self._embed_grid(p, model, tile, max(1, tile // 2))
            lab = self._tile_labels(p, g, tile)
            assert lab is not None
            t = np.asarray(g["time_index"].values)
            valid = np.asarray(g["valid"].values)
            fold = s.folds(p.data.sizes["time"])[t]
            fit = np.flatnonzero(valid & (fold == 0))
            test = (fold == 1) & (lab >= 0) & valid
            row = {"size": size, "unit": spec.tiles.unit, "tile_px": tile,
                   "tile_km": tile * min(p.dy_km, p.dx_km), "tiles": int(test.sum()),
                   "model": ("trained at this size" if tile == p.tile or
                             tile in trained.scale_models else
                             f"trained at {p.tile} px")}
            if fit.size < k or test.sum() < 2:
                rows.append({**row, "nmi": None, "reason": "too few complete tiles"})
                continue
            pred = self._clusters(g, fit, k, spec.seed).compute()
            emb = np.zeros((len(t), g.sizes["dim"]), np.float32)
            emb[np.flatnonzero(test)] = g["embedding"].data[np.flatnonzero(test)].compute()
            sc = self._score(lab, pred, emb, test, t, spec)
            rows.append({**row, "trained_size": tile == p.tile,
                         **{key: sc[key] for key in keys}})
        return rows

    def report(self, p: EmbedPrepared, s: TimeSplit,  # type: ignore[override]
               trained: EmbedTrained, metrics: dict[str, Any], written: xr.Dataset,
               ctx: RunContext) -> Report:
        def ci(v: dict[str, Any], key: str) -> str:
            if v.get(key) is None:
                return "-"
            if v.get(f"{key}_ci") is None or None in v[f"{key}_ci"]:
                return f"{v[key]:.3f}"
            lo, hi = v[f"{key}_ci"]
            return f"{v[key]:.3f} [{lo:.3f}, {hi:.3f}]"

        rows = []
        for name, v in (metrics.get("scores") or {}).items():
            rows.append([name, ci(v, "nmi"), ci(v, "ari"), ci(v, "silhouette")])
        notes = [f"{metrics['tiles']:,} tiles of {p.tile} px "
                 f"({p.tile * p.dx_km:g} km), {p.spec.model.architecture} embedder; "
                 f"validation triplet accuracy "
                 f"{trained.info['validation_triplet_accuracy']:.3f}"]
        for r in metrics.get("nmi_vs_scale", []):
            notes.append(f"scale {r['size']:g} {r['unit']} ({r['tile_px']} px, model "
                         f"{r['model']}): NMI {ci(r, 'nmi')}, {r['tiles']} test tiles")
        summary: dict[str, Any] = {}
        if metrics.get("scores"):
            e = metrics["scores"]["embedding_kmeans"]
            summary = {"nmi": e["nmi"], "ari": e["ari"], "silhouette": e["silhouette"]}
        files = {"checkpoint": ctx.path(CHECKPOINT)}
        if metrics.get("maps"):
            files["maps"] = ctx.path(metrics["maps"])
        for key, name in (("dendrogram", DENDROGRAM), ("nmi_vs_scale", SCALES)):
            if os.path.exists(ctx.path(name)):
                files[key] = ctx.path(name)
        files.update({f"checkpoint_{px}px": ctx.path(scale_checkpoint(px))
                      for px in self._scale_tiles(p)})
        return Report(title=f"{p.spec.name}: clusters vs labels on test steps {s.test}",
                      columns=["clusters", "NMI [95% CI]", "ARI [95% CI]",
                               "silhouette [95% CI]"],
                      rows=rows, notes=notes, files=files, summary=summary)


def _maps_plot(p: EmbedPrepared, s: TimeSplit, written: xr.Dataset, path: str) -> None:
    """One time step (the first test step, else the last): its first variable, its tiles'
    first three principal components of the embedding as RGB, and its clusters, on the
    tile grid (each tile drawn at its centre)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from engine.ml.cluster import pca

    step = s.test[0] if s.test else p.data.sizes["time"] - 1
    ys = window_grid(p.data.sizes["y"], p.tile, p.stride)
    xs = window_grid(p.data.sizes["x"], p.tile, p.stride)
    n = ys.size * xs.size
    rows = slice(step * n, (step + 1) * n)  # the tile dim is time-major
    part = written.isel(tile=rows)[["embedding", "valid", "cluster"]].compute()
    emb, ok = part["embedding"].values, part["valid"].values.astype(bool)
    rgb = np.full((n, 3), np.nan)
    if ok.sum() >= 4:
        r = pca(emb[ok], min(3, emb.shape[1]))
        z = r.transform(emb[ok])
        lo, hi = np.percentile(z, 2, axis=0), np.percentile(z, 98, axis=0)
        rgb[ok, :z.shape[1]] = np.clip((z - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1)
        rgb[ok, z.shape[1]:] = 0.5
    cl = np.where(ok, part["cluster"].values, -1).astype(float)
    cl[cl < 0] = np.nan
    yv, xv = p.data["y"].values, p.data["x"].values
    yc, xc = part["y"].values.reshape(ys.size, xs.size), part["x"].values.reshape(ys.size,
                                                                                    xs.size)
    field = np.asarray(p.data.isel(time=step, channel=0).values)
    fig, ax = plt.subplots(1, 3, figsize=(15, 5))
    ax[0].imshow(field, extent=(xv[0], xv[-1], yv[-1], yv[0]), cmap="gray", aspect="auto")
    ax[0].set_title(f"{p.spec.variables[0]}, step {step}")
    ext = (xc[0, 0], xc[0, -1], yc[-1, 0], yc[0, 0])
    ax[1].imshow(np.nan_to_num(rgb.reshape(ys.size, xs.size, 3), nan=1.0), extent=ext,
                 aspect="auto")
    ax[1].set_title("embedding: first 3 principal components as RGB")
    ax[2].imshow(cl.reshape(ys.size, xs.size), extent=ext, cmap="tab10", aspect="auto",
                 interpolation="nearest")
    ax[2].set_title("k-means cluster")
    for a in ax:  # row 0 on top, as imshow's extents above put it
        a.set_xlim(xv[0], xv[-1])
        a.set_ylim(yv[-1], yv[0])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each row; -1 for a row with a NaN."""
    d = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    out = d.argmin(1).astype(np.int32)
    out[~np.isfinite(x).all(1)] = -1
    return out


JOB = EmbedJob().as_kind()
