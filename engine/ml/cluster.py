"""Clustering of tile embeddings and scores against labels, at scale (issue 12, section 3).

Everything here is numpy/scipy; inputs may be numpy arrays or dask arrays of shape
``(n, d)`` (``n`` tiles, ``d`` embedding dimensions) and :func:`pca` also takes an
iterable of ``(rows, d)`` chunks, so the embeddings of a whole domain never have to sit in
memory at once.

Fitting
    :func:`pca` (exact, one pass over chunks: merged per-chunk means and scatter matrices),
    :func:`kmeans` (mini-batch k-means, or Lloyd over chunks when ``batch_size=None``),
    :func:`ward` (Ward linkage on a subsample, nearest-centroid assignment of the rest).
Scores
    :func:`scores` (NMI, adjusted Rand, silhouette, purity, bootstrap confidence
    intervals), :func:`nmi_vs_scale` (document 004's scale experiment).
Labels
    :func:`read_understanding_clouds` (the Kaggle "Understanding Clouds" layout),
    :func:`masks_to_labels`, :func:`rle_decode` / :func:`rle_encode`.
Plots (matplotlib, Agg)
    :func:`dendrogram_plot`, :func:`pca_rgb` (+ :func:`pca_rgb_plot`),
    :func:`nmi_vs_scale_plot`.

Every random choice is drawn from ``numpy.random.default_rng(seed)`` over *global* row
indices, so results depend on the seed and not on how the input is chunked.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engine.errors import SpecError

if TYPE_CHECKING:
    import xarray as xr
    from matplotlib.figure import Figure

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

#: Rows per chunk when a numpy array is streamed through a chunked computation.
_CHUNK_ROWS = 65536


def _is_dask(x: Any) -> bool:
    return hasattr(x, "dask") and hasattr(x, "chunks")


def _check_2d(x: Any, name: str = "x") -> None:
    if len(getattr(x, "shape", ())) != 2:
        raise SpecError(f"{name} must be 2-D (n, d); got shape {getattr(x, 'shape', None)}")


def _iter_chunks(x: Any, batch_size: int | None = None) -> Iterator[np.ndarray]:
    """Yield ``(rows, d)`` float64 chunks of ``x`` (numpy, dask or an iterable of chunks)."""
    if _is_dask(x):
        _check_2d(x)
        x = x.rechunk({0: batch_size or x.chunks[0][0], 1: -1})
        for i in range(x.numblocks[0]):
            yield np.asarray(x.blocks[i].compute(), dtype=np.float64)
    elif isinstance(x, np.ndarray):
        _check_2d(x)
        step = batch_size or _CHUNK_ROWS
        for i in range(0, x.shape[0], step):
            yield np.asarray(x[i:i + step], dtype=np.float64)
    else:
        for chunk in x:
            c = np.asarray(chunk, dtype=np.float64)
            _check_2d(c, "each chunk")
            yield c


def _take_rows(x: Any, index: np.ndarray) -> np.ndarray:
    """``x[index]`` as float64 numpy, for numpy or dask ``x`` (one gather for dask)."""
    index = np.asarray(index)
    order = np.argsort(index, kind="stable")
    sorted_rows = x[index[order]]
    if _is_dask(sorted_rows):
        sorted_rows = sorted_rows.compute()
    out = np.empty((index.size, x.shape[1]), dtype=np.float64)
    out[order] = sorted_rows
    return out


# --------------------------------------------------------------------------------- PCA


@dataclass(frozen=True)
class PCAResult:
    """A fitted PCA: ``transform(x) = (x - mean) @ components.T``.

    Component signs are fixed so that each component's largest-magnitude loading is
    positive (a deterministic choice; SVD signs are otherwise arbitrary).
    """

    components: np.ndarray  # (n_components, d), orthonormal rows
    explained_variance: np.ndarray  # (n_components,), sample variance (ddof=1)
    explained_variance_ratio: np.ndarray  # (n_components,)
    mean: np.ndarray  # (d,)
    n_samples: int

    def transform(self, x: Any) -> Any:
        """Project ``x`` (numpy -> numpy, dask -> lazy dask) on the components."""
        if _is_dask(x):
            x = x.rechunk({1: -1})
            k = self.components.shape[0]
            return x.map_blocks(self._project, dtype=np.float64, chunks=(x.chunks[0], (k,)))
        return self._project(np.asarray(x))

    def _project(self, block: np.ndarray) -> np.ndarray:
        return (np.asarray(block, dtype=np.float64) - self.mean) @ self.components.T


def _chunk_stats(c: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    mean = c.mean(axis=0)
    centred = c - mean
    return c.shape[0], mean, centred.T @ centred


def _merge_stats(a: tuple[int, np.ndarray, np.ndarray],
                 b: tuple[int, np.ndarray, np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    # Chan et al. (1979) pairwise update of mean and scatter: exact, and stable.
    na, ma, sa = a
    nb, mb, sb = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), sa + sb + np.outer(delta, delta) * (na * nb / n)


def pca(x: Any, n_components: int, batch_size: int | None = None) -> PCAResult:
    """Principal components of the rows of ``x``, in one pass over chunks.

    Each chunk contributes its count, mean and centred scatter matrix, merged exactly
    (Chan's pairwise update), so the result equals the SVD of the whole centred array
    whatever the chunking; memory is ``O(d**2)`` plus one chunk. Dask inputs are reduced
    block by block in parallel.

    Parameters
    ----------
    x
        ``(n, d)`` numpy or dask array, or an iterable of ``(rows, d)`` chunks.
    n_components
        Number of components kept (``<= d``).
    batch_size
        Rows per chunk for numpy and dask inputs (the dask chunking by default).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(500, 3)) * [5.0, 1.0, 0.1]
    >>> p = pca(x, 2, batch_size=64)
    >>> p.transform(x).shape, bool(p.explained_variance_ratio[0] > 0.9)
    ((500, 2), True)
    """
    if _is_dask(x):
        import dask

        _check_2d(x)
        x = x.rechunk({0: batch_size or x.chunks[0][0], 1: -1})
        parts = dask.compute(*[dask.delayed(_chunk_stats)(b) for b in x.to_delayed().ravel()])
    else:
        parts = tuple(_chunk_stats(c) for c in _iter_chunks(x, batch_size) if c.shape[0])
    if not parts:
        raise SpecError("pca: x has no rows")
    while len(parts) > 1:  # tree merge: balanced rounding errors
        parts = tuple(_merge_stats(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i]
                      for i in range(0, len(parts), 2))
    n, mean, scatter = parts[0]
    d = mean.size
    if not 1 <= n_components <= d:
        raise SpecError(f"pca: n_components={n_components} must be in 1..{d}")
    if n < 2:
        raise SpecError("pca: needs at least 2 rows")
    cov = scatter / (n - 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1][:n_components]
    comps = evecs[:, order].T
    signs = np.sign(comps[np.arange(n_components), np.argmax(np.abs(comps), axis=1)])
    comps = comps * signs[:, None]
    var = np.clip(evals[order], 0.0, None)
    total = float(np.clip(evals, 0.0, None).sum())
    ratio = var / total if total > 0 else np.zeros_like(var)
    return PCAResult(comps, var, ratio, mean, int(n))


# ------------------------------------------------------------------------------ k-means


def _sq_dist(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _assign(block: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return _sq_dist(np.asarray(block, dtype=np.float64), centers).argmin(1).astype(np.int64)


def _predict(x: Any, centers: np.ndarray) -> Any:
    if _is_dask(x):
        x = x.rechunk({1: -1})
        return x.map_blocks(_assign, centers, dtype=np.int64, drop_axis=1)
    x = np.asarray(x)
    return np.concatenate([_assign(x[i:i + _CHUNK_ROWS], centers)
                           for i in range(0, x.shape[0], _CHUNK_ROWS)] or
                          [np.empty(0, np.int64)])


@dataclass(frozen=True)
class KMeansResult:
    """Fitted k-means: ``centers (k, d)``, ``labels (n,)`` (lazy for dask input),
    ``sample_inertia``: mean squared distance to the nearest centre over the evaluation
    sample the best of ``n_init`` runs was chosen on, and ``n_iter`` of that run."""

    centers: np.ndarray
    labels: Any
    sample_inertia: float
    n_iter: int

    def predict(self, x: Any) -> Any:
        """Nearest-centre labels of ``x`` (numpy -> numpy, dask -> lazy dask)."""
        return _predict(x, self.centers)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [x[rng.integers(x.shape[0])]]
    d2 = _sq_dist(x, centers[0][None, :])[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(x.shape[0], p=d2 / total) if total > 0 else rng.integers(x.shape[0])
        centers.append(x[i])
        d2 = np.minimum(d2, _sq_dist(x, x[i][None, :])[:, 0])
    return np.array(centers)


def kmeans(x: Any, k: int, seed: int = 0, batch_size: int | None = 1024, n_init: int = 3,
           max_iter: int = 200, tol: float = 1e-6, init_size: int | None = None) -> KMeansResult:
    """k-means over the rows of ``x`` (numpy or dask), deterministic from ``seed``.

    With an integer ``batch_size`` this is mini-batch k-means (Sculley 2010): each step
    draws ``batch_size`` rows uniformly and moves every centre towards the mean of its
    batch members with a per-centre learning rate ``1 / count``. With
    ``batch_size=None`` it is Lloyd's algorithm, each iteration one pass over chunks.
    Each of ``n_init`` runs starts from k-means++ on an ``init_size`` sample; the run with
    the lowest inertia on a common evaluation sample wins. Draws are over global row
    indices, so results do not depend on the chunking of ``x``.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> x = np.concatenate([rng.normal(m, 0.1, size=(100, 2)) for m in (0.0, 5.0)])
    >>> r = kmeans(x, 2, seed=0, batch_size=32)
    >>> sorted(np.bincount(r.labels).tolist())
    [100, 100]
    """
    _check_2d(x)
    n = int(x.shape[0])
    if not 1 <= k <= n:
        raise SpecError(f"kmeans: k={k} must be in 1..{n} (the number of rows)")
    if n_init < 1 or max_iter < 1:
        raise SpecError("kmeans: n_init and max_iter must be >= 1")
    seeds = np.random.SeedSequence(seed).spawn(n_init + 1)
    eval_rng = np.random.default_rng(seeds[0])
    m_eval = min(n, max(10_000, 20 * k))
    eval_x = _take_rows(x, np.sort(eval_rng.choice(n, m_eval, replace=False)))
    init_size = init_size or min(n, max(3 * k, 3 * (batch_size or 0), 1000))
    best: tuple[float, np.ndarray, int] | None = None
    for run_seed in seeds[1:]:
        rng = np.random.default_rng(run_seed)
        init_x = _take_rows(x, np.sort(rng.choice(n, min(init_size, n), replace=False)))
        centers = _kmeans_pp(init_x, k, rng)
        if batch_size is None:
            centers, it = _lloyd(x, centers, max_iter, tol)
        else:
            centers, it = _minibatch(x, centers, rng, batch_size, max_iter, tol)
        inertia = float(_sq_dist(eval_x, centers).min(1).mean())
        if best is None or inertia < best[0]:
            best = (inertia, centers, it)
    assert best is not None
    inertia, centers, it = best
    return KMeansResult(centers, _predict(x, centers), inertia, it)


def _lloyd(x: Any, centers: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, int]:
    k, d = centers.shape
    scale = float((centers.var(0)).sum()) or 1.0
    it = 0
    while it < max_iter:
        it += 1
        sums = np.zeros((k, d))
        counts = np.zeros(k)
        for c in _iter_chunks(x):
            lab = _assign(c, centers)
            np.add.at(sums, lab, c)
            counts += np.bincount(lab, minlength=k)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol * scale:
            break
    return centers, it


def _minibatch(x: Any, centers: np.ndarray, rng: np.random.Generator, batch_size: int,
               max_iter: int, tol: float) -> tuple[np.ndarray, int]:
    n = int(x.shape[0])
    k, d = centers.shape
    centers = centers.copy()
    counts = np.zeros(k)
    scale = float((centers.var(0)).sum()) or 1.0
    it = 0
    calm = 0
    while it < max_iter:
        it += 1
        batch = _take_rows(x, np.sort(rng.integers(0, n, size=min(batch_size, n))))
        lab = _assign(batch, centers)
        sums = np.zeros((k, d))
        np.add.at(sums, lab, batch)
        m = np.bincount(lab, minlength=k).astype(float)
        counts += m
        hit = m > 0
        old = centers.copy()
        centers[hit] += (sums[hit] - m[hit, None] * centers[hit]) / counts[hit, None]
        shift = float(((centers - old) ** 2).sum())
        # stop after 10 calm steps in a row: one small step can be chance
        calm = calm + 1 if shift <= tol * scale else 0
        if calm >= 10:
            break
    return centers, it


# --------------------------------------------------------------------------------- Ward


@dataclass(frozen=True)
class WardResult:
    """Ward clustering on a subsample, extended to all rows by nearest centroid.

    ``labels (n,)`` (0-based; lazy for dask input) are the nearest-centroid labels of every
    row, ``linkage`` the scipy linkage matrix of the subsample (for a dendrogram),
    ``sample_index`` the subsample's row numbers, ``sample_labels`` Ward's own labels
    of the subsample and ``centroids (n_clusters, d)`` the subsample cluster means.
    """

    labels: Any
    linkage: np.ndarray
    sample_index: np.ndarray
    sample_labels: np.ndarray
    centroids: np.ndarray

    def predict(self, x: Any) -> Any:
        """Nearest-centroid labels of ``x`` (numpy -> numpy, dask -> lazy dask)."""
        return _predict(x, self.centroids)


def ward(x: Any, n_clusters: int, subsample: int = 5000, seed: int = 0) -> WardResult:
    """Ward hierarchical clustering of a random subsample of rows, then nearest centroid.

    Ward linkage needs ``O(m**2)`` memory in the subsample size ``m``, so it runs on
    ``min(subsample, n)`` rows drawn without replacement (``seed``); the tree is cut into
    ``n_clusters`` clusters (``fcluster(..., "maxclust")``) and every row gets the label of
    the nearest cluster centroid.

    Examples
    --------
    >>> rng = np.random.default_rng(2)
    >>> x = np.concatenate([rng.normal(m, 0.1, size=(50, 2)) for m in (0.0, 3.0, 6.0)])
    >>> w = ward(x, 3, subsample=60, seed=0)
    >>> sorted(np.bincount(w.labels).tolist()), w.linkage.shape
    ([50, 50, 50], (59, 4))
    """
    from scipy.cluster.hierarchy import fcluster, linkage  # type: ignore[import-untyped]

    _check_2d(x)
    n = int(x.shape[0])
    m = min(subsample, n)
    if not 1 <= n_clusters <= m:
        raise SpecError(f"ward: n_clusters={n_clusters} must be in 1..{m} (the subsample size)")
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(n, m, replace=False))
    sample = _take_rows(x, index)
    link = linkage(sample, method="ward")
    raw = fcluster(link, n_clusters, criterion="maxclust")
    # renumber 0.. in order of first appearance along the sample (deterministic)
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    sample_labels = rank[inverse].astype(np.int64)
    centroids = np.array([sample[sample_labels == j].mean(0)
                          for j in range(int(sample_labels.max()) + 1)])
    return WardResult(_predict(x, centroids), link, index, sample_labels, centroids)


# ------------------------------------------------------------------------------- scores


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _nmi_table(t: np.ndarray) -> float:
    hu, hv = _entropy(t.sum(1)), _entropy(t.sum(0))
    if hu == 0.0 and hv == 0.0:
        return 1.0
    if hu == 0.0 or hv == 0.0:
        return 0.0
    n = t.sum()
    nz = t > 0
    pij = t[nz] / n
    outer = np.outer(t.sum(1), t.sum(0))[nz] / (float(n) * float(n))
    mi = float((pij * np.log(pij / outer)).sum())
    return float(min(1.0, max(0.0, mi / ((hu + hv) / 2.0))))


def _ari_table(t: np.ndarray) -> float:
    n = int(t.sum())

    def comb2(v: np.ndarray) -> float:
        v = v.astype(np.float64)
        return float((v * (v - 1) / 2).sum())

    sum_ij = comb2(t)
    sum_a, sum_b = comb2(t.sum(1)), comb2(t.sum(0))
    total = n * (n - 1) / 2
    expected = sum_a * sum_b / total if total else 0.0
    maximum = (sum_a + sum_b) / 2
    if maximum == expected:  # both trivial partitions (all one cluster / all singletons)
        return 1.0
    return float((sum_ij - expected) / (maximum - expected))


def _purity_table(t: np.ndarray) -> tuple[float, np.ndarray]:
    rows = t.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(rows > 0, t.max(1) / np.maximum(rows, 1), np.nan)
    return float(t.max(0).sum() / t.sum()), per


def nmi(labels_true: Any, labels_pred: Any) -> float:
    """Normalised mutual information with **arithmetic** normalisation.

    ``NMI = I(U; V) / ((H(U) + H(V)) / 2)`` (natural logs; scikit-learn's default
    ``average_method="arithmetic"``). Both labelings constant gives 1.0, one constant 0.0.

    >>> nmi([0, 0, 1, 1], [1, 1, 0, 0])
    1.0
    """
    return _nmi_table(_contingency(np.asarray(labels_true).ravel(),
                                   np.asarray(labels_pred).ravel()))


def adjusted_rand(labels_true: Any, labels_pred: Any) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): 1 for identical partitions, about 0
    for independent ones, negative below chance.

    >>> round(adjusted_rand([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]), 6)  # 8/33
    0.242424
    """
    return _ari_table(_contingency(np.asarray(labels_true).ravel(),
                                   np.asarray(labels_pred).ravel()))


