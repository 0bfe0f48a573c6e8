"""Clustering of tile embeddings and scores against labels, at scale (issue 12, section 3).

Everything here is numpy/scipy; inputs may be numpy arrays or dask arrays of shape
``(n, d)`` (``n`` tiles, ``d`` embedding dimensions) and :func:`pca` also takes an
iterable of ``(rows, d)`` chunks, so the embeddings of a whole domain never have to sit in
memory at once. ``engine.ml.cluster`` is the import path for all of it; the modules are

``fitting``
    :func:`pca` (exact, one pass over chunks: merged per-chunk means and scatter matrices),
    :func:`kmeans` (mini-batch k-means, or Lloyd over chunks when ``batch_size=None``),
    :func:`ward` (Ward linkage on a subsample, nearest-centroid assignment of the rest).
``metrics``
    :func:`scores` (NMI, adjusted Rand, silhouette, purity, bootstrap confidence
    intervals over rows or whole groups), :func:`nmi_vs_scale` (document 004's scale
    experiment).
``labels``
    :func:`read_understanding_clouds` (the Kaggle "Understanding Clouds" layout),
    :func:`masks_to_labels`, :func:`rle_decode` / :func:`rle_encode`.
``plots`` (matplotlib, Agg)
    :func:`dendrogram_plot`, :func:`pca_rgb` (+ :func:`pca_rgb_plot`),
    :func:`nmi_vs_scale_plot`.

Every random choice is drawn from ``numpy.random.default_rng(seed)`` over *global* row
indices, so results depend on the seed and not on how the input is chunked.
"""

from __future__ import annotations

from engine.ml.cluster.fitting import KMeansResult, PCAResult, WardResult, kmeans, pca, ward
from engine.ml.cluster.labels import (
    masks_to_labels,
    read_understanding_clouds,
    rle_decode,
    rle_encode,
)
from engine.ml.cluster.metrics import (
    adjusted_rand,
    nmi,
    nmi_vs_scale,
    purity,
    scores,
    silhouette_samples,
)
from engine.ml.cluster.plots import dendrogram_plot, nmi_vs_scale_plot, pca_rgb, pca_rgb_plot

__all__ = [
    # fitting
    "PCAResult", "pca", "KMeansResult", "kmeans", "WardResult", "ward",
    # scores
    "nmi", "adjusted_rand", "silhouette_samples", "purity", "scores", "nmi_vs_scale",
    # labels
    "rle_decode", "rle_encode", "read_understanding_clouds", "masks_to_labels",
    # plots
    "dendrogram_plot", "pca_rgb", "pca_rgb_plot", "nmi_vs_scale_plot",
]
