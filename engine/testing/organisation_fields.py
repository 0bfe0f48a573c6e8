"""Synthetic cloud-organisation fields with known classes (issue 12, section 6).

Document 004 names four patterns of shallow trade-wind clouds (Stevens et al. 2019) that
differ in texture and object statistics; this generator draws one seeded field per time
step with one of four analogous classes, so an embedding or a metric can be scored against
labels that are known by construction:

``sugar``
    many small, faint, scattered cells (Poisson points smoothed by about one pixel).
``flower``
    few large, bright, round patches in clusters, with wide clear gaps between them.
``fish``
    elongated bands: white noise smoothed anisotropically along one drawn direction.
``gravel``
    mid-size cells packed densely, with ring-shaped edges (cold-pool arcs: a difference of
    Gaussians of Poisson points).

The field is a reflectance-like ``cloud`` variable in [0, 1] on ``(time, y, x)`` with
physical coordinates in km, and ``class`` (``time``) holds each step's class as CF flags.
Everything is numpy and :func:`scipy.ndimage.gaussian_filter`; a step depends only on
``(seed, step)``, so any subset of steps is reproducible on its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage  # type: ignore[import-untyped]

from engine.errors import SpecError

__all__ = ["CLASSES", "organisation_field", "organisation_fields"]

#: The classes in label order (``class`` value = index here).
CLASSES: tuple[str, ...] = ("sugar", "flower", "fish", "gravel")


def _points(rng: np.random.Generator, shape: tuple[int, int], per_px: float) -> np.ndarray:
    """A Poisson point field: counts per pixel with mean ``per_px``."""
    return rng.poisson(per_px, size=shape).astype(np.float64)


def _normalise(f: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(f, [1.0, 99.9])
    return np.clip((f - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)


def _cloud(f: np.ndarray, cover: float, brightness: float) -> np.ndarray:
    """Threshold ``f`` so that about ``cover`` of the domain is cloudy, with soft edges;
    cloud reflectance scales to ``brightness``."""
    thr = np.quantile(f, 1.0 - cover)
    width = max(float(np.std(f)) * 0.25, 1e-9)
    return brightness * np.clip((f - thr) / width, 0.0, 1.0) * _normalise(f)


def _sugar(rng: np.random.Generator, shape: tuple[int, int], px: float) -> np.ndarray:
    f = ndimage.gaussian_filter(_points(rng, shape, 0.02), 0.9 / px * 2.0, mode="wrap")
    return _cloud(f, 0.22, 0.45)


def _flower(rng: np.random.Generator, shape: tuple[int, int], px: float) -> np.ndarray:
    ny, nx = shape
    area_km2 = ny * nx * px * px
    n_clusters = max(1, int(rng.poisson(area_km2 / 40000.0)) + 1)
    f = np.zeros(shape)
    for _ in range(n_clusters):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        for _ in range(int(rng.integers(2, 5))):
            y = int(cy + rng.normal(0, 12.0 / px)) % ny
            x = int(cx + rng.normal(0, 12.0 / px)) % nx
            f[y, x] += rng.uniform(0.7, 1.3)
    f = ndimage.gaussian_filter(f, 9.0 / px, mode="wrap")
    f += 0.02 * f.max() * ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
    return _cloud(f, 0.18, 0.9)


def _fish(rng: np.random.Generator, shape: tuple[int, int], px: float) -> np.ndarray:
    angle = float(rng.uniform(-30.0, 30.0))
    pad = max(shape)
    big = (shape[0] + 2 * pad, shape[1] + 2 * pad)
    noise = ndimage.gaussian_filter(rng.normal(size=big), (3.0 / px, 24.0 / px), mode="wrap")
    noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="wrap")
    f = noise[pad:pad + shape[0], pad:pad + shape[1]]
    return _cloud(f, 0.3, 0.75)


def _gravel(rng: np.random.Generator, shape: tuple[int, int], px: float) -> np.ndarray:
    pts = _points(rng, shape, 0.012 * px * px / 4.0)
    inner = ndimage.gaussian_filter(pts, 2.5 / px, mode="wrap")
    outer = ndimage.gaussian_filter(pts, 5.0 / px, mode="wrap")
    f = np.maximum(outer - 0.6 * inner, 0.0) + 0.15 * inner
    return _cloud(f, 0.4, 0.6)


_DRAW = {"sugar": _sugar, "flower": _flower, "fish": _fish, "gravel": _gravel}


def organisation_field(cls: str, shape: tuple[int, int], *, dx_km: float = 2.0,
                       seed: int = 0, step: int = 0) -> np.ndarray:
    """One ``(y, x)`` float32 field of class ``cls``, from ``(seed, step)`` only.

    Clear sky is a dark ocean of about 0.05 with a little sensor noise; clouds are brighter.

    >>> a = organisation_field("fish", (64, 64), seed=1)
    >>> a.shape, a.dtype, bool((a >= 0).all() and (a <= 1).all())
    ((64, 64), dtype('float32'), True)
    >>> bool((a == organisation_field("fish", (64, 64), seed=1)).all())
    True
    """
    if cls not in _DRAW:
        raise SpecError(f"class {cls!r}: use one of {list(CLASSES)}")
    if not dx_km > 0:
        raise SpecError(f"dx_km must be > 0, got {dx_km}")
    rng = np.random.default_rng([seed, step, CLASSES.index(cls)])
    # the smoothing scales are in km: px converts them to pixels (2 km is the reference)
    cloud = _DRAW[cls](rng, shape, dx_km / 2.0)
    noise = rng.normal(0.0, 0.01, size=shape)
    return np.clip(0.05 + cloud + noise, 0.0, 1.0).astype(np.float32)


def organisation_fields(n_time: int = 8, size: int | tuple[int, int] = 128, *,
                        dx_km: float = 2.0, seed: int = 0,
                        classes: tuple[str, ...] = CLASSES,
                        chunks: dict[str, int] | None = None) -> xr.Dataset:
    """A cube of synthetic organisation fields: one class per time step, cycling through
    ``classes`` in order (step ``t`` has class ``classes[t % len(classes)]``).

    Parameters
    ----------
    n_time
        Time steps (daily from 2020-01-01).
    size
        Pixels ``ny`` (and ``nx``): an int for a square domain or ``(ny, nx)``.
    dx_km
        Grid spacing in km (both directions); coordinates are cell centres in km.
    seed
        Step ``t`` depends on ``(seed, t)`` only.
    classes
        Subset and order of :data:`CLASSES`.
    chunks
        Dask chunks of the result; None (default): one time step per chunk; ``{}``:
        numpy arrays.

    Returns
    -------
    xarray.Dataset
        ``cloud (time, y, x)`` float32 and ``class (time)`` int8 (``flag_values`` and
        ``flag_meanings`` name the classes by their index in :data:`CLASSES`).

    Examples
    --------
    >>> ds = organisation_fields(4, 32, dx_km=1.0, seed=3)
    >>> dict(ds.sizes), ds["class"].values.tolist(), float(ds.x[1] - ds.x[0])
    ({'time': 4, 'y': 32, 'x': 32}, [0, 1, 2, 3], 1.0)
    >>> ds.x.attrs["units"], ds.cloud.chunks[0]
    ('km', (1, 1, 1, 1))
    """
    ny, nx = (size, size) if isinstance(size, int) else size
    if n_time < 1 or ny < 8 or nx < 8:
        raise SpecError(f"need n_time >= 1 and at least 8 x 8 pixels, got {n_time} x "
                        f"{ny} x {nx}")
    bad = [c for c in classes if c not in CLASSES]
    if bad or not classes:
        raise SpecError(f"classes {bad or '[]'}: use some of {list(CLASSES)}")
    labels = np.array([CLASSES.index(classes[t % len(classes)]) for t in range(n_time)],
                      dtype=np.int8)
    cloud = np.stack([organisation_field(CLASSES[c], (ny, nx), dx_km=dx_km, seed=seed, step=t)
                      for t, c in enumerate(labels)])
    coord: dict[str, Any] = {
        "time": ("time", np.datetime64("2020-01-01", "ns")
                 + np.arange(n_time) * np.timedelta64(1, "D")),
        "y": ("y", (np.arange(ny) + 0.5) * dx_km,
              {"units": "km", "standard_name": "projection_y_coordinate", "axis": "Y"}),
        "x": ("x", (np.arange(nx) + 0.5) * dx_km,
              {"units": "km", "standard_name": "projection_x_coordinate", "axis": "X"}),
    }
    ds = xr.Dataset(
        {"cloud": (("time", "y", "x"), cloud,
                   {"long_name": "synthetic cloud reflectance", "units": "1",
                    "valid_range": [0.0, 1.0]}),
         "class": ("time", labels,
                   {"long_name": "organisation class of the time step",
                    "flag_values": list(range(len(CLASSES))),
                    "flag_meanings": " ".join(CLASSES)})},
        coords=coord,
        attrs={"title": "synthetic cloud-organisation fields",
               "source": f"engine.testing.organisation_fields (seed={seed}, dx_km={dx_km})"})
    if chunks is None:
        chunks = {"time": 1}
    return ds.chunk(chunks) if chunks else ds
