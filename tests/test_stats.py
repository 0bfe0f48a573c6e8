"""Masks and train statistics: only train cells count, and exactly those."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from engine.errors import CubeError, SpecError
from engine.ops.splits import block_split
from engine.ops.stats import compute_train_stats, valid_mask

FEATURES = ["t2m", "q"]
TARGET = "lst"


def _cube(seed=0):
    rng = np.random.default_rng(seed)
    shape = (4, 18, 20)
    t2m = rng.normal(280, 10, shape)
    q = rng.normal(5, 2, shape)
    lst = 2.0 + 0.9 * t2m - 1.5 * q + rng.normal(0, 1, shape)
    lst[rng.random(shape) < 0.1] = np.nan  # gaps in the target
    t2m[rng.random(shape) < 0.03] = np.inf
    land = (rng.random(shape[1:]) < 0.8).astype("f4")
    land[0, 0] = np.nan
    dims = ("time", "lat", "lon")
    ds = xr.Dataset({"t2m": (dims, t2m), "q": (dims, q.astype("f4")), "lst": (dims, lst),
                     "land": (dims[1:], land)},
                    coords={"lat": np.arange(18.0), "lon": np.arange(20.0)})
    return ds.chunk({"time": 2, "lat": 7, "lon": 8})


def _split(ds):
    return block_split(ds, {"lat": 6, "lon": 5}, 0.3, seed=4, buffer={"lat": 1, "lon": 1})


def _train_where(ds, split):
    return valid_mask(ds, [TARGET, *FEATURES], "land") & (split == 1)


def _expected_train(ds, split):
    """Train cells by numpy: split == 1, every variable finite, land set (not NaN, != 0)."""
    s = split.values[None]
    land = ds["land"].values[None]
    ok = np.broadcast_to((s == 1) & (land == 1) & ~np.isnan(land), ds[TARGET].shape)
    for v in [TARGET, *FEATURES]:
        ok = ok & np.isfinite(ds[v].values)
    return ok


def test_n_train_is_exactly_the_train_cells_and_the_statistics_are_theirs():
    ds = _cube()
    split = _split(ds)
    stats = compute_train_stats(ds, FEATURES, TARGET, _train_where(ds, split))
    ok = _expected_train(ds, split)
    assert 0 < stats.n == int(ok.sum()) < ok.size
    x = np.stack([ds[f].values[ok].astype("f8") for f in FEATURES], axis=1)
    y = ds[TARGET].values[ok]
    assert stats.mean[TARGET] == pytest.approx(y.mean(), rel=1e-12)
    assert stats.std["q"] == pytest.approx(x[:, 1].std(), rel=1e-9)
    coef = np.linalg.lstsq(np.column_stack([np.ones(len(y)), x]), y, rcond=None)[0]
    np.testing.assert_allclose(stats.ols_coef, coef, rtol=1e-8)


def _replace(ds, cells, value):
    """``ds`` with every feature and the target set to ``value`` where ``cells``."""
    out = ds.copy()
    for v in [TARGET, *FEATURES]:
        a = ds[v].values.copy()
        a[cells] = value
        out[v] = (ds[v].dims, a)
    return out.chunk({"time": 2, "lat": 7, "lon": 8})


def _stats_tuple(st):
    return (st.n, st.mean, st.std, st.ols_coef.tolist())


@pytest.mark.parametrize("label", [0, -1], ids=["test", "buffer"])
def test_test_and_buffer_values_never_reach_the_statistics(label):
    ds = _cube()
    split = _split(ds)
    ref = compute_train_stats(ds, FEATURES, TARGET, _train_where(ds, split))
    cells = np.broadcast_to(split.values[None] == label, ds[TARGET].shape)
    assert cells.sum() > 0
    changed = _replace(ds, cells, 1.0e6)
    got = compute_train_stats(changed, FEATURES, TARGET, _train_where(changed, split))
    assert _stats_tuple(got) == _stats_tuple(ref)


def test_one_train_value_changes_the_statistics():
    ds = _cube()
    split = _split(ds)
    ref = compute_train_stats(ds, FEATURES, TARGET, _train_where(ds, split))
    ok = _expected_train(ds, split)
    cell = tuple(int(i[0]) for i in np.nonzero(ok))
    one = np.zeros(ok.shape, bool)
    one[cell] = True
    changed = _replace(ds, one, 1.0e3)
    got = compute_train_stats(changed, FEATURES, TARGET, _train_where(changed, split))
    assert got.n == ref.n
    assert got.mean[TARGET] != ref.mean[TARGET]
    assert not np.allclose(got.ols_coef, ref.ols_coef)


def test_cells_with_a_missing_value_do_not_count_even_inside_where():
    ds = _cube()
    split = _split(ds)
    loose = (split == 1) & (ds["land"] == 1)  # no validity check by the caller
    st = compute_train_stats(ds, FEATURES, TARGET, loose)
    ref = compute_train_stats(ds, FEATURES, TARGET, _train_where(ds, split))
    assert _stats_tuple(st) == _stats_tuple(ref)


def test_where_must_be_boolean():
    ds = _cube()
    split = _split(ds)
    with pytest.raises(SpecError, match="not boolean"):
        compute_train_stats(ds, FEATURES, TARGET, split.broadcast_like(ds[TARGET]))


# -- valid_mask ------------------------------------------------------------------------

def test_valid_mask_with_only_a_mask():
    ds = _cube()
    got = valid_mask(ds, [], "land").values
    land = ds["land"].values
    np.testing.assert_array_equal(got, (land == 1) & ~np.isnan(land))
    assert got.dtype == bool


def test_valid_mask_needs_a_variable_or_a_mask():
    with pytest.raises(SpecError, match="at least one variable or a mask"):
        valid_mask(_cube(), [])


def test_valid_mask_dtypes_and_names():
    ds = xr.Dataset({
        "f": ("x", [1.0, np.nan, np.inf, 2.0]),
        "i": ("x", np.array([1, 2, 3, 4], "i2")),
        "b": ("x", [True, False, True, True]),
        "when": ("x", pd.to_datetime(["2020-01-01", "2020-01-02", None, "2020-01-04"])),
        "flag": ("x", [True, True, True, False]),
    })
    assert valid_mask(ds, ["i", "b"]).values.tolist() == [True] * 4
    assert valid_mask(ds, ["when"]).values.tolist() == [True, True, False, True]
    assert valid_mask(ds, ["f", "i"], "flag").values.tolist() == [True, False, False, False]
    assert valid_mask(ds, ["f"]).name == "valid"
    with pytest.raises(CubeError, match="'nope'"):
        valid_mask(ds, ["nope"])
    with pytest.raises(CubeError, match="mask 'sea'"):
        valid_mask(ds, ["f"], "sea")


def test_metrics_score_only_the_selected_cells():
    """RMSE/MAE/R2 over ``where`` only: values outside it (train blocks) never count."""
    from engine.ops.stats import compute_metrics

    rng = np.random.default_rng(3)
    truth = rng.normal(10, 3, (4, 12, 10)).astype("f4")
    pred = truth + rng.normal(0, 0.5, truth.shape).astype("f4")
    where = np.zeros(truth.shape, bool)
    where[:, :6] = True
    dims = ("time", "lat", "lon")

    def scores(p):
        t = xr.DataArray(truth, dims=dims).chunk({"time": 2})
        return compute_metrics(t, {"m": xr.DataArray(p, dims=dims).chunk({"time": 2})},
                               xr.DataArray(where, dims=dims))["m"]

    s = scores(pred)
    e = (pred - truth)[where].astype("f8")
    assert s["n"] == where.sum()
    assert s["rmse"] == pytest.approx(np.sqrt(np.mean(e ** 2)), rel=1e-6)
    assert s["mae"] == pytest.approx(np.mean(np.abs(e)), rel=1e-6)
    ss_tot = np.sum((truth[where] - truth[where].mean()) ** 2)
    assert s["r2"] == pytest.approx(1 - np.sum(e ** 2) / ss_tot, rel=1e-6)
    wild = pred.copy()
    wild[~where] += 100.0  # a terrible prediction outside the scored cells
    assert scores(wild) == s
