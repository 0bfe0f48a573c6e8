"""Tile2Vec embeddings of cloud organisation: the engine's ``embed`` job vs convml-tt on the
same inputs (issue 12).

Data and task
    The job ``jobs/embed-clouds.yaml``: the seeded synthetic organisation fields
    (``engine.testing.organisation_fields``, 16 steps of 128 x 128 px at 2 km, one class
    per step: sugar, flower, fish, gravel), tiles of 64 km = 32 px, the first 12 steps
    train, the last 4 test. Both methods embed **the same grid of tiles** (every 32 px
    window at a stride of 16 px, all 16 steps, 49 per step), fit k-means (k = 4, the
    engine's :func:`engine.ml.cluster.kmeans`, seed 0) on the training steps' tiles and
    are scored by :func:`engine.ml.cluster.scores` against the class of each tile on the
    test steps (NMI, ARI, silhouette; bootstrap 95 % intervals resampling whole time steps
    when the engine's run does so), exactly as ``engine/pipelines/embed.py`` does.

Methods
``engine``
    The job as shipped (``scales: [32, 96]`` and ``n_boot: 200`` included), run by the
    registry's ``embed`` kind on a ``connect("threads")`` cluster with the output in a
    temporary directory: triplets cut from the in-memory cube (new ones every epoch), a
    ResNet-18 of width 16 trained with early stopping (best epoch kept), the grid embedded,
    clustered, written to Zarr and scored, plus the job's own baselines (tile statistics,
    the untrained network, NMI vs scale). Wall time covers all of that.
``convml-tt``
    convml-tt's documented library path, fed the same triplets: the engine's
    :func:`engine.ops.triplets.triplet_sampler` places the training triplets of the job's
    first epoch (``n_train``) and its validation triplets (``n_validation``: neighbour
    24-40 km away, distant tile from another training step), which are written as
    convml-tt's on-disk layout ``train/{id:05d}_{anchor|neighbor|distant}.png``; each
    8-bit RGB PNG holds the ``cloud`` channel three times (convml-tt reads RGB PNGs only),
    quantised linearly over the training steps' range. ``TripletTrainerDataModule`` (its
    ``random_split`` with the validation share of the job) and ``TripletTrainerModel``
    (torchvision ``resnet18``, head ``orig_fastai``, 100 dims, margin and learning rate of
    the job, weight decay 0 like the job) are trained by ``pytorch_lightning.Trainer`` for
    the job's epochs and batch size on the CPU, seeded with ``pl.seed_everything``. The 16
    whole steps are written as scene PNGs and embedded with
    ``MovingWindowImageTilingDataset(step=16, N_tile=32)`` and
    ``convml_tt.utils.get_embeddings``. Wall time covers writing the PNGs, training,
    embedding, clustering and scoring.
``convml-tt, no colour jitter`` (reference, not in the ratios; ``small`` and ``large``)
    The same with convml-tt's own ``get_train_augmentation_transforms(p_lighting=0.0)``:
    its training transform normalises for ImageNet first and applies kornia's
    ``ColorJitter`` (p = 0.75) after, which clamps the normalised tile to [0, 1], so three
    tiles in four train with every pixel darker than about 0.45 set to one value. This run
    isolates what that does.

What convml-tt cannot match (recorded in ``differences`` of the JSON): one fixed set of
triplets reused every epoch (the engine draws new ones), no early stopping (the last epoch
is kept), squared L2 in the loss (the job: L2), ImageNet normalisation and kornia
flips/affine/perspective/colour jitter (the job: training-set standardisation and the eight
dihedral flips/rotations), the full-width ResNet-18 (64 channels; the job: 16), 8-bit PNG
inputs, no label scores (NMI, ARI, silhouette come from the engine's ``scores``). Broken
peer steps are measured, not patched: an exception is recorded in ``broken``.

Ratios (> 1: the engine is better): ``wall_vs_convml`` = t_convml / t_engine (the engine
does more in its wall: Zarr write, two baselines and two more tile sizes);
``train_triplets_per_s_vs_convml``; ``nmi_engine_over_convml``. The NMI, ARI and
silhouette differences (engine - convml-tt) are under ``differences``. Single runs.
Sizes: ``tiny`` = 64 + 32 triplets, 1 epoch, no extra scales, 20 bootstrap resamples;
``small`` = the job's triplets, model and scores with 3 epochs and no extra scales, and
the no-colour-jitter reference (about 35 minutes on 2 shared cores: convml-tt's ResNet-18
has 16 times the job's weights);
``default`` = the job as shipped (it has one size); ``large`` = the same plus the
no-colour-jitter reference (a second convml-tt training).

convml-tt is not a dependency of the engine (it pins ``torch<2.6``, ``numpy<2`` and
``pytorch-lightning<2``): without it the benchmark is skipped with the reason. It runs from
a separate virtual environment with the engine on ``PYTHONPATH`` (benchmarks/README.md,
"convml-tt"):

.. code-block:: bash

    python3 -m venv /tmp/convml-venv
    printf 'torch==2.13.0\\ntorchvision==0.28.0\\nnumpy<2.0\\npytorch-lightning<2.0\\nzarr>=3\\n' \\
        > /tmp/convml-constraints.txt
    /tmp/convml-venv/bin/pip install torch==2.13.0
    /tmp/convml-venv/bin/pip install --no-deps convml-tt==0.14.3
    /tmp/convml-venv/bin/pip install -c /tmp/convml-constraints.txt torchvision==0.28.0 \\
        'pytorch-lightning>=1.2,<2.0' 'kornia>=0.5' xarray netCDF4 matplotlib scikit-learn \\
        seaborn parse scikit-image 'antialiased-cnns>=0.3' semver statsmodels 'numpy<2.0' \\
        'setuptools<82' requests psutil pytest 'dask[array]' distributed 'zarr>=3.0.8' \\
        fsspec 'intake>=2.0.7' 'xbatcher>=0.4' rich pyyaml bokeh pillow
    PYTHONPATH=. /tmp/convml-venv/bin/python -m benchmarks.compare_convml [tiny|small|default]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import inspect
import io
import json
import logging
import os
import tempfile
import time
import unittest
import warnings
from typing import Any

import numpy as np

from benchmarks._common import RESULTS, PeakRSS, machine, na

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = "jobs/embed-clouds.yaml"
#: Triplet indices of the engine's validation set (engine.pipelines.embed: no training
#: epoch reaches them).
VAL_OFFSET = 1 << 40
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_train": 64, "n_validation": 32, "epochs": 1, "scales": [], "n_boot": 20,
             "reference": False},
    "small": {"n_train": None, "n_validation": None, "epochs": 3, "scales": [],
              "n_boot": None, "reference": True},
    "default": {"n_train": None, "n_validation": None, "epochs": None, "scales": None,
                "n_boot": None, "reference": False},
    "large": {"n_train": None, "n_validation": None, "epochs": None, "scales": None,
              "n_boot": None, "reference": True},
}
_INSTALL = ("install it in a separate venv (it pins torch<2.6, numpy<2, pytorch-lightning<2): "
            "see benchmarks/README.md, section convml-tt")


def _torchvision_without_ops() -> str | None:
    """Let a torchvision whose C++ ops cannot load be imported (PyPI's Linux torchvision
    0.28 is a CUDA build; beside the CPU torch its ``_C.so`` finds no ``libtorch_cuda``).

    torchvision 0.28 registers fake kernels for ``torchvision::nms`` and ``qnms`` at import
    without checking that its ops loaded; with their schemas defined here the import works.
    convml-tt uses only torchvision's Python models and transforms, none of its ops.
    Returns why the ops did not load, or None when they did (then nothing is changed)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    so = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(so)
        return None
    except (OSError, RuntimeError) as err:
        why = f"{type(err).__name__}: {err}"
    global _TV_LIB
    if _TV_LIB is None:
        _TV_LIB = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TV_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return why


