"""engine.ml.cluster: PCA, k-means, Ward, label scores, Kaggle RLE ingest, plots.

(tests/test_cluster.py is taken by engine.cluster, the Dask cluster module.)
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest

from engine.errors import SpecError
from engine.ml import cluster as C


def _blobs(n_per: int, centres: list[tuple[float, ...]], sd: float, seed: int):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, sd, size=(n_per, len(c))) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_per)
    return x, y


# ------------------------------------------------------------------ scores: known values


def test_nmi_hand_computed_arithmetic():
    # contingency [[2, 0], [1, 1]] of n=4
    t, p = [0, 0, 1, 1], [0, 0, 0, 1]
    hu = math.log(2)
    hv = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) \
        + 0.25 * math.log(0.25 / (0.5 * 0.25))
    assert C.nmi(t, p) == pytest.approx(mi / ((hu + hv) / 2), rel=1e-12)
    # arithmetic, not geometric (sqrt) or max normalisation: those give other values
    assert C.nmi(t, p) != pytest.approx(mi / math.sqrt(hu * hv), rel=1e-6)


def test_ari_hand_computed():
    assert C.adjusted_rand([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert C.adjusted_rand([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(8 / 33)


def test_silhouette_hand_computed():
    x = np.array([[0.0], [1.0], [4.0], [5.0]])
    s = C.silhouette_samples(x, [0, 0, 1, 1])
    np.testing.assert_allclose(s, [7 / 9, 5 / 7, 5 / 7, 7 / 9])
    assert s.mean() == pytest.approx(47 / 63)
    # a singleton cluster scores 0 for its member
    s3 = C.silhouette_samples(np.array([[0.0], [1.0], [9.0]]), [0, 0, 1])
    assert s3[2] == 0.0
    assert s3[0] == pytest.approx((9 - 1) / 9)


def test_purity_hand_computed():
    overall, per = C.purity([0, 0, 0, 1, 1, 2], [5, 5, 6, 6, 6, 6])
    # cluster 5 -> majority class 0 (2), cluster 6 -> majority class 1 (2): 4 / 6
    assert overall == pytest.approx(4 / 6)
    assert per == {0: pytest.approx(2 / 3), 1: 1.0, 2: 1.0}


def test_identities_perfect_permuted_random():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 5000)
    perm = np.array([2, 0, 3, 1])
    assert C.nmi(y, perm[y]) == pytest.approx(1.0)
    assert C.adjusted_rand(y, perm[y]) == pytest.approx(1.0)
    assert C.purity(y, perm[y])[0] == 1.0
    noise = rng.integers(0, 4, 5000)
    assert C.nmi(y, noise) < 0.01
    assert abs(C.adjusted_rand(y, noise)) < 0.01
    # relabelling the prediction changes nothing
    pred = np.where(rng.random(5000) < 0.7, y, noise)
    assert C.nmi(y, pred) == pytest.approx(C.nmi(y, perm[pred]))
    assert C.adjusted_rand(y, pred) == pytest.approx(C.adjusted_rand(y, perm[pred]))
    assert 0.2 < C.nmi(y, pred) < 0.9


def test_against_scikit_learn_when_present():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 400)
    p = np.where(rng.random(400) < 0.6, y, rng.integers(0, 3, 400))
    x = rng.normal(size=(400, 3)) + y[:, None]
    assert C.nmi(y, p) == pytest.approx(metrics.normalized_mutual_info_score(y, p))
    assert C.adjusted_rand(y, p) == pytest.approx(metrics.adjusted_rand_score(y, p))
    np.testing.assert_allclose(C.silhouette_samples(x, p), metrics.silhouette_samples(x, p))


def test_scores_bootstrap_ci_contains_estimate_and_narrows():
    def noisy(n, seed):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 3, n)
        p = np.where(rng.random(n) < 0.6, y, rng.integers(0, 3, n))
        x = rng.normal(size=(n, 2)) + 2.0 * p[:, None]
        return y, p, x

    y, p, x = noisy(200, 1)
    small = C.scores(y, p, x, n_boot=200, seed=0)
    y, p, x = noisy(3000, 1)
    big = C.scores(y, p, x, n_boot=200, seed=0, silhouette_sample=1500)
    assert big["nmi_normalisation"] == "arithmetic"
    for s in (small, big):
        for name in ("nmi", "ari", "purity", "silhouette"):
            lo, hi = s[f"{name}_ci"]
            assert lo <= s[name] <= hi, name
            assert lo < hi, name
        for c, v in s["purity_per_class"].items():
            lo, hi = s["purity_per_class_ci"][c]
            assert lo <= v <= hi
    for name in ("nmi", "ari", "purity", "silhouette"):
        w_big, w_small = (s[f"{name}_ci"][1] - s[f"{name}_ci"][0] for s in (big, small))
        assert w_big < 0.7 * w_small, name
    assert big["silhouette_n"] == 1500 and small["silhouette_n"] == 200
    # same seed, same numbers
    again = C.scores(y, p, x, n_boot=200, seed=0, silhouette_sample=1500)
    assert again == big


def test_scores_bootstrap_is_the_percentile_interval_of_resampled_rows():
    rng = np.random.default_rng(4)
    y = rng.choice(["fish", "flower", "gravel", "sugar"], 300)
    p = np.where(rng.random(300) < 0.5, np.searchsorted(np.unique(y), y), rng.integers(0, 5, 300))
    s = C.scores(y, p, n_boot=60, seed=11)
    # the same resamples, scored row by row through the public functions
    again = np.random.default_rng(11)
    naive = {"nmi": [], "ari": [], "purity": [], "sugar": []}
    for _ in range(60):
        i = again.integers(0, 300, 300)
        naive["nmi"].append(C.nmi(y[i], p[i]))
        naive["ari"].append(C.adjusted_rand(y[i], p[i]))
        overall, per = C.purity(y[i], p[i])
        naive["purity"].append(overall)
        naive["sugar"].append(per["sugar"])
    for name in ("nmi", "ari", "purity"):
        np.testing.assert_allclose(s[f"{name}_ci"], np.percentile(naive[name], [2.5, 97.5]))
    np.testing.assert_allclose(s["purity_per_class_ci"]["sugar"],
                               np.percentile(naive["sugar"], [2.5, 97.5]))
    assert set(s["purity_per_class"]) == {"fish", "flower", "gravel", "sugar"}


def test_scores_without_bootstrap_or_silhouette():
    s = C.scores([0, 1, 0, 1, 2], [0, 0, 0, 0, 0], np.arange(10.0).reshape(5, 2), n_boot=0)
    assert s["nmi_ci"] is None and s["purity_per_class_ci"]["0"] is None
    assert s["silhouette"] is None and s["silhouette_ci"] is None  # one cluster: undefined
    assert s["nmi"] == 0.0 and s["purity"] == pytest.approx(2 / 5)
    table = C.nmi_vs_scale({1: np.random.default_rng(0).normal(size=(40, 3))},
                           np.arange(40) % 2, k=2, n_boot=0)
    assert table[0]["nmi_low"] is None
    C.nmi_vs_scale_plot(table)


def test_scores_rejects_mismatched_lengths():
    with pytest.raises(SpecError, match="labels_pred"):
        C.scores([0, 1, 0], [0, 1])


# ------------------------------------------------------------------------------ PCA


def test_pca_equals_svd_and_incremental_equals_batch():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1037, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6) * 10
    centred = x - x.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    whole = C.pca(x, 4)
    for got in (C.pca(x, 4, batch_size=100),
                C.pca(da.from_array(x, chunks=(97, 3)), 4),
                C.pca(iter([x[:10], x[10:500], x[500:]]), 4)):
        np.testing.assert_allclose(got.components, whole.components, atol=1e-10)
        np.testing.assert_allclose(got.explained_variance, whole.explained_variance, rtol=1e-10)
        np.testing.assert_allclose(got.mean, x.mean(0), rtol=1e-12)
        assert got.n_samples == 1037
    np.testing.assert_allclose(whole.explained_variance, sv[:4] ** 2 / (1037 - 1), rtol=1e-10)
    np.testing.assert_allclose(whole.explained_variance_ratio, sv[:4] ** 2 / (sv ** 2).sum(),
                               rtol=1e-10)
    signs = np.sign((whole.components * vt[:4]).sum(1))  # SVD signs are arbitrary
    np.testing.assert_allclose(whole.components, vt[:4] * signs[:, None], atol=1e-10)
    proj = whole.transform(x)
    np.testing.assert_allclose(proj, centred @ vt[:4].T * signs, atol=1e-9)
    lazy = whole.transform(da.from_array(x, chunks=(200, 6)))
    assert isinstance(lazy, da.Array)
    np.testing.assert_allclose(lazy.compute(), proj, atol=1e-12)


def test_pca_checks_components():
    with pytest.raises(SpecError, match="n_components"):
        C.pca(np.zeros((10, 3)), 4)


# --------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("batch_size", [64, None])
def test_kmeans_recovers_blobs(batch_size):
    x, y = _blobs(300, [(0, 0), (8, 0), (0, 8), (8, 8)], 0.7, seed=2)
    r = C.kmeans(x, 4, seed=1, batch_size=batch_size)
    assert C.adjusted_rand(y, r.labels) == 1.0
    truth = np.array([x[y == j].mean(0) for j in range(4)])
    d = np.linalg.norm(r.centers[:, None] - truth[None], axis=2)
    assert d.min(1).max() < 0.15  # each centre sits on a true mean


def test_kmeans_deterministic_and_chunking_invariant():
    x, _ = _blobs(200, [(0, 0, 0), (3, 0, 0), (0, 3, 0)], 1.2, seed=4)  # overlapping
    a = C.kmeans(x, 3, seed=7, batch_size=50)
    b = C.kmeans(x, 3, seed=7, batch_size=50)
    lazy = C.kmeans(da.from_array(x, chunks=(77, 3)), 3, seed=7, batch_size=50)
    np.testing.assert_array_equal(a.centers, b.centers)
    np.testing.assert_allclose(lazy.centers, a.centers, rtol=1e-12)
    assert isinstance(lazy.labels, da.Array)
    np.testing.assert_array_equal(lazy.labels.compute(), a.labels)
    other = C.kmeans(x, 3, seed=8, batch_size=50)
    assert not np.array_equal(other.centers, a.centers)


# ------------------------------------------------------------------------------ Ward


def test_ward_subsample_equals_full_ward_on_separable_data():
    x, y = _blobs(120, [(0, 0), (10, 0), (0, 10), (10, 10), (5, 20)], 0.8, seed=6)
    full = C.ward(x, 5, subsample=len(x), seed=0)
    sub = C.ward(x, 5, subsample=60, seed=3)
    assert sub.linkage.shape == (59, 4)
    assert sub.sample_index.size == 60 and np.unique(sub.sample_index).size == 60
    assert C.adjusted_rand(full.sample_labels, y) == 1.0  # full Ward's own labels
    assert C.adjusted_rand(sub.labels, full.sample_labels) == 1.0
    # in the subsample, nearest-centroid agrees with Ward's own cut
    np.testing.assert_array_equal(sub.labels[sub.sample_index], sub.sample_labels)
    lazy = C.ward(da.from_array(x, chunks=100), 5, subsample=60, seed=3)
    np.testing.assert_array_equal(lazy.labels.compute(), sub.labels)


def test_ward_rejects_more_clusters_than_sample():
    with pytest.raises(SpecError, match="n_clusters"):
        C.ward(np.zeros((50, 2)), 11, subsample=10)


# ----------------------------------------------------------------------- multi-scale


def test_nmi_vs_scale_ranks_informative_scale_first():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 3, 600)
    sharp = rng.normal(size=(600, 4)) * 0.3 + np.eye(4)[y] * 4   # classes separate
    blurred = rng.normal(size=(600, 4)) * 2.0 + np.eye(4)[y] * 1  # classes overlap
    noise = rng.normal(size=(600, 4))                              # no class signal
    table = C.nmi_vs_scale({256: blurred, 64: sharp, 850: noise}, y, k=3, n_boot=50)
    assert [r["scale"] for r in table] == [64, 256, 850]
    assert table[0]["nmi"] > 0.95
    assert table[0]["nmi"] > table[1]["nmi"] > table[2]["nmi"]
    assert table[2]["nmi"] < 0.05
    for r in table:
        assert r["nmi_low"] <= r["nmi"] <= r["nmi_high"] and r["n"] == 600
    fig = C.nmi_vs_scale_plot(table)
    assert len(fig.axes[0].lines) >= 1


# --------------------------------------------------------------------------- RLE / Kaggle


def test_rle_decode_known_mask_and_round_trip():
    # 3x4 image, pixels numbered down columns: 1 2 3 | 4 5 6 | 7 8 9 | 10 11 12
    mask = C.rle_decode("2 3 9 2", (3, 4))
    # "2 3": pixels 2, 3, 4 -> (1, 0), (2, 0), (0, 1); "9 2": pixels 9, 10 -> (2, 2), (0, 3)
    expected = np.array([[0, 1, 0, 1],
                         [1, 0, 0, 0],
                         [1, 0, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    assert C.rle_encode(mask) == "2 3 9 2"
    rng = np.random.default_rng(0)
    m = rng.random((17, 23)) < 0.4
    np.testing.assert_array_equal(C.rle_decode(C.rle_encode(m), m.shape), m)
    assert not C.rle_decode("", (2, 2)).any() and not C.rle_decode(float("nan"), (2, 2)).any()
    with pytest.raises(SpecError, match="outside"):
        C.rle_decode("12 2", (3, 4))


def test_read_understanding_clouds(tmp_path):
    from PIL import Image

    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (5, 4)).save(tmp_path / name)  # width 5, height 4
    fish = np.zeros((4, 5), bool)
    fish[1:3, 2:4] = True
    sugar = np.zeros((4, 5), bool)
    sugar[:, 0] = True
    sugar[3, 4] = True
    (tmp_path / "train.csv").write_text(
        "Image_Label,EncodedPixels\n"
        f"a.jpg_Fish,{C.rle_encode(fish)}\n"
        "a.jpg_Sugar,\n"
        "b.jpg_Fish,\n"
        f"b.jpg_Sugar,{C.rle_encode(sugar)}\n")
    assert C.rle_encode(fish) == "10 2 14 2"
    masks = C.read_understanding_clouds(tmp_path / "train.csv", tmp_path)
    assert masks.dims == ("image", "label", "y", "x") and masks.shape == (2, 2, 4, 5)
    assert masks.chunks is not None  # lazy: one chunk per image
    assert list(masks.label.values) == ["Fish", "Sugar"]
    np.testing.assert_array_equal(masks.sel(image="a.jpg", label="Fish"), fish)
    np.testing.assert_array_equal(masks.sel(image="b.jpg", label="Sugar"), sugar)
    assert not masks.sel(image="a.jpg", label="Sugar").any()
    assert int(masks.sum()) == fish.sum() + sugar.sum()
    labels = C.masks_to_labels(masks)
    assert labels.dims == ("image", "y", "x") and labels.chunks is not None
    labels = labels.compute()
    expected_a = np.where(fish, 0, -1)
    expected_b = np.where(sugar, 1, -1)
    np.testing.assert_array_equal(labels.sel(image="a.jpg"), expected_a)
    np.testing.assert_array_equal(labels.sel(image="b.jpg"), expected_b)
    assert labels.attrs["flag_meanings"] == "Fish Sugar"


def test_masks_to_labels_marks_overlap_as_unlabelled():
    import xarray as xr

    m = np.zeros((3, 2, 2), bool)  # (label, y, x)
    m[0, 0, :] = True
    m[1, :, 0] = True  # overlaps class 0 at (0, 0)
    m[2, 1, 1] = True
    da_ = xr.DataArray(m, dims=("label", "y", "x"), coords={"label": ["Fish", "Flower", "Sugar"]})
    np.testing.assert_array_equal(C.masks_to_labels(da_), [[-1, 0], [1, 2]])


# ----------------------------------------------------------------------------- plots


def test_dendrogram_plot_with_example_tiles(tmp_path):
    x, _ = _blobs(30, [(0, 0), (6, 0), (0, 6)], 0.5, seed=1)
    w = C.ward(x, 3, subsample=60, seed=0)
    tiles = {j: [np.full((4, 4), j, float)] * 2 for j in range(3)}
    fig = C.dendrogram_plot(w.linkage, 3, example_tiles=tiles, n_examples=2,
                            path=tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0
    titles = sorted(a.get_title() for a in fig.axes if a.get_title())
    assert titles == ["cluster 0", "cluster 1", "cluster 2"]
    # each leaf shows tiles of the cluster it is titled with
    for a in fig.axes:
        if a.get_title().startswith("cluster"):
            assert a.images[0].get_array().mean() == int(a.get_title().split()[1])


def test_pca_rgb_places_tiles_on_grid():
    rng = np.random.default_rng(2)
    ys, xs = np.arange(0.0, 50.0, 10.0), np.arange(100.0, 160.0, 20.0)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    pos = np.c_[yy.ravel(), xx.ravel()][:-1] + 0.4  # one grid point left empty
    emb = rng.normal(size=(pos.shape[0], 5))
    emb[:, 0] *= 10  # first component ~ dim 0
    rgb = C.pca_rgb(emb, pos, (ys, xs))
    assert rgb.dims == ("y", "x", "band") and rgb.shape == (5, 3, 3)
    assert np.isnan(rgb.values[-1, -1]).all()
    vals = rgb.values.reshape(-1, 3)[:-1]
    assert np.nanmin(vals) == 0.0 and np.nanmax(vals) == 1.0
    r = np.corrcoef(vals[:, 0], emb[:, 0])[0, 1]
    assert abs(r) > 0.9
    fig = C.pca_rgb_plot(rgb)
    assert fig.axes[0].images
