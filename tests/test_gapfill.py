"""The gap-filling job end to end on the real demo cube (default tier), on a real
multi-process LocalCluster, through the CLI."""

import json
import os

import numpy as np
import pytest
import xarray as xr
import yaml

from engine._cli.main import main
from engine.io.writer import read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_file(tmp_path, name, **changes):
    data = yaml.safe_load(open(os.path.join(ROOT, "jobs", name)))
    data["input"]["catalog"] = os.path.join(ROOT, "catalogs", "demo.yaml")
    data["output"]["url"] = str(tmp_path / "out" / "filled.zarr")
    for k, v in changes.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    p = tmp_path / f"job-{name}"
    p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlp")
    job = job_file(tmp, "gapfill.yaml")
    report = str(tmp / "report.html")
    assert main(["run", job, "--cluster", "local", "--n-workers", "2", "--quiet",
                 "--report", report]) == 0
    return tmp, job


def test_mlp_beats_least_squares_and_mean(mlp_run):
    tmp, _ = mlp_run
    m = json.load(open(tmp / "out" / "filled.run" / "metrics.json"))
    t = m["test"]
    assert t["model"]["rmse"] < t["ols"]["rmse"] < t["train_mean"]["rmse"]
    assert m["comparison"]["model_beats_ols"] and m["comparison"]["model_beats_train_mean"]
    assert t["model"]["n_missing_predictions"] == 0
    assert t["model"]["r2"] > 0.98


def test_output_store_contents_and_provenance(mlp_run):
    tmp, _ = mlp_run
    ds = xr.open_zarr(tmp / "out" / "filled.zarr")
    for v in ("SST", "SST_predicted", "SST_filled", "filled_flag", "split", "ocean_mask"):
        assert v in ds
    sst, filled, flag = ds.SST.values, ds.SST_filled.values, ds.filled_flag.values
    obs = np.isfinite(sst)
    np.testing.assert_array_equal(filled[obs], sst[obs])  # observed values untouched
    assert (flag == 1).sum() > 500 and np.isfinite(filled[flag == 1]).all()
    assert not (flag.astype(bool) & (ds.ocean_mask.values[None] == 0)).any()
    for key in ("engine_job_spec", "engine_code_version", "engine_model_hash", "engine_seed",
                "engine_split", "engine_catalog", "engine_catalog_entry"):
        assert key in ds.attrs, key
    split = json.loads(ds.attrs["engine_split"])
    assert split["split_seed"] == 0 and split["split_n_test_blocks"] > 0
    for f in ("metrics.json", "map.png", "loss.png", "best.pt"):
        assert (tmp / "out" / "filled.run" / f).stat().st_size > 0
    assert (tmp / "report.html").exists() and (tmp / "report.html.json").exists()
    html = (tmp / "report.html").read_text()
    assert "cdn.bokeh.org" not in html and "Bokeh" in html  # renders without internet


def test_throughput_summary_per_worker(mlp_run):
    """The run's summary has both phases with one row per worker process, and the
    per-worker counts add up to the phase totals and to the cube."""
    tmp, _ = mlp_run
    rep = json.load(open(tmp / "report.html.json"))
    phases = rep["phases"]
    assert set(phases) == {"train", "predict+write"}
    train, pw = phases["train"], phases["predict+write"]
    assert len(train["workers"]) == 2 and 1 <= len(pw["workers"]) <= 2
    assert train["total"]["patches"] > 0 and train["total"]["mb_per_s_read"] > 0
    cells = 12 * 90 * 180  # the demo cube's (month, lat, lon)
    assert pw["total"]["output_pixels"] == cells
    assert sum(w["output_pixels"] for w in pw["workers"].values()) == cells
    assert pw["total"]["mb_written"] == pytest.approx(rep["bytes_written"] / 1e6)
    assert all(0 <= w["busy_share"] <= 1.0 for w in pw["workers"].values())


