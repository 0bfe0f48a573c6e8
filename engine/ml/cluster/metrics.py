"""Scores of cluster labels against reference labels, with bootstrap intervals.

NMI, adjusted Rand, silhouette and purity; :func:`scores` bundles them with percentile
bootstrap 95 % intervals over rows or whole groups (days); :func:`nmi_vs_scale` is
document 004's scale experiment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from engine.errors import SpecError
from engine.ml.cluster._arrays import _check_2d, _is_dask, _take_rows
from engine.ml.cluster.fitting import kmeans, pca, ward

__all__ = ["nmi", "adjusted_rand", "silhouette_samples", "purity", "scores", "nmi_vs_scale"]


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
