"""Training-data preparation: the engine's block split + streamed pixel samples vs
ml4xcube 1.1's ``assign_block_split`` + ``XrDataset.get_datasets``.

Data
    A synthetic float32 cube (:func:`engine.testing.cubes.synthetic_cube`): two gap-free
    features (``t2m``, ``ndvi``) and a target (``lst``, seed 1) with ``gaps`` of its cells
    NaN, dask-chunked and **persisted in memory** (untimed), so both methods measure
    splitting and sample cutting, not generating or reading the cube. A sample is one
    cell where the target and every feature are finite; the number of such cells is
    counted once with numpy.

Methods (both produce the train *and* the test samples of every valid cell, as float32
``(features)`` rows and target values):

``engine``
    ``block_split(ds, blocks, test_fraction, seed)`` (a lazy int8 label per cell, a pure
    function of block index and seed), then for train and test one
    :class:`engine.ml.samples.PixelSamples` ``(ds, features, target, where=(split == k) &
    valid, batch_size, shuffle=(k == 1), seed=0, cache=False)`` iterated over one epoch
    with ``iter_arrays()``: chunks are reduced to their samples on the scheduler a few
    at a time, so memory is bounded by the shuffle buffer, not the cube.
``ml4xcube``
    ``assign_block_split(ds, block_size=[("time", bt), ("lat", by), ("lon", bx)],
    split=1 - test_fraction)`` then ``XrDataset(ds, rand_chunk=False, to_pred=target,
    scale_fn=None).get_datasets()`` (its documented pixel path: ``sample_size=None``,
    ``drop_nan="auto"``) -> ``((X_train, y_train), (X_test, y_test))`` numpy arrays.
    ``scale_fn=None`` because the engine's samples are raw too (its models standardise
    with train-only statistics computed in a separate pass). Its documented default,
    ``scale_fn="standardize"`` (statistics over train + test), is timed once as an
    extra row.

Differences the API leaves: ml4xcube draws each block train with probability
``split`` (a Bernoulli per block, so the realised test share varies), the engine
assigns exactly ``round(test_fraction * n_blocks)`` test blocks. Block sizes are the
same; both read the cube in its dask chunks.

Checks (asserted): for both methods train + test samples == the valid cells and the sum
of their targets == the sum over the valid cells (float64, rtol 1e-6); the engine's
train and test counts equal the cells its split labels train/test.

Split stability: the split is computed twice from fresh objects with the same seed and
compared bit for bit (the engine also on a differently chunked cube). ml4xcube's split
has no seed argument: it draws from Python's global ``random`` at compute time, so it
is checked (a) from fresh objects, (b) computing the same object twice, (c) with
``random.seed(0)`` set before each compute.

Timing: ``engine`` and ``ml4xcube`` interleaved ``repeats`` times (median each; the
ratio is the median of the per-round ratios). Peak memory: one separate call of each
under ``_common.PeakRSS``; the ratio uses the peak *increase* over the RSS on entry (the
persisted cube and the interpreter are the same for both).

Ratios: ``prep_speed_vs_ml4xcube`` = t_ml4xcube / t_engine, ``peak_memory_vs_ml4xcube``
= peak increase of ml4xcube / peak increase of the engine.

Needs the ``bench`` extra (``pip install -c constraints.txt -e '.[bench]'``). Run
``python -m benchmarks.bench_prep [tiny|default|large] [--tag TAG]``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import random
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr

from benchmarks._common import PeakRSS, cli, machine, paired, print_ratios, timed
from engine.ml.samples import PixelSamples
from engine.ops.splits import block_split
from engine.ops.stats import valid_mask
from engine.testing.cubes import synthetic_cube

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"shape": (4, 128, 128), "chunks": (2, 64, 64), "blocks": (2, 32, 32),
             "batch": 4096, "repeats": 3},
    "default": {"shape": (24, 512, 512), "chunks": (6, 128, 128), "blocks": (6, 64, 64),
                "batch": 4096, "repeats": 5},
    "large": {"shape": (48, 1440, 1440), "chunks": (8, 360, 360), "blocks": (8, 90, 90),
              "batch": 8192, "repeats": 3},
}
DIMS = ("time", "lat", "lon")
FEATURES = ("t2m", "ndvi")
TARGET = "lst"
GAPS = 0.3
TEST_FRACTION = 0.2
SEED = 0
MiB = 2**20


def _ml4xcube() -> dict[str, Any]:
    """ml4xcube's functions; its ``splits`` module silences all warnings on import, so the
    import runs inside ``catch_warnings`` to keep that from leaking into this process."""
    try:
        with warnings.catch_warnings():
            from ml4xcube.datasets.xr_dataset import XrDataset
            from ml4xcube.splits import assign_block_split
    except ImportError as err:
        raise ImportError(
            f"bench_prep needs ml4xcube ({err}); install the benchmark extra: "
            "pip install -c constraints.txt -e '.[bench]'"
        ) from None
    return {"assign_block_split": assign_block_split, "XrDataset": XrDataset}


def _cube(cfg: dict[str, Any]) -> xr.Dataset:
    shape = dict(zip(DIMS, cfg["shape"], strict=True))
    chunks = dict(zip(DIMS, cfg["chunks"], strict=True))
    feats = synthetic_cube(shape, chunks=chunks, variables=FEATURES, seed=0)
    target = synthetic_cube(shape, chunks=chunks, variables=(TARGET,), seed=1,
                            nan_fraction=GAPS)
    ds = xr.merge([feats, target], combine_attrs="override")
    return ds.persist(scheduler="threads")  # chunks in memory: measure preparation, not I/O


def _engine_split(ds: xr.Dataset, cfg: dict[str, Any]) -> xr.DataArray:
    return block_split(ds, dict(zip(DIMS, cfg["blocks"], strict=True)),
                       test_fraction=TEST_FRACTION, seed=SEED)


def _engine(ds: xr.Dataset, cfg: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """Split, then one epoch of train samples (shuffled) and one pass of test samples."""
    split = _engine_split(ds, cfg)
    valid = valid_mask(ds, [TARGET, *FEATURES])
    out = {}
    for name, label in (("train", 1), ("test", 0)):
        samples = PixelSamples(ds, FEATURES, TARGET, where=(split == label) & valid,
                               batch_size=cfg["batch"], shuffle=label == 1, seed=0, cache=False)
        n, total = 0, 0.0
        for x, y in samples.iter_arrays():
            assert x.shape == (len(y), len(FEATURES)) and x.dtype == np.float32
            n += len(y)
            total += float(y.sum(dtype=np.float64))
        out[name] = (n, total)
    return out


def _ml4x_split(m4: dict[str, Any], ds: xr.Dataset, cfg: dict[str, Any]) -> xr.Dataset:
    return m4["assign_block_split"](ds, block_size=list(zip(DIMS, cfg["blocks"], strict=True)),
                                    split=1.0 - TEST_FRACTION)


def _ml4x(m4: dict[str, Any], ds: xr.Dataset, cfg: dict[str, Any],
          scale_fn: str | None = None) -> dict[str, tuple[int, float]]:
    """assign_block_split + XrDataset(...).get_datasets() over every chunk, in order."""
    xds = _ml4x_split(m4, ds[[*FEATURES, TARGET]], cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "set train and test data"
        sampler = m4["XrDataset"](xds, rand_chunk=False, to_pred=TARGET, scale_fn=scale_fn)
        (x_train, y_train), (x_test, y_test) = sampler.get_datasets()
    out = {}
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        assert x.shape == (len(y), len(FEATURES)), x.shape
        out[name] = (len(y), float(y.sum(dtype=np.float64)))
    return out


def _stability(m4: dict[str, Any], ds: xr.Dataset, cfg: dict[str, Any]) -> dict[str, Any]:
    """Compute each split twice (fresh objects, same seed) and compare bit for bit."""
    a = _engine_split(ds, cfg).values
    b = _engine_split(ds, cfg).values
    other = ds.chunk({d: max(1, c // 2 + 1) for d, c in zip(DIMS, cfg["chunks"], strict=True)})
    c = _engine_split(other, cfg).values
    sub = ds[[TARGET]]
    m_a = _ml4x_split(m4, sub, cfg)["split"].values
    m_b = _ml4x_split(m4, sub, cfg)["split"].values
    same = _ml4x_split(m4, sub, cfg)
    s_1, s_2 = same["split"].values, same["split"].values
    random.seed(0)
    r_1 = _ml4x_split(m4, sub, cfg)["split"].values
    random.seed(0)
    r_2 = _ml4x_split(m4, sub, cfg)["split"].values
    n_blocks = int(np.prod([-(-n // b) for n, b in zip(cfg["shape"], cfg["blocks"],
                                                        strict=True)]))
    return {
        "engine": bool(np.array_equal(a, b)),
        "engine_rechunked": bool(np.array_equal(a, c)),
        "ml4xcube": bool(np.array_equal(m_a, m_b)),
        "ml4xcube_same_object": bool(np.array_equal(s_1, s_2)),
        "ml4xcube_random_seed": bool(np.array_equal(r_1, r_2)),
        "n_blocks": n_blocks,
        "engine_test_share": float((a == 0).mean()),
        "ml4xcube_test_share": [float((m == 0).mean()) for m in (m_a, m_b)],
    }


def _peak(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    gc.collect()
    with PeakRSS() as p:
        out = fn()
    return out, p.peak_mb, p.delta_mb


def run(size: str = "default") -> dict[str, Any]:
    """Run the benchmark at ``size`` (tiny, default, large); returns the result dict."""
    cfg = SIZES[size]
    reps = cfg["repeats"]
    m4 = _ml4xcube()
    ds = _cube(cfg)

    # ground truth: valid cells and the sum of their targets, with numpy
    y = ds[TARGET].values
    ok = np.isfinite(y)
    for f in FEATURES:
        ok &= np.isfinite(ds[f].values)
    n_valid, y_sum = int(ok.sum()), float(y[ok].sum(dtype=np.float64))
    split = _engine_split(ds, cfg).values
    n_train_expected = int((ok & (split == 1)).sum())
    del y, split

    def engine() -> dict[str, tuple[int, float]]:
        return _engine(ds, cfg)

    def ml4x() -> dict[str, tuple[int, float]]:
        return _ml4x(m4, ds, cfg)

    # correctness and peak memory: one call of each, before the timing rounds
    out_e, peak_e, delta_e = _peak(engine)
    out_m, peak_m, delta_m = _peak(ml4x)
    out_s, peak_s, delta_s = _peak(lambda: _ml4x(m4, ds, cfg, scale_fn="standardize"))
    for name, out in (("engine", out_e), ("ml4xcube", out_m)):
        n = out["train"][0] + out["test"][0]
        s = out["train"][1] + out["test"][1]
        assert n == n_valid, f"{name}: {n} samples, {n_valid} valid cells"
        assert np.isclose(s, y_sum, rtol=1e-6), f"{name}: target sum {s} != {y_sum}"
    assert out_e["train"][0] == n_train_expected, (out_e["train"][0], n_train_expected)
    assert out_s["train"][0] + out_s["test"][0] == n_valid

    t_e, t_m, ratio = paired(engine, ml4x, reps)
    t_s, _, _ = timed(lambda: _ml4x(m4, ds, cfg, scale_fn="standardize"), 1)
    stable = _stability(m4, ds, cfg)

    row_bytes = (len(FEATURES) + 1) * 4
    cube_mb = sum(ds[v].nbytes for v in (*FEATURES, TARGET)) / MiB

    def row(name: str, seconds: float, out: dict, peak: float, delta: float,
            note: str) -> dict[str, Any]:
        n = out["train"][0] + out["test"][0]
        return {"name": name, "seconds": seconds, "samples_per_s": n / seconds,
                "mb_per_s": n * row_bytes / seconds / MiB, "n_train": out["train"][0],
                "n_test": out["test"][0], "test_share": out["test"][0] / n,
                "peak_mb": peak, "delta_mb": delta, "note": note}

    rows = [
        row("engine", t_e, out_e, peak_e, delta_e,
            f"block_split + PixelSamples train epoch + test pass, median of {reps}"),
        row("ml4xcube", t_m, out_m, peak_m, delta_m,
            f"assign_block_split + XrDataset(scale_fn=None).get_datasets, median of {reps}"),
        row("ml4xcube (standardize)", t_s, out_s, peak_s, delta_s,
            "its documented default scale_fn; one call"),
    ]
    return {
        "benchmark": "prep",
        "size": size,
        "machine": machine(),
        "cube": {"shape": dict(zip(DIMS, cfg["shape"], strict=True)),
                 "chunks": dict(zip(DIMS, cfg["chunks"], strict=True)),
                 "blocks": dict(zip(DIMS, cfg["blocks"], strict=True)),
                 "features": list(FEATURES), "target": TARGET, "target_gaps": GAPS,
                 "mb": cube_mb, "valid_cells": n_valid, "test_fraction": TEST_FRACTION},
        "rows": rows,
        "split_stable": {"engine": stable["engine"] and stable["engine_rechunked"],
                         "ml4xcube": stable["ml4xcube"],
                         "ml4xcube_same_object": stable["ml4xcube_same_object"],
                         "ml4xcube_random_seed": stable["ml4xcube_random_seed"]},
        "split_checks": stable,
        "ratios": {
            "prep_speed_vs_ml4xcube": ratio,
            "peak_memory_vs_ml4xcube": max(delta_m, 1.0) / max(delta_e, 1.0),
        },
        "targets": {},
        "note": ("peak ratio from the peak RSS increase over entry (floored at 1 MB); "
                 "ml4xcube's split is a Bernoulli per block drawn from Python's global "
                 "random at compute time, the engine's an exact count of test blocks "
                 "hashed from (block index, seed)"),
    }


def _print(res: dict[str, Any]) -> None:
    c = res["cube"]
    shape = "x".join(str(v) for v in c["shape"].values())
    chunks = "x".join(str(v) for v in c["chunks"].values())
    blocks = "x".join(str(v) for v in c["blocks"].values())
    print(f"prep benchmark ({res['size']}): cube {shape} ({c['mb']:.0f} MB, chunks {chunks}), "
          f"blocks {blocks}, {c['valid_cells']:,} valid cells ({c['target_gaps']:.0%} target "
          f"gaps), test_fraction {c['test_fraction']}, {res['machine']['cpus']} cores")
    print(f"{'method':24s} {'seconds':>8s} {'Msamples/s':>10s} {'MB/s':>7s} {'train':>10s} "
          f"{'test':>9s} {'test %':>6s} {'peak MB':>8s} {'+MB':>7s}  note")
    for r in res["rows"]:
        print(f"{r['name']:24s} {r['seconds']:8.3f} {r['samples_per_s'] / 1e6:10.2f} "
              f"{r['mb_per_s']:7.0f} {r['n_train']:10,d} {r['n_test']:9,d} "
              f"{100 * r['test_share']:6.1f} {r['peak_mb']:8.0f} {r['delta_mb']:7.0f}  {r['note']}")
    s = res["split_checks"]
    print(f"split bit-identical on recompute: engine {s['engine']} (rechunked cube "
          f"{s['engine_rechunked']}); ml4xcube fresh objects {s['ml4xcube']}, same object "
          f"{s['ml4xcube_same_object']}, random.seed(0) before each {s['ml4xcube_random_seed']}")
    print(f"test share of cells over {s['n_blocks']} blocks: engine {s['engine_test_share']:.3f}; "
          "ml4xcube " + ", ".join(f"{v:.3f}" for v in s["ml4xcube_test_share"]))
    print_ratios(res, lambda k: ("ml4xcube seconds / engine seconds" if k.startswith("prep")
                                 else "ml4xcube peak increase / engine peak increase")
                 + f" ({k})")


main = cli("prep", run, _print)

if __name__ == "__main__":
    main()