def silhouette_samples(x: Any, labels: Any) -> np.ndarray:
    """Per-row silhouette ``(b - a) / max(a, b)`` with Euclidean distances.

    ``a``: mean distance to the other members of the row's cluster, ``b``: smallest mean
    distance to another cluster; rows of a singleton cluster get 0 (Rousseeuw 1987).
    ``O(n**2)`` memory: :func:`scores` calls it on a subsample.
    """
    from scipy.spatial.distance import cdist  # type: ignore[import-untyped]

    x = np.asarray(x, dtype=np.float64)
    _, lab = np.unique(np.asarray(labels).ravel(), return_inverse=True)
    k = int(lab.max()) + 1 if lab.size else 0
    if not 2 <= k <= x.shape[0] - 1:
        raise SpecError(f"silhouette needs 2..n-1 clusters; got {k} for n={x.shape[0]}")
    dist = cdist(x, x)
    onehot = np.zeros((x.shape[0], k))
    onehot[np.arange(x.shape[0]), lab] = 1.0
    sums = dist @ onehot
    counts = onehot.sum(0)
    own = counts[lab]
    a = np.where(own > 1, sums[np.arange(x.shape[0]), lab] / np.maximum(own - 1, 1), 0.0)
    means = sums / counts[None, :]
    means[np.arange(x.shape[0]), lab] = np.inf
    b = means.min(1)
    s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return s


