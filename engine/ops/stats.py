"""Masks, train-split statistics and regression metrics as lazy reductions.

Everything here builds dask graphs; the ``compute_*`` helpers evaluate all the
reductions they need in one ``dask.compute`` call, so a statistic over a large cube is one
distributed pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dask
import numpy as np
import xarray as xr

from engine.errors import CubeError, SpecError

__all__ = [
    "check_variables",
    "valid_mask",
    "TrainStats",
    "compute_train_stats",
    "compute_metrics",
]


def check_variables(ds: xr.Dataset, names: Sequence[str], what: str = "variable") -> None:
    """Raise :class:`CubeError` naming the first of ``names`` that is not in ``ds``."""
    for name in names:
        if name not in ds.variables:
            raise CubeError(
                f"{what} {name!r} is not in the cube; its variables are "
                f"{', '.join(map(str, ds.data_vars))}"
            )


def valid_mask(ds: xr.Dataset, variables: Sequence[str], mask: str | None = None) -> xr.DataArray:
    """True where every variable is finite and (if given) the mask variable is set."""
    check_variables(ds, variables)
    ok = None
    for v in variables:
        f = np.isfinite(ds[v])
        ok = f if ok is None else ok & f
    if mask is not None:
        check_variables(ds, [mask], "mask")
        m = ds[mask]
        ok = ok & (m.fillna(0) != 0)
    return ok


@dataclass(frozen=True)
class TrainStats:
    """Statistics of the training samples only (never test or buffer cells)."""

    n: int
    mean: dict[str, float]
    std: dict[str, float]
    #: Ordinary least squares of target on [1, features], fitted on the training samples.
    ols_coef: np.ndarray
    features: tuple[str, ...]
    target: str

    def ols_predict(self, ds: xr.Dataset) -> xr.DataArray:
        """Lazy OLS prediction from the raw feature variables of ``ds``."""
        out = xr.zeros_like(ds[self.features[0]], dtype=np.float64) + self.ols_coef[0]
        for c, f in zip(self.ols_coef[1:], self.features, strict=True):
            out = out + c * ds[f].astype(np.float64)
        return out.astype(np.float32).rename("ols")


def compute_train_stats(
    ds: xr.Dataset, features: Sequence[str], target: str, where: xr.DataArray
) -> TrainStats:
    """Mean, std and the OLS normal equations over ``where`` in one distributed pass.

    Sums are accumulated in float64. The OLS solve uses the centred normal equations,
    which are well conditioned for features on very different scales (hPa vs g/kg).
    """
    names = [*features, target]
    w = where.astype(bool)
    n = w.sum()
    sums = {v: ds[v].astype(np.float64).where(w).sum() for v in names}
    sq = {}
    for i, a in enumerate(names):
        for b in names[i:]:
            sq[(a, b)] = (ds[a].astype(np.float64) * ds[b].astype(np.float64)).where(w).sum()
    n_, sums_, sq_ = dask.compute(n, sums, sq)
    n_ = int(n_)
    if n_ < len(names) + 1:
        raise SpecError(
            f"only {n_} training samples after masking and splitting; check mask, split and "
            "variables"
        )
    mean = {v: float(sums_[v]) / n_ for v in names}
    cov = np.empty((len(names), len(names)))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            key = (a, b) if (a, b) in sq_ else (b, a)
            cov[i, j] = float(sq_[key]) / n_ - mean[a] * mean[b]
    std = {v: float(np.sqrt(max(cov[i, i], 0.0))) for i, v in enumerate(names)}
    k = len(features)
    cxx, cxy = cov[:k, :k], cov[:k, k]
    slope = np.linalg.lstsq(cxx, cxy, rcond=None)[0]
    intercept = mean[target] - float(slope @ np.array([mean[f] for f in features]))
    return TrainStats(
        n=n_, mean=mean, std=std, ols_coef=np.concatenate([[intercept], slope]),
        features=tuple(features), target=target,
    )


def compute_metrics(
    truth: xr.DataArray, predictions: Mapping[str, xr.DataArray], where: xr.DataArray
) -> dict[str, dict[str, float]]:
    """RMSE, MAE, R2 and sample count for each prediction over ``where``, in one pass.

    R2 is ``1 - SSE / SST`` with SST taken about the mean of ``truth`` over ``where``.
    """
    w = where.astype(bool)
    y = truth.astype(np.float64)
    parts = {"n": w.sum(), "sy": y.where(w).sum(), "syy": (y * y).where(w).sum()}
    for name, p in predictions.items():
        e = (p.astype(np.float64) - y).where(w)
        parts[f"{name}/sse"] = (e * e).sum()
        parts[f"{name}/sae"] = abs(e).sum()
        parts[f"{name}/nan"] = (w & ~np.isfinite(p)).sum()
    (res,) = dask.compute(parts)
    n = int(res["n"])
    if n == 0:
        raise SpecError("no test samples to score: the test blocks hold no valid cells")
    sst = float(res["syy"]) - float(res["sy"]) ** 2 / n
    out = {}
    for name in predictions:
        sse, sae = float(res[f"{name}/sse"]), float(res[f"{name}/sae"])
        out[name] = {
            "rmse": float(np.sqrt(sse / n)),
            "mae": sae / n,
            "r2": 1.0 - sse / sst if sst > 0 else float("nan"),
            "n": n,
            "n_missing_predictions": int(res[f"{name}/nan"]),
        }
    return out
