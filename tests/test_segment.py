"""kind: segment -- geographic folds without leakage, scores, areas, and the shipped job end to
end on a reduced (2-degree) copy of the committed land-cover cube."""

import json
import os

import numpy as np
import pytest
import xarray as xr
import zarr

from engine.errors import SpecError
from engine.pipelines._segcommon import binary_scores, geo_folds
from engine.pipelines.segment import cell_area_km2
from engine.pipelines.spec import load_job
from tests._segfixtures import run_folder, run_small

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "segment-snowice.yaml")
FULL = os.path.join(ROOT, "jobs", "segment-snowice-full.yaml")

# the shipped job shrunk to seconds: 2-degree grid, 8-cell patches, one epoch per fold
SMALL = ["--set", "patches.size=8", "--set", "patches.stride=4", "--set", "split.buffer=8",
         "--set", "model.base=8", "--set", "model.depth=1", "--set", "train.epochs=3",
         "--set", "train.patience=2", "--set", "patches.random_share=0.2"]


# -- folds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k,buffer,size", [(5, 8, 8), (4, 12, 8), (3, 5, 5)])
def test_folds_leave_no_training_cell_within_the_buffer_of_a_test_sector(k, buffer, size):
    n = 90
    ds = xr.Dataset({"l": (("lat", "lon"), np.zeros((10, n), np.uint8))},
                    coords={"lat": np.arange(10.0), "lon": np.linspace(-178, 178, n)})
    _, x, folds = geo_folds(ds, "l", k, buffer, 0.2, size)
    covered = np.zeros(n, int)
    for f in folds:
        covered += f.test
        assert not (f.train & f.test).any() and not (f.val & f.test).any()
        assert not (f.train & f.val).any()
        test_idx = np.flatnonzero(f.test)
        for j in np.flatnonzero(f.train | f.val):
            # periodic distance to the test sector (the dateline wraps)
            d = np.min(np.minimum((test_idx - j) % n, (j - test_idx) % n))
            assert d > buffer, (f.number, j, d)
        # a training patch (wholly inside train) therefore never reaches the test sector
        assert f.hi - f.lo == len(test_idx)  # contiguous
    assert (covered == 1).all()  # every cell tested exactly once


def test_folds_refuse_a_patch_that_cannot_fit():
    ds = xr.Dataset({"l": (("lat", "lon"), np.zeros((4, 20), np.uint8))},
                    coords={"lat": np.arange(4.0), "lon": np.arange(20.0)})
    with pytest.raises(SpecError, match="no run of 24 cells"):
        geo_folds(ds, "l", 5, 12, 0.2, 12)


def test_binary_scores_and_cell_areas():
    s = binary_scores(tp=30, fp=10, fn=5, tn=55)
    assert s["iou"] == pytest.approx(30 / 45) and s["recall"] == pytest.approx(30 / 35)
    assert np.isnan(binary_scores(0, 0, 0, 10)["iou"])
    lat = np.arange(89.75, -90, -0.5)
    total = cell_area_km2(lat, 0.5).sum() * 720
    assert total == pytest.approx(4 * np.pi * 6371.0088**2, rel=1e-9)  # the whole sphere
    assert cell_area_km2(np.array([60.0, 59.5]), 0.5)[0] < cell_area_km2(
        np.array([0.0, 0.5]), 0.5)[0] * 0.51


def test_spec_checks_are_one_line():
    with pytest.raises(SpecError, match="split.buffer"):
        load_job(JOB, ["split.buffer=4"])
    with pytest.raises(SpecError, match="divisible"):
        load_job(JOB, ["patches.size=30"])
    for bad in ("[]", "[15, 15]", "[255]"):
        with pytest.raises(SpecError, match="label.classes"):
            load_job(JOB, [f"label.classes={bad}"])
    spec = load_job(JOB, ["label.classes=[0]"])
    assert spec.label.classes == [0] and spec.kind == "segment"
    full = load_job(FULL)
    assert full.patches.size == 256 and full.input.entry == "landcover_0p05"


# -- the shipped job end to end ---------------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory, small_landcover):
    out = tmp_path_factory.mktemp("seg") / "seg.zarr"
    assert run_small(JOB, out, small_landcover, *SMALL) == 0
    return out, small_landcover