def purity(labels_true: Any, labels_pred: Any) -> tuple[float, dict[Any, float]]:
    """Overall purity and per-class purity.

    Overall: ``sum over clusters of (count of its majority class) / n``. Per class ``c``:
    the fraction of ``c``'s rows that fall in ``c``'s most common cluster (1.0 when a class
    is never split).

    >>> purity([0, 0, 1, 1], [0, 0, 0, 1])
    (0.75, {0: 1.0, 1: 0.5})
    """
    lt, lp = np.asarray(labels_true).ravel(), np.asarray(labels_pred).ravel()
    overall, per = _purity_table(_contingency(lt, lp))
    return overall, {c.item(): float(v) for c, v in zip(np.unique(lt), per, strict=True)}


def _ci(values: Sequence[float] | np.ndarray) -> list[float] | None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def _group_index(groups: Any, n: int) -> np.ndarray:
    """Group ids (one per row) as ``0..G-1`` in sorted order of the ids, so a group's
    number, and with it the bootstrap draws, do not depend on the order of the rows."""
    g = np.asarray(groups.compute() if _is_dask(groups) else groups).ravel()
    if g.size != n:
        raise SpecError(f"scores: groups has {g.size} rows, labels {n}: pass one group id "
                        "per row (e.g. the time index of each tile)")
    try:
        _, gi = np.unique(g, return_inverse=True)
    except TypeError as e:  # mixed types: no order
        raise SpecError(f"scores: group ids must be of one sortable type ({e})") from None
    return gi.ravel().astype(np.int64)


