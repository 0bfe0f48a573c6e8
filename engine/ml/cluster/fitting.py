"""Fitting: exact chunked PCA, mini-batch / Lloyd k-means, subsampled Ward.

Every random choice is drawn from ``numpy.random.default_rng(seed)`` over *global* row
indices, so results depend on the seed and not on how the input is chunked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import SpecError
from engine.ml.cluster._arrays import _CHUNK_ROWS, _check_2d, _is_dask, _iter_chunks, _take_rows

__all__ = ["PCAResult", "pca", "KMeansResult", "kmeans", "WardResult", "ward"]


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