_TV_LIB: Any = None


def _convml() -> dict[str, Any]:
    """convml-tt's pieces, or :class:`unittest.SkipTest` with the reason (pytest reports a
    skip; :func:`main` prints it)."""
    if importlib.util.find_spec("convml_tt") is None:
        raise unittest.SkipTest(f"convml_tt is not importable in this environment: {_INSTALL}")
    try:
        tv_ops = _torchvision_without_ops()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import convml_tt  # type: ignore[import-not-found]
            import pytorch_lightning as pl  # type: ignore[import-not-found]
            from convml_tt.data.dataset import (  # type: ignore[import-not-found]
                MovingWindowImageTilingDataset,
            )
            from convml_tt.data.transforms import (  # type: ignore[import-not-found]
                get_backbone_normalization_transforms,
                get_train_augmentation_transforms,
                get_transforms,
            )
            from convml_tt.system import (  # type: ignore[import-not-found]
                TripletTrainerDataModule,
                TripletTrainerModel,
            )
            from convml_tt.utils import get_embeddings  # type: ignore[import-not-found]
    except Exception as err:  # an old pin that no longer imports is a skip with its reason
        raise unittest.SkipTest(f"convml_tt does not import ({type(err).__name__}: {err}); "
                                f"{_INSTALL}") from None
    versions = {}
    for name in ("convml-tt", "pytorch-lightning", "kornia", "torchvision", "torch", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"pl": pl, "Model": TripletTrainerModel, "DataModule": TripletTrainerDataModule,
            "Tiling": MovingWindowImageTilingDataset, "get_embeddings": get_embeddings,
            "get_transforms": get_transforms, "augmentations": get_train_augmentation_transforms,
            "normalization": get_backbone_normalization_transforms,
            "versions": versions, "torchvision_ops": tv_ops,
            "convml_tt_file": convml_tt.__file__}