def _group_cells(gi: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                            np.ndarray]:
    """The distinct ``(group, cell)`` pairs with their row counts: a resample of groups
    is then one weighted ``bincount`` over at most ``n`` pairs."""
    values, ci = np.unique(cell, return_inverse=True)
    pairs, counts = np.unique(gi * values.size + ci.ravel(), return_counts=True)
    return pairs // values.size, values[pairs % values.size], counts.astype(np.float64)


def scores(labels_true: Any, labels_pred: Any, embeddings: Any = None, n_boot: int = 200,
           seed: int = 0, silhouette_sample: int = 2000,
           groups: Any = None) -> dict[str, Any]:
    """Cluster labels scored against reference labels, with bootstrap 95 % intervals.

    Returns a JSON-ready dict: ``nmi`` (arithmetic normalisation, see :func:`nmi`), ``ari``,
    ``purity`` and ``purity_per_class`` (see :func:`purity`), ``silhouette`` of
    ``labels_pred`` in ``embeddings`` (when given, on a random subsample of
    ``silhouette_sample`` rows; ``None`` when the subsample has fewer than 2 clusters),
    each point estimate with ``<name>_ci = [low, high]``: percentile bootstrap, 2.5th and
    97.5th percentiles of ``n_boot`` resamples (``None`` when ``n_boot=0``; a class missing
    from a resample gives no value to its interval). Every interval holds the clustering
    fixed. Each resample costs ``O(n)`` (one ``bincount``).

    Without ``groups`` each resample draws ``n`` rows with replacement
    (``bootstrap: "rows"``). With ``groups`` (one id per row, e.g. the time index of each
    tile: tiles of one day are correlated, so resampling rows understates the spread)
    each resample draws the ``G`` groups with replacement and takes all rows of every
    drawn group (a cluster, or block, bootstrap: ``bootstrap: "groups"``, ``n_groups:
    G``); the resample size varies. The silhouette interval resamples the subsample's
    per-row silhouette values, as rows or by the same groups. With fewer than 2 groups
    there is nothing to resample: the intervals are ``None`` and ``ci_reason`` says why
    (``ci_reason`` is ``None`` otherwise; ``silhouette_ci_reason`` likewise for the groups
    present in the silhouette subsample). Group draws are over the sorted group ids, so
    the order of the rows does not change the group intervals. Also ``n``, ``n_boot`` and
    ``nmi_normalisation: "arithmetic"``.

    Examples
    --------
    >>> s = scores([0, 0, 1, 1] * 25, [1, 1, 0, 0] * 25, n_boot=20)
    >>> s["nmi"], s["ari"], [round(v, 9) for v in s["nmi_ci"]], s["bootstrap"]
    (1.0, 1.0, [1.0, 1.0], 'rows')
    >>> days = np.repeat(np.arange(10), 10)  # ten tiles on each of ten days
    >>> s = scores([0, 1] * 50, [0, 1] * 45 + [1, 0] * 5, n_boot=20, groups=days)
    >>> s["bootstrap"], s["n_groups"], round(s["nmi"], 3), len(s["nmi_ci"])
    ('groups', 10, 0.531, 2)
    """
    lt = np.asarray(labels_true).ravel()
    lp = np.asarray(labels_pred).ravel()
    if lt.shape != lp.shape:
        raise SpecError(f"scores: labels_true has {lt.size} rows, labels_pred {lp.size}")
    n = lt.size
    if n < 2:
        raise SpecError("scores: needs at least 2 labelled rows")
    if n_boot < 0:
        raise SpecError(f"scores: n_boot={n_boot} must be >= 0")
    gi = None if groups is None else _group_index(groups, n)
    n_groups = None if gi is None else int(gi.max()) + 1
    reason = None
    if n_boot == 0:
        reason = "n_boot=0: no bootstrap"
    elif n_groups is not None and n_groups < 2:
        reason = (f"groups has {n_groups} distinct id: a group bootstrap needs at least 2 "
                  "groups; pass groups=None to resample rows")
    rng = np.random.default_rng(seed)
    classes, ti = np.unique(lt, return_inverse=True)
    _, pi = np.unique(lp, return_inverse=True)
    kt, kp = int(ti.max()) + 1, int(pi.max()) + 1
    code = ti.astype(np.int64) * kp + pi

    def table(rows: np.ndarray | None = None) -> np.ndarray:
        c = code if rows is None else code[rows]
        return np.bincount(c, minlength=kt * kp).reshape(kt, kp)

    t = table()
    overall, per = _purity_table(t)
    names = [str(c.item()) for c in classes]
    out: dict[str, Any] = {"n": int(n), "n_boot": int(n_boot), "nmi_normalisation": "arithmetic",
                           "bootstrap": "rows" if gi is None else "groups",
                           "n_groups": n_groups, "ci_reason": reason,
                           "nmi": _nmi_table(t), "ari": _ari_table(t), "purity": overall,
                           "purity_per_class": dict(zip(names, per.tolist(), strict=True))}
    n_res = 0 if reason else n_boot
    boot = np.empty((n_res, 3))
    boot_per = np.empty((n_res, kt))
    if gi is None:
        resampled = (table(rng.integers(0, n, n)) for _ in range(n_res))
    else:
        pg, pc, pn = _group_cells(gi, code)
        g = int(gi.max()) + 1

        def group_table() -> np.ndarray:
            w = np.bincount(rng.integers(0, g, g), minlength=g)
            tb = np.bincount(pc, weights=w[pg] * pn, minlength=kt * kp)
            return np.rint(tb).astype(np.int64).reshape(kt, kp)

        resampled = (group_table() for _ in range(n_res))
    for b, tb in enumerate(resampled):
        ob, pb = _purity_table(tb)
        boot[b] = _nmi_table(tb), _ari_table(tb), ob
        boot_per[b] = pb
    for j, name in enumerate(("nmi", "ari", "purity")):
        out[f"{name}_ci"] = _ci(boot[:, j])
    out["purity_per_class_ci"] = {c: _ci(boot_per[:, j]) for j, c in enumerate(names)}
    if embeddings is not None:
        _check_2d(embeddings, "embeddings")
        if embeddings.shape[0] != n:
            raise SpecError(f"scores: embeddings has {embeddings.shape[0]} rows, labels {n}")
        m = min(n, silhouette_sample)
        idx = np.sort(rng.choice(n, m, replace=False))
        out["silhouette_n"] = int(m)
        out["silhouette_ci_reason"] = reason
        if 2 <= np.unique(lp[idx]).size <= m - 1:
            s = silhouette_samples(_take_rows(embeddings, idx), lp[idx])
            out["silhouette"] = float(s.mean())
            out["silhouette_ci"] = _silhouette_ci(s, None if gi is None else gi[idx],
                                                  0 if reason else n_boot, rng, out)
        else:  # undefined for one cluster (or all singletons)
            out["silhouette"] = None
            out["silhouette_ci"] = None
    return out