def test_shipped_job_on_a_reduced_grid(small_run):
    out, _ = small_run
    ds = xr.open_zarr(out)
    assert set(ds.data_vars) == {"label", "probability", "fold"}
    assert dict(ds.sizes) == {"lat": 90, "lon": 180}
    prob = ds["probability"].values
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1
    fold = ds["fold"].values
    assert set(np.unique(fold)) == set(range(5))          # every pixel has a fold
    assert (fold == fold[0]).all()                         # folds are longitude sectors
    assert ds["label"].attrs["flag_meanings"] == "other permanent_snow_and_ice"
    assert ds.attrs["engine_job_kind"] == "segment" and len(ds.attrs["engine_model_hash"]) == 64
    split = json.loads(ds.attrs["engine_split"])
    assert split["k"] == 5 and split["buffer"] == 8
    run = run_folder(out)
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert [r["fold"] for r in m["folds"]] == list(range(5))
    for r in m["folds"]:
        assert set(r) >= {"fold", "accuracy", "iou", "precision", "recall", "f1", "n_pixels"}
    assert sum(r["n_pixels"] for r in m["folds"]) == 90 * 180
    # the scores are those of the written maps, recomputed here
    lab, pred = ds["label"].values == 1, prob >= 0.5
    for r in m["folds"]:
        sel = fold == r["fold"]
        tp = int((lab & pred & sel).sum())
        fp, fn = int((~lab & pred & sel).sum()), int((lab & ~pred & sel).sum())
        assert r["iou"] == pytest.approx(tp / (tp + fp + fn)) if tp + fp + fn else True
    ious = [r["iou"] for r in m["folds"]]
    assert m["summary"]["iou"]["mean"] == pytest.approx(np.nanmean(ious))
    assert m["summary"]["iou"]["mean"] > 0.5  # snow and ice are learnt in three epochs
    bands = m["area_km2"]["bands"]
    assert len(bands) == 6
    total = sum(b["labelled_km2"] for b in bands)
    assert total == pytest.approx(m["area_km2"]["total"]["labelled_km2"])
    assert bands[0]["labelled_km2"] > 0.8 * total                    # Antarctica
    assert all(os.path.exists(os.path.join(run, f"map_fold{i}.png")) for i in range(5))
    assert m["throughput"]["train_samples_per_s"] > 0


def test_resume_reuses_the_fold_models_and_skips_written_regions(small_run):
    out, cat = small_run
    before = xr.open_zarr(out)["probability"].values
    assert run_small(JOB, out, cat, *SMALL) == 0
    m = json.load(open(os.path.join(run_folder(out), "metrics.json")))
    assert m["throughput"]["trained"] is False or m["throughput"].get("resumed_runs")
    np.testing.assert_array_equal(xr.open_zarr(out)["probability"].values, before)


def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, run_cli):
    out = tmp_path / "x.zarr"
    for override in (["--set", "label.classes=[99]"], ["--set", "features=[red, nope]"],
                     ["--set", "patches.size=1024"]):
        code, _, err = run_cli(["run", JOB, "--cluster", "threads", "--output", str(out),
                                *override])
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not (tmp_path / "x.run").exists()


def test_output_store_is_zarr_v3(small_run):
    out, _ = small_run
    assert zarr.open_group(str(out), mode="r").metadata.zarr_format == 3


@pytest.mark.skipif(os.path.exists(os.path.join(ROOT, "catalogs", "data", "landcover_0p05.zarr")),
                    reason="the 0.05-degree cube exists here")
def test_missing_full_resolution_cube_names_the_command_that_makes_it(run_cli):
    code, _, err = run_cli(["validate", FULL])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "python -m engine.io.landcover --resolution 0.05" in err


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a 2-core machine shared with other work can take 3x longer
def test_shipped_job_as_shipped_learns_snow_and_ice(tmp_path, run_cli):
    """The CPU job at full size (about 2 minutes on 2 cores): document 003's layout with
    IoU near its 0.83 +- 0.05."""
    code, out, err = run_cli(["run", JOB, "--output", str(tmp_path / "s.zarr")])
    assert code == 0, err
    m = json.load(open(tmp_path / "s.run" / "metrics.json"))
    assert m["summary"]["iou"]["mean"] > 0.7 and m["summary"]["recall"]["mean"] > 0.9
    assert "mean" in out and "std" in out
