"""engine.ml.cluster.scores: the group (block) bootstrap, ``groups=`` one id per row.

Tiles of one day are correlated; resampling whole days gives honest intervals where
resampling tiles gives too narrow ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import SpecError
from engine.ml import cluster as C

NAMES = ("nmi", "ari", "purity")


def _days(n_days: int = 40, per_day: int = 25, seed: int = 0):
    """Labels, predictions, embeddings and day ids where a whole day is right or wrong:
    the clustering errs by day and the embeddings shift by day, so the rows of a day are
    strongly correlated."""
    rng = np.random.default_rng(seed)
    day = np.repeat(np.arange(n_days), per_day)
    y = rng.integers(0, 3, day.size)
    good = rng.random(n_days) < 0.6
    p = np.where(good[day], y, rng.integers(0, 3, day.size))
    x = 3.0 * p[:, None] + rng.normal(0, 1.5, (n_days, 2))[day] + rng.normal(0, 0.3,
                                                                           (day.size, 2))
    return y, p, x, day


def _width(s: dict, name: str) -> float:
    lo, hi = s[f"{name}_ci"]
    return hi - lo


def test_group_intervals_are_wider_when_rows_of_a_group_are_correlated():
    y, p, x, day = _days()
    rows = C.scores(y, p, x, n_boot=200, seed=0, silhouette_sample=y.size)
    days = C.scores(y, p, x, n_boot=200, seed=0, silhouette_sample=y.size, groups=day)
    assert (rows["bootstrap"], rows["n_groups"]) == ("rows", None)
    assert (days["bootstrap"], days["n_groups"]) == ("groups", 40)
    assert days["ci_reason"] is None and days["silhouette_ci_reason"] is None
    for name in (*NAMES, "silhouette"):
        assert days[name] == rows[name], name  # the point estimates do not change
        assert _width(days, name) > 2.0 * _width(rows, name), name
        lo, hi = days[f"{name}_ci"]
        assert lo <= days[name] <= hi, name


def test_group_intervals_are_the_percentiles_of_resampled_whole_groups():
    rng = np.random.default_rng(3)
    ids = np.array([20240105, 20240101, 20240103, 20240102, 20240104, 20240106])
    g = rng.choice(ids, 240)  # unequal group sizes, rows of a group scattered
    y = rng.choice(["fish", "flower", "gravel", "sugar"], g.size)
    p = np.where(rng.random(g.size) < 0.5, np.searchsorted(np.unique(y), y),
                 rng.integers(0, 5, g.size))
    s = C.scores(y, p, n_boot=50, seed=7, groups=g)
    # the same resamples built the slow way: draw groups (numbered in sorted order of
    # their ids), concatenate their rows, score through the public functions
    again = np.random.default_rng(7)
    members = [np.flatnonzero(g == v) for v in np.unique(ids)]
    naive: dict[str, list[float]] = {"nmi": [], "ari": [], "purity": [], "sugar": []}
    sizes = set()
    for _ in range(50):
        i = np.concatenate([members[j] for j in again.integers(0, len(members), len(members))])
        sizes.add(i.size)
        naive["nmi"].append(C.nmi(y[i], p[i]))
        naive["ari"].append(C.adjusted_rand(y[i], p[i]))
        overall, per = C.purity(y[i], p[i])
        naive["purity"].append(overall)
        naive["sugar"].append(per.get("sugar", np.nan))
    assert len(sizes) > 1  # whole groups: the resample size varies
    for name in NAMES:
        np.testing.assert_allclose(s[f"{name}_ci"], np.percentile(naive[name], [2.5, 97.5]))
    sugar = np.asarray(naive["sugar"])
    np.testing.assert_allclose(s["purity_per_class_ci"]["sugar"],
                               np.percentile(sugar[np.isfinite(sugar)], [2.5, 97.5]))


def test_one_row_per_group_is_the_row_bootstrap():
    y, p, x, _ = _days(n_days=12, per_day=20, seed=1)
    n = y.size
    rows = C.scores(y, p, x, n_boot=100, seed=5, silhouette_sample=150)
    # ids already in sorted order: the very same draws
    same = C.scores(y, p, x, n_boot=100, seed=5, silhouette_sample=150, groups=np.arange(n))
    assert same["n_groups"] == n
    for name in (*NAMES, "silhouette"):
        np.testing.assert_allclose(same[f"{name}_ci"], rows[f"{name}_ci"], rtol=1e-12)
    assert same["purity_per_class_ci"] == rows["purity_per_class_ci"]
    # shuffled ids: other draws from the same distribution, so about the same widths
    shuffled = C.scores(y, p, n_boot=400, seed=6,
                        groups=np.random.default_rng(0).permutation(n) * 7)
    rows = C.scores(y, p, n_boot=400, seed=6)
    for name in NAMES:
        assert _width(shuffled, name) == pytest.approx(_width(rows, name), rel=0.25), name
        assert shuffled[f"{name}_ci"] != rows[f"{name}_ci"], name


def test_group_bootstrap_is_deterministic_per_seed():
    y, p, x, day = _days(n_days=15, per_day=10, seed=2)
    a = C.scores(y, p, x, n_boot=60, seed=3, groups=day)
    assert C.scores(y, p, x, n_boot=60, seed=3, groups=day) == a
    b = C.scores(y, p, x, n_boot=60, seed=4, groups=day)
    assert all(b[f"{name}_ci"] != a[f"{name}_ci"] for name in (*NAMES, "silhouette"))


def test_group_bootstrap_ignores_the_order_of_rows_and_the_naming_of_groups():
    y, p, x, day = _days(n_days=15, per_day=10, seed=2)
    a = C.scores(y, p, x, n_boot=80, seed=1, silhouette_sample=y.size, groups=day)
    order = np.random.default_rng(9).permutation(y.size)
    # shuffled rows, and days named by dates (an order-preserving renaming)
    dates = np.datetime64("2024-03-01") + 3 * day
    b = C.scores(y[order], p[order], x[order], n_boot=80, seed=1, silhouette_sample=y.size,
                 groups=dates[order])
    for name in NAMES:
        assert b[f"{name}_ci"] == a[f"{name}_ci"], name
    assert b["purity_per_class_ci"] == a["purity_per_class_ci"]
    # per-row silhouettes equal up to rounding, summed in another order
    np.testing.assert_allclose(b["silhouette_ci"], a["silhouette_ci"], rtol=1e-10)


def test_fewer_than_two_groups_gives_no_intervals_and_says_why():
    y, p, x, _ = _days(n_days=4, per_day=10, seed=0)
    s = C.scores(y, p, x, n_boot=50, groups=np.full(y.size, "2024-01-01"))
    assert (s["bootstrap"], s["n_groups"]) == ("groups", 1)
    assert "at least 2 groups" in s["ci_reason"]
    assert s["silhouette_ci_reason"] == s["ci_reason"]
    assert all(s[f"{name}_ci"] is None for name in (*NAMES, "silhouette"))
    assert set(s["purity_per_class_ci"].values()) == {None}
    # the point estimates are still there
    assert s["nmi"] == C.nmi(y, p) and s["silhouette"] is not None


def test_silhouette_subsample_with_one_group_gives_no_silhouette_interval():
    y, p, x, _ = _days(n_days=4, per_day=15, seed=0)
    g = np.zeros(y.size, int)
    g[-1] = 1  # the second group is one row, which a 5-row subsample misses (seed 0)
    s = C.scores(y, p, x, n_boot=30, seed=0, silhouette_sample=5, groups=g)
    assert s["nmi_ci"] is not None and s["ci_reason"] is None
    assert s["silhouette"] is not None and s["silhouette_ci"] is None
    assert "silhouette subsample holds 1 group" in s["silhouette_ci_reason"]


def test_groups_are_validated():
    with pytest.raises(SpecError, match=r"groups has 3 rows, labels 4: pass one group id") as e:
        C.scores([0, 1, 0, 1], [0, 1, 1, 1], groups=[0, 0, 1])
    assert "\n" not in str(e.value)
    with pytest.raises(SpecError, match="one sortable type"):
        C.scores([0, 1, 0, 1], [0, 1, 1, 1], groups=[0, "a", 1, None])


def test_nmi_vs_scale_passes_groups_through():
    rng = np.random.default_rng(0)
    emb = {1: rng.normal(size=(60, 3)), 2: rng.normal(size=(60, 3))}
    labels = np.arange(60) % 3
    day = np.repeat(np.arange(6), 10)
    table = C.nmi_vs_scale(emb, labels, k=3, n_boot=40, groups=day)
    assert [(r["bootstrap"], r["n_groups"]) for r in table] == [("groups", 6)] * 2
    direct = C.scores(labels, C.kmeans(emb[1], 3, seed=0).labels, n_boot=40, groups=day)
    assert [table[0]["nmi_low"], table[0]["nmi_high"]] == direct["nmi_ci"]
    # a mapping gives each scale its own groups
    table = C.nmi_vs_scale(emb, labels, k=3, n_boot=40, groups={1: day, 2: np.zeros(60)})
    assert table[0]["nmi_low"] is not None and table[1]["nmi_low"] is None
    assert table[1]["n_groups"] == 1
    assert C.nmi_vs_scale(emb, labels, k=3, n_boot=10)[0]["bootstrap"] == "rows"