def _silhouette_ci(s: np.ndarray, gs: np.ndarray | None, n_boot: int,
                   rng: np.random.Generator, out: dict[str, Any]) -> list[float] | None:
    """Bootstrap interval of the mean of per-row silhouettes ``s``: rows, or the groups
    ``gs`` of those rows (per-group sums and counts: each resample is ``O(groups)``)."""
    m = s.size
    if gs is None:
        return _ci([float(s[rng.integers(0, m, m)].mean()) for _ in range(n_boot)])
    _, gsi = np.unique(gs, return_inverse=True)
    n_sub = int(gsi.max()) + 1
    if n_boot and n_sub < 2:
        out["silhouette_ci_reason"] = (f"the silhouette subsample holds {n_sub} group: a "
                                       "group bootstrap needs at least 2")
        return None
    sums = np.bincount(gsi, weights=s, minlength=n_sub)
    counts = np.bincount(gsi, minlength=n_sub).astype(np.float64)
    means = []
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, n_sub, n_sub), minlength=n_sub)
        means.append(float(w @ sums / (w @ counts)))
    return _ci(means)


# ------------------------------------------------------------------------- multi-scale


def nmi_vs_scale(embeddings: Mapping[Any, Any], labels_true: Any | Mapping[Any, Any], k: int,
                 method: Literal["kmeans", "ward"] = "kmeans", seed: int = 0,
                 n_boot: int = 200, subsample: int = 5000,
                 pca_components: int | None = None,
                 groups: Any | Mapping[Any, Any] = None) -> list[dict[str, Any]]:
    """Document 004's scale experiment: cluster the embeddings of each tile size, score.

    ``embeddings`` maps a scale (tile size in px or km) to the ``(n, d)`` embeddings of
    the same locations at that size; ``labels_true`` is one label array for all scales or
    a mapping scale -> labels. Each scale is clustered into ``k`` clusters (``kmeans`` or
    ``ward``, optionally after PCA to ``pca_components``) and scored with :func:`scores`.
    Returns one row per scale, sorted by scale: ``scale``, ``n``, ``nmi``, ``nmi_low``,
    ``nmi_high``, ``ari``, ``ari_low``, ``ari_high`` (the bounds ``None`` when
    ``n_boot=0`` or with fewer than 2 groups), ``purity``, ``bootstrap`` and ``n_groups``.
    ``groups`` (one array for all scales or a mapping scale -> group ids, e.g. the time
    index of each tile) makes the intervals a group bootstrap, as in :func:`scores`.
    """
    rows = []
    for scale in sorted(embeddings):
        emb = embeddings[scale]
        lt = labels_true[scale] if isinstance(labels_true, Mapping) else labels_true
        feats = pca(emb, pca_components).transform(emb) if pca_components else emb
        if method == "kmeans":
            labels = kmeans(feats, k, seed=seed).labels
        elif method == "ward":
            labels = ward(feats, k, subsample=subsample, seed=seed).labels
        else:
            raise SpecError(f"nmi_vs_scale: method={method!r}: use 'kmeans' or 'ward'")
        labels = np.asarray(labels.compute() if _is_dask(labels) else labels)
        g = groups[scale] if isinstance(groups, Mapping) else groups
        s = scores(lt, labels, n_boot=n_boot, seed=seed, groups=g)
        nmi_ci = s["nmi_ci"] or [None, None]
        ari_ci = s["ari_ci"] or [None, None]
        rows.append({"scale": scale, "n": s["n"], "nmi": s["nmi"], "nmi_low": nmi_ci[0],
                     "nmi_high": nmi_ci[1], "ari": s["ari"], "ari_low": ari_ci[0],
                     "ari_high": ari_ci[1], "purity": s["purity"],
                     "bootstrap": s["bootstrap"], "n_groups": s["n_groups"]})
    return rows