def _spec(cfg: dict[str, Any], workdir: str) -> Any:
    """The shipped job, shrunk for ``tiny``, writing into ``workdir``."""
    from engine.pipelines.spec import load_job

    spec = load_job(os.path.join(ROOT, JOB))
    trip, train, embed, cluster = spec.triplets, spec.train, spec.embed, spec.cluster
    if cfg["n_train"] is not None:
        trip = dataclasses.replace(trip, n_train=cfg["n_train"], n_validation=cfg["n_validation"])
    if cfg["epochs"] is not None:
        train = dataclasses.replace(train, epochs=cfg["epochs"])
    if cfg["scales"] is not None:
        embed = dataclasses.replace(embed, scales=cfg["scales"])
    if cfg["n_boot"] is not None:
        cluster = dataclasses.replace(cluster, n_boot=cfg["n_boot"])
    out = os.path.join(workdir, "engine", "embeddings.zarr")
    return dataclasses.replace(spec, triplets=trip, train=train, embed=embed, cluster=cluster,
                               output=dataclasses.replace(spec.output, url=out))


def _params(spec: Any) -> int:
    from engine.ml.embed import tile_embedder

    m = spec.model
    net = tile_embedder(len(spec.variables), dim=m.dim, width=m.width, stem=m.stem,
                        hidden=m.hidden, dropout=m.dropout)
    return sum(p.numel() for p in net.parameters())


def _engine(spec: Any) -> dict[str, Any]:
    """The job end to end, as ``cube-engine run --cluster threads`` runs it."""
    from engine.cluster import connect
    from engine.pipelines.registry import get_kind

    gc.collect()
    with PeakRSS(interval=0.1) as peak:
        t0 = time.perf_counter()
        with connect("threads") as client:
            res = get_kind("embed").run(spec, output=spec.output.url, overwrite=True,
                                        client=client)
        wall = time.perf_counter() - t0
    m = res.metrics
    tr = m["training"]
    return {"seconds": wall, "train_s": tr["seconds"], "triplets_per_s": tr["samples_per_s"],
            "triplets_seen": tr["triplets_seen"], "epochs_run": tr["epochs_run"],
            "best_epoch": tr["best_epoch"],
            "validation_triplet_accuracy": tr.get("validation_triplet_accuracy"),
            "tiles": m["tiles"], "k": m.get("k"), "scores": m["scores"]["embedding_kmeans"],
            "baselines": {k: {s: v.get(s) for s in ("nmi", "ari", "silhouette")}
                          for k, v in m["scores"].items() if k != "embedding_kmeans"},
            "parameters": _params(spec), "peak_mb": peak.peak_mb, "delta_mb": peak.delta_mb}