def test_no_fill_outside_the_training_range(mlp_run):
    """Predictions outside what the training data supports are flagged (2), counted and
    left unfilled; every written fill lies inside the training target range."""
    tmp, _ = mlp_run
    m = json.load(open(tmp / "out" / "filled.run" / "metrics.json"))
    lo, hi = m["fill_valid_range"]
    assert [lo, hi] == m["training_target_range"]  # fill_margin 0 in the demo
    ds = xr.open_zarr(tmp / "out" / "filled.zarr")
    flag, filled, pred = ds.filled_flag.values, ds.SST_filled.values, ds.SST_predicted.values
    assert set(np.unique(flag)) <= {0, 1, 2}
    assert (flag == 1).sum() == m["cells_filled"] > 500
    assert m["cells_out_of_range"] > 0  # the MLP extrapolates in winter sea ice
    assert (flag == 2).sum() == m["cells_out_of_range"]
    assert np.all((filled[flag == 1] >= lo) & (filled[flag == 1] <= hi))
    assert np.isnan(filled[flag == 2]).all()
    assert np.all((pred[flag == 2] < lo) | (pred[flag == 2] > hi))
    obs = ds.SST.values
    assert lo >= np.nanmin(obs) and hi <= np.nanmax(obs)


def test_outputs_tell_the_truth_in_cf(mlp_run):
    tmp, _ = mlp_run
    ds = xr.open_zarr(tmp / "out" / "filled.zarr")
    flag = ds.filled_flag.attrs
    assert flag["flag_values"] == [0, 1, 2] and len(flag["flag_meanings"].split()) == 3
    for key in ("units", "standard_name", "valid_range"):
        assert key not in flag and key not in ds.split.attrs
    assert ds.SST_filled.attrs["units"] == ds.SST.attrs["units"]
    assert ds.attrs["Conventions"].startswith("CF-")
    assert ds.attrs["date_created"] and "cube-engine" in ds.attrs["history"]
    assert ds.attrs["license"]  # the input's licence travels with the output
    spec = json.loads(ds.attrs["engine_job_spec"])  # JSON, not a Python repr
    assert spec["name"] == "gapfill-coads-mlp"
    assert json.loads(ds.attrs["engine_features"]) == spec["features"]
    assert json.loads(ds.attrs["engine_split"])["split_seed"] == 0
    hashes = [k for k in ds.attrs if "hash" in k and not k.endswith("_kind")]
    for v in ds.data_vars.values():
        hashes += [k for k in v.attrs if "hash" in k]
    assert hashes == ["engine_model_hash"]  # one model hash, named


def test_rerun_resumes_without_recomputing(mlp_run, capsys):
    tmp, job = mlp_run
    before = read_manifest(str(tmp / "out" / "filled.zarr"))
    metrics_before = json.load(open(tmp / "out" / "filled.run" / "metrics.json"))
    assert main(["run", job, "--cluster", "threads", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reusing the trained model" in out
    assert "regions written 0" in out
    assert "nothing new to compute" in out and "samples/s" not in out and "px/s" not in out
    assert read_manifest(str(tmp / "out" / "filled.zarr")).keys() == before.keys()
    m = json.load(open(tmp / "out" / "filled.run" / "metrics.json"))
    first = metrics_before["throughput"]
    assert m["throughput"]["total_s"] == first["total_s"]  # the first run's figures stay
    assert m["throughput"]["train_samples_per_s"] == first["train_samples_per_s"]
    assert m["throughput"]["resumed_runs"][-1]["regions_written"] == 0
    assert m["test"] == metrics_before["test"]


def test_linear_matches_least_squares(tmp_path):
    job = job_file(tmp_path, "gapfill-linear.yaml")
    assert main(["run", job, "--cluster", "threads", "--quiet"]) == 0
    m = json.load(open(tmp_path / "out" / "filled.run" / "metrics.json"))
    t = m["test"]
    assert abs(t["model"]["rmse"] / t["ols"]["rmse"] - 1) <= 0.02
    assert t["model"]["rmse"] < t["train_mean"]["rmse"] / 5
    assert m["comparison"]["model_within_2pct_of_ols"]