# ------------------------------------------------------------------------------- labels


def rle_decode(rle: str | float | None, shape: tuple[int, int]) -> np.ndarray:
    """Decode a Kaggle run-length string into a boolean ``(height, width)`` mask.

    Pairs ``start length`` with 1-based starts over pixels numbered **column-major**
    (down the first column, then the next). An empty string, ``None`` or NaN is an
    empty mask.

    >>> rle_decode("2 2 6 1", (3, 2)).astype(int).tolist()
    [[0, 0], [1, 0], [1, 1]]
    """
    h, w = shape
    flat = np.zeros(h * w, dtype=bool)
    if rle is None or (isinstance(rle, float) and math.isnan(rle)) or not str(rle).strip():
        return flat.reshape((h, w), order="F")
    nums = np.asarray(str(rle).split(), dtype=np.int64)
    if nums.size % 2:
        raise SpecError(f"run-length string has an odd number of values: {str(rle)[:60]!r}")
    starts, lengths = nums[0::2] - 1, nums[1::2]
    if (starts < 0).any() or (lengths < 0).any() or (starts + lengths > h * w).any():
        raise SpecError(f"run-length string runs outside a {h}x{w} image: {str(rle)[:60]!r}")
    for s, n in zip(starts, lengths, strict=True):
        flat[s:s + n] = True
    return flat.reshape((h, w), order="F")


