"""Masks, train-split statistics and regression metrics as lazy reductions.

Everything here builds dask graphs; the ``compute_*`` helpers evaluate all the
reductions they need in one ``dask.compute`` call, so a statistic over a large cube is one
distributed pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

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
    """True where every variable is finite and (if given) the mask variable is set.

    ``mask`` is set where it is non-zero and not NaN (a boolean, integer or float flag).
    With no variables the result is the mask alone; with neither it is an error. The
    result is a lazy boolean DataArray broadcast over the dims of all its inputs.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> ds = xr.Dataset({"a": ("x", [1.0, np.nan, 3.0, 4.0]), "land": ("x", [1, 1, 0, 1])})
    >>> valid_mask(ds, ["a"], mask="land").values.tolist()
    [True, False, False, True]
    >>> valid_mask(ds, [], mask="land").values.tolist()
    [True, True, False, True]
    """
    names = list(variables)
    if not names and mask is None:
        raise SpecError("valid_mask needs at least one variable or a mask")
    check_variables(ds, names)
    parts: list[xr.DataArray] = []
    for v in names:
        x = ds[v]
        # finiteness only means something for floats and complex numbers; integers and
        # booleans hold no NaN, times only NaT (np.isfinite refuses some of these dtypes)
        if np.issubdtype(x.dtype, np.inexact):
            parts.append(cast(xr.DataArray, np.isfinite(x)))
        elif x.dtype.kind in "mM":  # datetimes and timedeltas: NaT is missing
            parts.append(x.notnull())
        else:
            parts.append(xr.ones_like(x, dtype=bool))
    if mask is not None:
        check_variables(ds, [mask], "mask")
        m = ds[mask]
        if np.issubdtype(m.dtype, np.bool_):
            parts.append(m)
        else:
            parts.append(m.notnull() & (m != 0))
    ok = parts[0]
    for p in parts[1:]:
        ok = ok & p
    return ok.astype(bool).rename("valid")


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

    ``where`` is a boolean mask of the training cells, e.g. ``(split == 1) & valid``; only
    cells where it is True *and* every feature and the target are finite count (``n``).
    Sums are accumulated in float64. The OLS solve uses the centred normal equations,
    which are well conditioned for features on very different scales (hPa vs g/kg).
    """
    names = [*features, target]
    check_variables(ds, names)
    if not np.issubdtype(where.dtype, np.bool_):
        raise SpecError(f"where= is {where.dtype}, not boolean: pass a mask such as "
                        "(split == 1) & valid (an int8 split label of -1 would count as True)")
    # a cell counts once every value it contributes is finite, so n and the sums agree
    w = where & valid_mask(ds, names)
    n = w.sum()
    x64 = {v: ds[v].astype(np.float64).where(w) for v in names}
    sums = {v: x64[v].sum() for v in names}
    sq = {}
    for i, a in enumerate(names):
        for b in names[i:]:
            sq[(a, b)] = (x64[a] * x64[b]).sum()
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