class _Inputs:
    """The job's cube, split, triplet placement and tile grid, as the engine plans them."""

    def __init__(self, spec: Any) -> None:
        from engine.ops.triplets import triplet_sampler
        from engine.pipelines.embed import prepare, time_split, window_grid

        p = prepare(spec)
        s = time_split(p)
        self.spec, self.tile, self.stride = spec, p.tile, p.stride
        self.train_steps, self.test_steps = s.train, s.test
        self.data = np.asarray(p.data.values, dtype=np.float32)  # (time, channel, y, x)
        labels = np.asarray(p.labels.values) if p.labels is not None else None
        if labels is None or labels.ndim != 1:
            raise ValueError("compare_convml needs labels on (time), as the shipped job has")
        self.labels = labels.astype(np.int32)
        n_time, _, ny, nx = self.data.shape
        folds = np.broadcast_to(s.folds(n_time)[:, None, None], (n_time, ny, nx))
        t = spec.triplets
        nb = t.neighbour_km
        self.sampler = triplet_sampler(
            np.ascontiguousarray(folds), tile=p.tile,
            neighbour_km=float(nb[0]) if len(nb) == 1 else (float(nb[0]), float(nb[1])),
            distant=t.distant, min_distance_km=t.min_distance_km, seed=spec.seed,
            dx_km=p.dx_km, dy_km=p.dy_km)
        self.dx_km = p.dx_km
        self.ys, self.xs = window_grid(ny, p.tile, p.stride), window_grid(nx, p.tile, p.stride)
        # 8-bit scaling over the training steps (convml-tt reads 8-bit PNGs only)
        train = self.data[self.train_steps]
        self.lo, self.hi = float(train.min()), float(train.max())

    def to_uint8(self, a: np.ndarray) -> np.ndarray:
        """``(y, x)`` of the first channel as ``(y, x, 3)`` uint8 RGB (grey)."""
        q = np.round((a - self.lo) / (self.hi - self.lo) * 255.0)
        return np.repeat(np.clip(q, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)

    def quantisation(self) -> dict[str, float]:
        q = self.to_uint8(self.data[:, 0].reshape(-1, self.data.shape[-1]))[..., 0]
        back = q.astype(np.float64) / 255.0 * (self.hi - self.lo) + self.lo
        err = np.abs(back - self.data[:, 0].reshape(back.shape))
        return {"lo": self.lo, "hi": self.hi, "levels": 256, "max_abs_error": float(err.max()),
                "rms_error": float(np.sqrt((err ** 2).mean())),
                "distinct_values_float": int(np.unique(self.data[:, 0]).size),
                "distinct_values_png": int(np.unique(q).size)}

    def write_triplets(self, root: str, n_train: int, n_val: int) -> dict[str, Any]:
        """convml-tt's triplet layout under ``root/train``: the job's first-epoch training
        triplets, then its validation triplets."""
        from PIL import Image

        idx = np.concatenate([np.arange(n_train), VAL_OFFSET + np.arange(n_val)])
        tr = self.sampler.sample(idx, 0)
        out = os.path.join(root, "train")
        os.makedirs(out, exist_ok=True)
        h = self.tile
        for j in range(len(idx)):
            for c, name in enumerate(("anchor", "neighbor", "distant")):
                t, y, x = int(tr.time[j, c]), int(tr.y0[j, c]), int(tr.x0[j, c])
                img = self.to_uint8(self.data[t, 0, y:y + h, x:x + h])
                Image.fromarray(img, "RGB").save(os.path.join(out, f"{j:05d}_{name}.png"))
        return {"triplets": len(idx), "neighbour_km_mean": float(tr.neighbour_km.mean()),
                "neighbour_overlap_mean": float(tr.overlap.mean()),
                "distant_other_step": bool((tr.time[:, 2] != tr.time[:, 0]).all())}

    def write_scenes(self, root: str) -> str:
        from PIL import Image

        out = os.path.join(root, "scenes")
        os.makedirs(out, exist_ok=True)
        for t in range(self.data.shape[0]):
            Image.fromarray(self.to_uint8(self.data[t, 0]), "RGB").save(
                os.path.join(out, f"t{t:02d}.png"))
        return out


def _fold(inputs: _Inputs, t: np.ndarray) -> np.ndarray:
    return np.isin(t, inputs.test_steps).astype(np.int8)


def _score(inputs: _Inputs, t: np.ndarray, emb: np.ndarray, spec: Any,
           by_steps: bool) -> dict[str, Any]:
    """k-means on the training steps' tiles, scores on the test steps' tiles, as
    ``engine.pipelines.embed`` does (groups: the time step, when the engine's run did)."""
    from engine.ml.cluster import kmeans, scores

    lab = inputs.labels[t]
    fold = _fold(inputs, t)
    k = spec.cluster.k if spec.cluster.k is not None else int(len(np.unique(lab)))
    emb = emb.astype(np.float32)
    km = kmeans(emb[fold == 0], k, seed=spec.seed)
    pred = np.asarray(km.predict(emb))
    test = (fold == 1) & (lab >= 0)
    kw: dict[str, Any] = {}
    if by_steps and "groups" in inspect.signature(scores).parameters:
        kw["groups"] = t[test]
    return scores(lab[test], pred[test], emb[test], n_boot=spec.cluster.n_boot, seed=spec.seed,
                  **kw)


def _convml_run(cv: dict[str, Any], inputs: _Inputs, spec: Any, workdir: str, *,
                jitter: bool, by_steps: bool) -> dict[str, Any]:
    """convml-tt trained and applied on the same inputs; breakage recorded, not fixed."""
    pl = cv["pl"]
    t_cfg, trip = spec.train, spec.triplets
    broken: list[str] = []
    out: dict[str, Any] = {"broken": broken}
    root = os.path.join(workdir, "convml" + ("" if jitter else "-nojitter"))
    os.makedirs(root, exist_ok=True)
    step = "write PNG triplets"
    gc.collect()
    quiet = io.StringIO()
    with (PeakRSS(interval=0.1) as peak, contextlib.chdir(root),
          contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        try:
            out["triplets"] = inputs.write_triplets(root, trip.n_train, trip.n_validation)
            scenes = inputs.write_scenes(root)
            out["png_s"] = time.perf_counter() - t0
            step = "TripletTrainerDataModule"
            pl.seed_everything(spec.seed, workers=True)
            n_all = trip.n_train + trip.n_validation
            dm = cv["DataModule"](data_dir=root, normalize_for_arch="resnet18",
                                  train_val_fraction=(trip.n_train + 0.5) / n_all,
                                  batch_size=t_cfg.batch_size, num_dataloader_workers=0)
            if not jitter:  # convml-tt's own augmentations with its ColorJitter off
                from torchvision import transforms as tv_transforms  # type: ignore[import-not-found]

                dm._train_transforms = tv_transforms.Compose(
                    [cv["normalization"]("resnet18"), *cv["augmentations"](p_lighting=0.0)])
            step = "TripletTrainerModel"
            model = cv["Model"](base_arch="resnet18", pretrained=False, margin=spec.loss.margin,
                                lr=t_cfg.learning_rate, l2_regularisation=t_cfg.weight_decay,
                                n_input_channels=3, n_embedding_dims=spec.model.dim,
                                head_type="orig_fastai")
            out["parameters"] = sum(p.numel() for p in model.parameters())
            step = "Trainer.fit"
            trainer = pl.Trainer(max_epochs=t_cfg.epochs, accelerator="cpu", devices=1,
                                 default_root_dir=root, enable_progress_bar=False,
                                 enable_model_summary=False)
            t1 = time.perf_counter()
            trainer.fit(model=model, datamodule=dm)
            out["train_s"] = time.perf_counter() - t1
            n_fit = len(dm._train_dataset)
            out["n_train_split"], out["n_val_split"] = n_fit, len(dm._val_dataset)
            out["epochs_run"] = int(trainer.current_epoch)
            out["triplets_seen"] = n_fit * out["epochs_run"]
            out["triplets_per_s"] = out["triplets_seen"] / out["train_s"]
            logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
            out["last_epoch_metrics"] = logged
            step = "MovingWindowImageTilingDataset + get_embeddings"
            tiling = cv["Tiling"](data_dir=scenes,
                                  transform=cv["get_transforms"]("predict", "resnet18"),
                                  step=(inputs.stride, inputs.stride),
                                  N_tile=(inputs.tile, inputs.tile))
            t2 = time.perf_counter()
            da = cv["get_embeddings"](tile_dataset=tiling, model=model,
                                      prediction_batch_size=spec.embed.batch_size)
            out["embed_s"] = time.perf_counter() - t2
            step = "match the tile grid"
            scene = np.asarray(da["scene_id"].values).astype(str)
            t = np.array([int(s[1:]) for s in scene])
            y0 = np.asarray(da["j0"].values) - inputs.tile // 2
            x0 = np.asarray(da["i0"].values) - inputs.tile // 2
            grid = {(int(a), int(b), int(c)) for a in range(inputs.data.shape[0])
                    for b in inputs.ys for c in inputs.xs}
            got = set(zip(t.tolist(), y0.tolist(), x0.tolist(), strict=True))
            if got != grid or len(t) != len(grid):
                broken.append(f"tile grid: {len(t)} tiles, {len(got & grid)} of the "
                              f"engine's {len(grid)} positions")
            out["tiles"] = len(t)
            step = "kmeans + scores"
            emb = np.asarray(da.values, dtype=np.float32)
            out["scores"] = _score(inputs, t, emb, spec, by_steps)
        except Exception as err:  # a broken peer step is a result, not a crash
            broken.append(f"{step}: {type(err).__name__}: {err}")
        out["seconds"] = time.perf_counter() - t0
    out.update(peak_mb=peak.peak_mb, delta_mb=peak.delta_mb)
    return out


def _colour_jitter_check(cv: dict[str, Any], inputs: _Inputs) -> dict[str, Any]:
    """What convml-tt's ColorJitter (applied after its ImageNet normalisation) does to the
    training steps' grid tiles: the share of pixels it clamps to 0 or 1."""
    import torch

    h = inputs.tile
    tiles = [inputs.to_uint8(inputs.data[t, 0, y:y + h, x:x + h])
             for t in inputs.train_steps for y in inputs.ys for x in inputs.xs]
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255.0
    norm = cv["normalization"]("resnet18")(x)
    p_default = [a.p for a in cv["augmentations"]() if type(a).__name__ == "ColorJitter"]
    always = [a for a in cv["augmentations"](p_lighting=1.0)
              if type(a).__name__ == "ColorJitter"]
    if not always:
        return {"found": False}
    torch.manual_seed(0)
    y = always[0](norm.clone())
    return {"found": True, "p": float(p_default[0]), "tiles": len(tiles),
            "normalised_range": [float(norm.min()), float(norm.max())],
            "after_jitter_range": [float(y.min()), float(y.max())],
            "share_pixels_clamped": float(((y <= 0) | (y >= 1)).float().mean()),
            "share_pixels_zero": float((y <= 0).float().mean())}


DIFFERENCES = {
    "triplets": "the engine draws new triplets every epoch (n_train per epoch); convml-tt "
                "trains on one fixed set on disk every epoch (here the engine's first-epoch "
                "triplets)",
    "validation": "the engine's validation triplets, early stopping and the best epoch; "
                  "convml-tt random_splits its folder (same share) and keeps the last epoch "
                  "(no early stopping)",
    "loss": "engine: margin loss on L2 distances (loss.distance: l2); convml-tt: squared L2, "
            "fixed in TripletTrainerModel._loss",
    "input": "engine: float32 cloud field, one channel, standardised by the training tiles; "
             "convml-tt: 8-bit RGB PNGs (the channel three times), ImageNet mean/std",
    "augmentation": "engine: the eight dihedral flips/rotations; convml-tt: kornia v/h flips, "
                    "RandomAffine(10 deg, zoom 1.1), RandomPerspective(0.2), ColorJitter(0.2) "
                    "applied after normalisation (clamps to [0, 1])",
    "network": "engine: ResNet-18 of width 16 (model.width), head 128 hidden; convml-tt: "
               "torchvision resnet18 (width 64, not settable), head orig_fastai (512 hidden)",
    "scores": "convml-tt has no label scores: NMI/ARI/silhouette by engine.ml.cluster.scores "
              "on convml-tt's embeddings",
    "device": "both on the CPU (convml-tt targets one GPU; pl.Trainer(accelerator='cpu'))",
}


def run(size: str = "default") -> dict[str, Any]:
    """Run the comparison at ``size``; :class:`unittest.SkipTest` without convml-tt."""
    from engine._version import code_version

    cv = _convml()
    cfg = SIZES[size]
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="compare-convml-") as workdir:
        spec = _spec(cfg, workdir)
        eng = _engine(spec)
        inputs = _Inputs(spec)
        by_steps = eng["scores"].get("bootstrap") == "groups"
        conv = _convml_run(cv, inputs, spec, workdir, jitter=True, by_steps=by_steps)
        ref = (_convml_run(cv, inputs, spec, workdir, jitter=False, by_steps=by_steps)
               if cfg["reference"] else None)
        jitter = _colour_jitter_check(cv, inputs)
        quant = inputs.quantisation()
    rows = [{"name": "engine", "note": "embed job as shipped: train, embed, Zarr, baselines",
             **{k: eng.get(k) for k in ("seconds", "train_s", "triplets_per_s", "epochs_run",
                                        "parameters", "peak_mb")}, "scores": eng["scores"]},
            {"name": "convml-tt", "note": "PNGs, TripletTrainerModel, get_embeddings; "
                                          + ("BROKEN" if conv["broken"] else "ok"),
             **{k: conv.get(k) for k in ("seconds", "train_s", "triplets_per_s", "epochs_run",
                                         "parameters", "peak_mb")},
             "scores": conv.get("scores")}]
    if ref is not None:
        rows.append({"name": "convml-tt, no colour jitter",
                     "note": "reference: get_train_augmentation_transforms(p_lighting=0)",
                     **{k: ref.get(k) for k in ("seconds", "train_s", "triplets_per_s",
                                                "epochs_run", "parameters", "peak_mb")},
                     "scores": ref.get("scores")})
    ratios: dict[str, float] = {"wall_vs_convml": conv["seconds"] / eng["seconds"]}
    differences: dict[str, float] = {}
    if conv.get("triplets_per_s"):
        ratios["train_triplets_per_s_vs_convml"] = eng["triplets_per_s"] / conv["triplets_per_s"]
    if conv.get("scores"):
        cs, es = conv["scores"], eng["scores"]
        if cs["nmi"] > 0:
            ratios["nmi_engine_over_convml"] = es["nmi"] / cs["nmi"]
        for key in ("nmi", "ari", "silhouette"):
            if es.get(key) is not None and cs.get(key) is not None:
                differences[key] = es[key] - cs[key]
    broken = {name: "; ".join(r["broken"]) for name, r in
              (("convml-tt", conv), ("convml-tt, no colour jitter", ref or {"broken": []}))
              if r["broken"]}
    t = spec.triplets
    return {
        "benchmark": "compare_convml",
        "size": size,
        "machine": machine(),
        "engine_version": code_version(),
        "convml": {"versions": cv["versions"], "torchvision_ops_not_loaded": cv["torchvision_ops"],
                   "module": cv["convml_tt_file"]},
        "job": {"path": JOB, "tile_px": inputs.tile, "tile_km": inputs.tile * inputs.dx_km,
                "stride_px": inputs.stride, "train_steps": inputs.train_steps,
                "test_steps": inputs.test_steps, "n_train": t.n_train,
                "n_validation": t.n_validation, "neighbour_km": list(t.neighbour_km),
                "distant": t.distant, "epochs": spec.train.epochs,
                "batch_size": spec.train.batch_size, "learning_rate": spec.train.learning_rate,
                "k": eng["k"], "n_boot": spec.cluster.n_boot, "scales": list(spec.embed.scales)},
        "engine": eng,
        "convml_tt": conv,
        "convml_tt_no_colour_jitter": ref,
        "png_quantisation": quant,
        "colour_jitter": jitter,
        "rows": rows,
        "broken": broken or None,
        "ratios": ratios,
        "differences": differences,
        "targets": {},
        "differences_in_method": DIFFERENCES,
        "note": ("single runs on the CPU; the engine's wall includes its Zarr write, two "
                 "baselines and the NMI-vs-scale table, convml-tt's the PNG writing, "
                 "training, embedding and the same k-means and scores"),
    }


def _ci(s: dict[str, Any] | None, key: str) -> str:
    if not s or s.get(key) is None:
        return "n/a"
    ci = s.get(f"{key}_ci")
    if not ci or None in ci:
        return f"{s[key]:.3f}"
    return f"{s[key]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _print(res: dict[str, Any]) -> None:
    if res.get("skipped"):
        print(f"convml benchmark skipped: {res['skipped']}")
        return
    j = res["job"]
    v = res["convml"]["versions"]
    print(f"compare_convml ({res['size']}): {j['path']}, tiles {j['tile_px']} px "
          f"({j['tile_km']:g} km) stride {j['stride_px']} px, train steps "
          f"{j['train_steps'][0]}-{j['train_steps'][-1]}, test steps {j['test_steps']}, "
          f"{j['n_train']} + {j['n_validation']} triplets, {j['epochs']} epochs; convml-tt "
          f"{v.get('convml-tt')}, pytorch-lightning {v.get('pytorch-lightning')}, kornia "
          f"{v.get('kornia')}; {res['machine']['cpus']} cores")

    print(f"{'method':28s} {'wall s':>7s} {'train s':>8s} {'trip/s':>7s} {'ep':>3s} "
          f"{'params':>9s} {'NMI [95% CI]':>22s} {'ARI [95% CI]':>22s} "
          f"{'silhouette [95% CI]':>22s}  note")
    for r in res["rows"]:
        print(f"{r['name']:28s} {na(r['seconds'], '7.1f'):>7s} {na(r['train_s'], '8.1f'):>8s} "
              f"{na(r['triplets_per_s'], '7.1f'):>7s} {na(r['epochs_run'], 'd'):>3s} "
              f"{na(r['parameters'], ',d'):>9s} {_ci(r['scores'], 'nmi'):>22s} "
              f"{_ci(r['scores'], 'ari'):>22s} {_ci(r['scores'], 'silhouette'):>22s}  "
              f"{r['note']}")
    q = res["png_quantisation"]
    print(f"PNG: 8 bit over [{q['lo']:.3f}, {q['hi']:.3f}], max error {q['max_abs_error']:.4f}, "
          f"{q['distinct_values_float']:,} float values -> {q['distinct_values_png']} levels")
    cj = res["colour_jitter"]
    if cj.get("found"):
        print(f"convml-tt ColorJitter (p={cj['p']}) after ImageNet normalisation: a tile "
              f"normalised to [{cj['normalised_range'][0]:.2f}, "
              f"{cj['normalised_range'][1]:.2f}] leaves it in "
              f"[{cj['after_jitter_range'][0]:.2f}, {cj['after_jitter_range'][1]:.2f}], "
              f"{cj['share_pixels_clamped']:.0%} of pixels clamped")
    for name, msg in (res["broken"] or {}).items():
        print(f"{name} broken: {msg}")
    for key, value in res["ratios"].items():
        print(f"{key}: {value:.2f}x")
    for key, value in res["differences"].items():
        print(f"{key} engine - convml-tt: {value:+.3f}")


def save(res: dict[str, Any], tag: str | None = None) -> str:
    """Write ``res`` to ``benchmarks/results/compare_convml-<size>[-<tag>].json``."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"compare_convml-{res['size']}" + (f"-{tag}" if tag else "")
                        + ".json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=2, default=str)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks.compare_convml [size] [--tag TAG]``: run, print, write JSON;
    without convml-tt print the reason and write nothing."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_convml")
    p.add_argument("size", nargs="?", default="default", choices=list(SIZES))
    p.add_argument("--tag", default=None, help="suffix of the results file, e.g. the machine")
    args = p.parse_args(argv)
    try:
        res = run(args.size)
    except unittest.SkipTest as skip:
        res = {"benchmark": "compare_convml", "size": args.size, "skipped": str(skip),
               "ratios": {}, "targets": {}}
        _print(res)
        return res
    _print(res)
    print(f"wrote {save(res, args.tag)}")
    return res


if __name__ == "__main__":
    main()