def rle_encode(mask: np.ndarray) -> str:
    """Inverse of :func:`rle_decode` (column-major, 1-based ``start length`` pairs)."""
    flat = np.concatenate([[0], np.asarray(mask, dtype=np.int8).ravel(order="F"), [0]])
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends, strict=True))


def read_understanding_clouds(csv_path: str | os.PathLike[str], image_dir: str | os.PathLike[str],
                              classes: Sequence[str] | None = None,
                              shape: tuple[int, int] | None = None) -> xr.DataArray:
    """Masks of the Kaggle "Understanding Clouds" layout as a lazy ``(image, label, y, x)``
    boolean DataArray (one dask chunk per image: the real set is ~65 GB as booleans).

    ``csv_path`` has the columns ``Image_Label,EncodedPixels`` with ``Image_Label`` =
    ``<image file>_<class>`` and run-length masks as in :func:`rle_decode`. The image size
    is read from each file's header in ``image_dir`` (or given as ``shape``); all images
    must share it. ``classes`` defaults to the classes in the CSV, sorted.
    """
    import dask
    import dask.array as da
    import xarray as xr

    rles: dict[str, dict[str, str]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"Image_Label", "EncodedPixels"} <= set(
                reader.fieldnames):
            raise SpecError(f"{csv_path}: needs the columns Image_Label,EncodedPixels")
        for row in reader:
            image, sep, cls = row["Image_Label"].rpartition("_")
            if not sep:
                raise SpecError(f"{csv_path}: Image_Label {row['Image_Label']!r} is not "
                                "'<image>_<class>'")
            rles.setdefault(image, {})[cls] = row["EncodedPixels"] or ""
    images = sorted(rles)
    labels = list(classes) if classes is not None else sorted({c for r in rles.values()
                                                               for c in r})
    if shape is None:
        from PIL import Image

        sizes = set()
        for image in images:
            with Image.open(os.path.join(image_dir, image)) as im:
                sizes.add((im.height, im.width))
        if len(sizes) != 1:
            raise SpecError(f"images in {image_dir} differ in size {sorted(sizes)}: pass shape=")
        shape = sizes.pop()
    h, w = shape

    def decode(image: str) -> np.ndarray:
        return np.stack([rle_decode(rles[image].get(c, ""), (h, w)) for c in labels])[None]

    blocks = [da.from_delayed(dask.delayed(decode)(im), (1, len(labels), h, w), dtype=bool)
              for im in images]
    data = da.concatenate(blocks, axis=0) if blocks else da.zeros((0, len(labels), h, w), bool)
    return xr.DataArray(data, dims=("image", "label", "y", "x"),
                        coords={"image": images, "label": labels}, name="mask")


def masks_to_labels(masks: xr.DataArray, label_dim: str = "label") -> xr.DataArray:
    """One class per pixel from per-class masks (e.g. :func:`read_understanding_clouds`).

    The result (``masks``' dims without ``label_dim``, int8, lazy for lazy input) is the
    index of the class along ``label_dim`` where exactly one mask is set, and -1 where none
    is or where masks overlap (the Kaggle rectangles of different classes may overlap;
    such pixels have no single label to score against). The class names are kept in the
    attribute ``flag_meanings`` (CF), their indices in ``flag_values``.
    """
    if label_dim not in masks.dims:
        raise SpecError(f"masks_to_labels: {label_dim!r} is not a dim of {masks.dims}")
    m = masks.astype(bool)
    count = m.sum(label_dim)
    index = m.argmax(label_dim)
    out = index.where(count == 1, -1).astype(np.int8)
    names = [str(v) for v in masks[label_dim].values] if label_dim in masks.coords else [
        str(i) for i in range(masks.sizes[label_dim])]
    out.attrs = {"long_name": "class of the pixel (-1: none or several)",
                 "flag_values": list(range(len(names))), "flag_meanings": " ".join(names)}
    return out.rename("label")


