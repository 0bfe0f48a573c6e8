"""Triplet sampling in physical units (engine.ops.triplets) and the synthetic organisation
fields it is demonstrated on (engine.testing.organisation_fields)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np
import pytest
import xarray as xr
from scipy import ndimage  # type: ignore[import-untyped]

from engine.errors import CubeError, SpecError
from engine.ops.triplets import (
    augment_tiles,
    read_tiles,
    tile_pixels,
    triplet_batches,
    triplet_sampler,
)
from engine.testing.organisation_fields import CLASSES, organisation_fields


# -- synthetic organisation fields ------------------------------------------------------
def test_fields_are_seeded_per_step_and_labelled():
    a = organisation_fields(8, 64, seed=5, chunks={})
    b = organisation_fields(8, 64, seed=5)
    assert b.cloud.chunks is not None and a.cloud.chunks is None
    np.testing.assert_array_equal(a.cloud.values, b.cloud.values)
    # a step depends on (seed, step) only: the first 4 steps of a longer cube are the same
    np.testing.assert_array_equal(organisation_fields(4, 64, seed=5, chunks={}).cloud.values,
                                  a.cloud.values[:4])
    assert not np.array_equal(organisation_fields(8, 64, seed=6, chunks={}).cloud.values,
                              a.cloud.values)
    assert a["class"].values.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert a["class"].attrs["flag_meanings"].split() == list(CLASSES)
    np.testing.assert_allclose(np.diff(a.x.values), 2.0)


def _objects(field: np.ndarray) -> tuple[int, float]:
    lab, n = ndimage.label(field > 0.15)
    return n, float(np.bincount(lab.ravel())[1:].mean())


def test_classes_differ_in_object_statistics():
    ds = organisation_fields(8, 128, seed=0, chunks={})
    stats = {c: [_objects(ds.cloud.values[t]) for t in range(8) if ds["class"][t] == k]
             for k, c in enumerate(CLASSES)}
    count = {c: np.mean([s[0] for s in v]) for c, v in stats.items()}
    size = {c: np.mean([s[1] for s in v]) for c, v in stats.items()}
    # sugar: many small objects; flower: few large ones; gravel between them
    assert count["sugar"] > count["gravel"] > count["flower"]
    assert size["flower"] > size["gravel"] > size["sugar"]
    # fish: bands elongated along one direction -> anisotropic autocorrelation
    t = int(np.flatnonzero(ds["class"].values == CLASSES.index("fish"))[0])
    g = ds.cloud.values[t] - ds.cloud.values[t].mean()
    along = np.mean(g[:, 8:] * g[:, :-8])
    across = np.mean(g[8:] * g[:-8])
    assert along > 2 * across


def test_fields_resolution_scales_in_km():
    # the same km scales at 1 km spacing: objects about 4x the pixels of the 2 km field
    coarse = organisation_fields(4, 64, dx_km=2.0, seed=0, chunks={})
    fine = organisation_fields(4, 128, dx_km=1.0, seed=0, chunks={})
    k = CLASSES.index("flower")
    ratio = _objects(fine.cloud.values[k])[1] / _objects(coarse.cloud.values[k])[1]
    assert 2.0 < ratio < 8.0


# -- triplets -----------------------------------------------------------------------------
def _cube(n_time=6, size=64, dx=2.0):
    return organisation_fields(n_time, size, dx_km=dx, seed=1)


def test_tile_pixels_and_bad_sizes():
    assert tile_pixels(64, "km", 2.0) == 32
    assert tile_pixels(24, "px", 2.0) == 24
    with pytest.raises(SpecError, match="at least 2 pixels"):
        tile_pixels(1, "km", 2.0)


def test_determinism_from_seed_and_index():
    folds = np.zeros((6, 64, 64), np.int8)
    s = triplet_sampler(folds, tile=16, neighbour_km=(10.0, 30.0), dx_km=2.0, seed=3)
    a = s.sample(range(50))
    b = triplet_sampler(folds, tile=16, neighbour_km=(10.0, 30.0), dx_km=2.0,
                        seed=3).sample(range(50))
    for name in ("time", "y0", "x0", "neighbour_km", "overlap"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    # one index alone, or in another order, gives the same triplet
    r = s.sample([37, 2])
    np.testing.assert_array_equal(r.x0, a.x0[[37, 2]])
    other = triplet_sampler(folds, tile=16, neighbour_km=(10.0, 30.0), dx_km=2.0, seed=4)
    assert not np.array_equal(other.sample(range(50)).x0, a.x0)


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_worker_count_independence(workers):
    folds = np.zeros((4, 48, 48), np.int8)
    s = triplet_sampler(folds, tile=12, neighbour_km=12.0, dx_km=3.0, seed=9)
    whole = s.sample(range(40))
    shards = np.array_split(np.arange(40), workers)
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(s.sample, shards))
    np.testing.assert_array_equal(np.concatenate([p.y0 for p in parts]), whole.y0)
    np.testing.assert_array_equal(np.concatenate([p.time for p in parts]), whole.time)


def test_distances_in_km_and_overlap():
    dx, dy = 2.0, 3.0
    folds = np.zeros((3, 80, 60), np.int8)
    s = triplet_sampler(folds, tile=10, neighbour_km=15.0, dx_km=dx, dy_km=dy, seed=0)
    tr = s.sample(range(200))
    dyp = tr.y0[:, 1] - tr.y0[:, 0]
    dxp = tr.x0[:, 1] - tr.x0[:, 0]
    km = np.hypot(dyp * dy, dxp * dx)
    np.testing.assert_allclose(tr.neighbour_km, km)
    # rounding to whole pixels moves a neighbour by at most half a pixel per axis
    assert np.all(np.abs(km - 15.0) <= math.hypot(dx, dy) / 2 + 1e-9)
    expect = np.clip(10 - np.abs(dyp), 0, None) * np.clip(10 - np.abs(dxp), 0, None) / 100
    np.testing.assert_allclose(tr.overlap, expect)
    assert (tr.time[:, 0] == tr.time[:, 1]).all()
    assert (tr.time[:, 2] != tr.time[:, 0]).all()  # other_time
    assert np.isnan(tr.distant_km).all()


def test_min_distance_rule():
    folds = np.zeros((2, 64, 64), np.int8)
    s = triplet_sampler(folds, tile=8, neighbour_km=8.0, distant="min_distance",
                        min_distance_km=60.0, dx_km=1.0, seed=2)
    tr = s.sample(range(300))
    same = tr.time[:, 2] == tr.time[:, 0]
    assert same.any() and (~same).any()
    d = np.hypot(tr.y0[same, 2] - tr.y0[same, 0], tr.x0[same, 2] - tr.x0[same, 0])
    assert (d >= 60.0).all()
    np.testing.assert_allclose(tr.distant_km[same], d)


def test_folds_never_straddled_and_anchors_uniform():
    t, n, tile = 4, 40, 8
    folds = np.zeros((t, n, n), np.int8)
    folds[:, :, 20:] = 1  # left half fold 0, right half fold 1
    folds[1, :, :] = 1    # step 1 wholly fold 1
    folds[:, 10:13, :] = -1  # an unusable strip
    holes = np.random.default_rng(0).random(folds.shape) < 0.004
    folds[holes] = -1  # single unusable pixels: a tile holding one is in no fold
    # neighbours 10 px away: an anchor near x = 20 could reach wholly into the other fold
    s = triplet_sampler(folds, tile=tile, neighbour_km=10.0, dx_km=1.0, seed=0)
    for f in (0, 1):
        tr = s.sample(range(400), fold=f)
        for k in range(3):
            for j in range(len(tr)):
                win = folds[tr.time[j, k], tr.y0[j, k]:tr.y0[j, k] + tile,
                            tr.x0[j, k]:tr.x0[j, k] + tile]
                assert (win == f).all()

    # uniform anchors: each valid position of fold 0 equally likely (chi-square-ish bound)
    # where every position has a neighbour at the distance (no anchor is redrawn)
    folds = np.zeros((t, n, n), np.int8)
    folds[:, :, 20:] = 1
    folds[1, :, :] = 1
    s = triplet_sampler(folds, tile=tile, neighbour_km=4.0, dx_km=1.0, seed=0)
    tr = s.sample(range(6000), fold=0)
    n_pos = s.n_positions(0)
    flat = np.ravel_multi_index((tr.time[:, 0], tr.y0[:, 0], tr.x0[:, 0]), s.tile_fold.shape)
    assert set(flat) <= set(s.positions[0].tolist())
    counts = np.bincount(np.searchsorted(s.positions[0], flat), minlength=n_pos)
    expect = 6000 / n_pos
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < n_pos + 5 * math.sqrt(2 * n_pos)


def test_impossible_neighbour_is_one_line():
    folds = np.zeros((2, 20, 20), np.int8)
    s = triplet_sampler(folds, tile=8, neighbour_km=100.0, dx_km=1.0)
    with pytest.raises(CubeError, match="no neighbour tile in fold 0 at 100-100 km"):
        s.sample([0])
    with pytest.raises(SpecError, match="two time steps"):
        triplet_sampler(folds[:1], tile=8, neighbour_km=4.0, dx_km=1.0)


def test_read_tiles_chunk_aware_and_equal_to_numpy():
    ds = _cube()
    da = ds.cloud
    s = triplet_sampler(xr.zeros_like(da, dtype=np.int8).compute(), tile=16,
                        neighbour_km=20.0, seed=0)
    assert (s.dy_km, s.dx_km) == (2.0, 2.0)
    tr = s.sample(range(8))
    t, y, x = tr.time.ravel(), tr.y0.ravel(), tr.x0.ravel()
    calls = []

    def counting(dsk, keys, **kw):
        calls.append(1)
        return dask.get(dsk, keys, **kw)

    lazy = read_tiles(da, t, y, x, 16, scheduler=counting)
    assert len(calls) == 1  # one compute for the whole batch
    ref = da.values
    want = np.stack([ref[a, b:b + 16, c:c + 16] for a, b, c in zip(t, y, x, strict=True)])
    np.testing.assert_array_equal(lazy[:, 0], want)


def test_batches_stack_triplets_and_augment_per_tile():
    da = _cube().cloud
    s = triplet_sampler(np.zeros(da.shape, np.int8), tile=16, neighbour_km=16.0, dx_km=2.0,
                        seed=0)
    plain = list(triplet_batches(da, s, range(10), batch_size=4, augment=False))
    assert [b[0].shape for b in plain] == [(4, 3, 1, 16, 16)] * 2 + [(2, 3, 1, 16, 16)]
    tr = s.sample(range(10))
    np.testing.assert_allclose(np.concatenate([b[1] for b in plain]), tr.overlap)
    np.testing.assert_array_equal(
        plain[0][0][1, 2, 0], da.values[tr.time[1, 2], tr.y0[1, 2]:tr.y0[1, 2] + 16,
                                        tr.x0[1, 2]:tr.x0[1, 2] + 16])
    aug0 = np.concatenate([b[0] for b in triplet_batches(da, s, range(10), batch_size=4)])
    aug0b = np.concatenate([b[0] for b in triplet_batches(da, s, range(10), batch_size=3)])
    aug1 = np.concatenate([b[0] for b in triplet_batches(da, s, range(10), batch_size=4,
                                                         epoch=1)])
    np.testing.assert_array_equal(aug0, aug0b)  # independent of batching
    assert not np.array_equal(aug0, aug1)  # new flips/rotations per epoch
    raw = np.concatenate([b[0] for b in plain])
    # augmentation permutes pixels within each tile, never mixes tiles
    np.testing.assert_allclose(np.sort(aug0.reshape(30, -1), 1), np.sort(raw.reshape(30, -1), 1))
    assert not np.array_equal(aug0, raw)


def test_augment_is_dihedral():
    t = np.random.default_rng(0).normal(size=(64, 1, 5, 5))
    out = augment_tiles(t, np.random.default_rng(1))
    group = [np.rot90(t[0], k, axes=(-2, -1)) for k in range(4)]
    group += [g[..., ::-1] for g in group]
    for j in range(64):
        cands = [np.rot90(t[j], k, axes=(-2, -1)) for k in range(4)]
        cands += [c[..., ::-1] for c in cands]
        assert any(np.array_equal(out[j], c) for c in cands)
    assert len({out[j].tobytes() == t[j].tobytes() for j in range(64)}) == 2