# -------------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def dendrogram_plot(linkage: np.ndarray, n_leaves: int | None = None,
                    example_tiles: Mapping[int, Sequence[np.ndarray]] | None = None,
                    n_examples: int = 3, path: str | os.PathLike[str] | None = None) -> Figure:
    """Dendrogram of a Ward linkage cut to ``n_leaves`` leaves, with example tiles per leaf.

    ``example_tiles`` maps a cluster label as numbered by :func:`ward` for the same
    ``n_leaves`` to a sequence of 2-D (grey) or ``(y, x, 3)`` (RGB) images; up to
    ``n_examples`` are drawn in a column under each leaf. Saved to ``path`` if given.
    """
    from scipy.cluster.hierarchy import dendrogram, fcluster  # type: ignore[import-untyped]

    plt = _pyplot()
    n_obs = linkage.shape[0] + 1
    p = n_leaves or min(n_obs, 30)
    rows = n_examples if example_tiles else 0
    fig = plt.figure(figsize=(max(6.0, 1.2 * p), 3.0 + 1.2 * rows))
    grid = fig.add_gridspec(1 + rows, p, height_ratios=[2.5] + [1.0] * rows)
    ax = fig.add_subplot(grid[0, :])
    tree = dendrogram(linkage, truncate_mode="lastp", p=p, ax=ax, no_labels=example_tiles
                      is not None, color_threshold=0)
    ax.set_ylabel("Ward distance")
    if example_tiles:
        raw = fcluster(linkage, p, criterion="maxclust")
        _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
        ward_label = np.argsort(np.argsort(first))[inverse]
        members = _leaf_members(linkage, n_obs)
        for col, node in enumerate(tree["leaves"]):
            label = int(ward_label[members(node)[0]])
            tiles = list(example_tiles.get(label, []))[:n_examples]
            for r in range(rows):
                tax = fig.add_subplot(grid[1 + r, col])
                tax.set_axis_off()
                if r < len(tiles):
                    tile = np.asarray(tiles[r])
                    tax.imshow(tile, cmap="gray" if tile.ndim == 2 else None)
                if r == 0:
                    tax.set_title(f"cluster {label}", fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def _leaf_members(linkage: np.ndarray, n_obs: int) -> Callable[[int], list[int]]:
    def members(node: int) -> list[int]:
        out, stack = [], [node]
        while stack:
            v = stack.pop()
            if v < n_obs:
                out.append(v)
            else:
                row = linkage[v - n_obs]
                stack += [int(row[0]), int(row[1])]
        return out

    return members


def pca_rgb(embeddings: Any, positions: Any, grid: tuple[Any, Any],
            pca_result: PCAResult | None = None, clip: tuple[float, float] = (2.0, 98.0),
            dims: tuple[str, str] = ("y", "x")) -> xr.DataArray:
    """A map whose colour is the first three principal components of each tile.

    ``positions (n, 2)`` are each tile's centre coordinates (``dims`` order) and ``grid``
    the two 1-D coordinate vectors of the map; each tile lands on the grid point nearest
    its centre. Components are scaled to 0..1 between the ``clip`` percentiles. Returns
    ``rgb (y, x, band)`` with NaN where no tile lies (``pca_rgb_plot`` draws it).
    """
    import xarray as xr

    emb = np.asarray(embeddings.compute() if _is_dask(embeddings) else embeddings, dtype=float)
    pos = np.asarray(positions, dtype=float)
    if pos.shape != (emb.shape[0], 2):
        raise SpecError(f"pca_rgb: positions must be (n, 2) = ({emb.shape[0]}, 2); "
                        f"got {pos.shape}")
    if emb.shape[1] < 3:
        raise SpecError("pca_rgb: embeddings need at least 3 dimensions")
    p = pca_result or pca(emb, 3)
    comps = p.transform(emb)[:, :3]
    lo, hi = np.percentile(comps, clip, axis=0)
    scaled = np.clip((comps - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
    ys, xs = (np.asarray(g, dtype=float) for g in grid)
    rgb = np.full((ys.size, xs.size, 3), np.nan)
    iy = np.abs(ys[None, :] - pos[:, :1]).argmin(1)
    ix = np.abs(xs[None, :] - pos[:, 1:]).argmin(1)
    rgb[iy, ix] = scaled
    return xr.DataArray(rgb, dims=(*dims, "band"),
                        coords={dims[0]: ys, dims[1]: xs, "band": ["pc1", "pc2", "pc3"]},
                        name="pca_rgb")


def pca_rgb_plot(rgb: xr.DataArray, path: str | os.PathLike[str] | None = None) -> Figure:
    """Draw a :func:`pca_rgb` map (NaN shown white); saved to ``path`` if given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6 * rgb.shape[0] / max(rgb.shape[1], 1) + 0.5))
    img = np.nan_to_num(np.asarray(rgb.values, dtype=float), nan=1.0)
    y, x = (np.asarray(rgb[d].values, dtype=float) for d in rgb.dims[:2])
    ax.imshow(img, origin="lower" if y.size > 1 and y[1] > y[0] else "upper",
              extent=(x.min(), x.max(), y.min(), y.max()), aspect="auto")
    ax.set_xlabel(str(rgb.dims[1]))
    ax.set_ylabel(str(rgb.dims[0]))
    ax.set_title("first three principal components as RGB")
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def nmi_vs_scale_plot(table: Sequence[Mapping[str, Any]], unit: str = "px",
                      path: str | os.PathLike[str] | None = None) -> Figure:
    """NMI (with its bootstrap 95 % interval) against tile size, from :func:`nmi_vs_scale`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    s = np.array([float(r["scale"]) for r in table])
    v = np.array([r["nmi"] for r in table])
    lo = np.array([r["nmi"] if r["nmi_low"] is None else r["nmi_low"] for r in table])
    hi = np.array([r["nmi"] if r["nmi_high"] is None else r["nmi_high"] for r in table])
    ax.errorbar(s, v, yerr=[v - lo, hi - v], marker="o", capsize=3)
    ax.set_xlabel(f"tile size ({unit})")
    ax.set_ylabel("NMI (arithmetic)")
    ax.set_ylim(0, 1)
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig

