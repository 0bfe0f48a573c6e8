"""kind: classify -- tile majority labels, ResNet-18, the shipped job end to end on a reduced
(2-degree) copy of the committed land-cover cube, the majority baseline and user weights."""

import json
import os

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.errors import SpecError
from engine.ml.archs import ResNet18, resnet18
from engine.pipelines.classify import tile_majority
from engine.pipelines.spec import load_job
from tests._segfixtures import run_folder, run_small

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "classify-landcover.yaml")
SMALL = ["--set", "patches.size=8", "--set", "patches.stride=8", "--set", "split.buffer=8",
         "--set", "model.width=8", "--set", "train.epochs=2", "--set", "train.patience=1",
         "--set", "train.batch_size=32"]


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4)),
                  elements=st.integers(0, 16)))
def test_tile_majority_is_the_mode_with_low_ties(tiles):
    got = tile_majority(tiles)
    for t, g in zip(tiles, got, strict=True):
        vals, counts = np.unique(t, return_counts=True)
        assert g == vals[counts == counts.max()].min()


@pytest.mark.parametrize("stem,size", [("imagenet", 64), ("small", 16)])
def test_resnet18_shapes_and_depth(stem, size):
    m = resnet18(4, 17, width=8, stem=stem)
    assert m(torch.zeros(2, 4, size, size)).shape == (2, 17)
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size != (1, 1)]
    assert len(convs) == 17  # the stem + 16 3x3 convolutions: 18 weight layers with the fc
    full = sum(p.numel() for p in ResNet18(3, 1000).parameters())
    assert full == pytest.approx(11_689_512, rel=1e-6)  # torchvision's resnet18 count


def test_spec_checks_are_one_line():
    with pytest.raises(SpecError, match="model.weights"):
        load_job(JOB, ["model.fine_tune=false"])
    with pytest.raises(SpecError, match="label.classes"):
        load_job(JOB, ["label.classes=[3]"])
    assert load_job(JOB).model.architecture == "resnet18"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, small_landcover):
    out = tmp_path_factory.mktemp("cls") / "cls.zarr"
    assert run_small(JOB, out, small_landcover, *SMALL) == 0
    return out, small_landcover


def test_shipped_job_on_a_reduced_grid(small_run):
    out, cat = small_run
    from engine.io.catalog import open_cube

    cube = open_cube(cat, "small")
    ds = xr.open_zarr(out)
    # the shipped job stores the Grad-CAM maps too (tests/test_classify_gradcam.py)
    assert set(ds.data_vars) == {"label", "predicted", "probability", "fold", "cam"}
    assert ds["predicted"].sizes == {"lat": 11, "lon": 22}   # 90 x 180 cells in 8-cell tiles
    # the label is the majority class of each tile, recomputed from the cube
    lc = cube["landcover"].values[:88, :176].reshape(11, 8, 22, 8).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(ds["label"].values,
                                  tile_majority(lc.reshape(-1, 8, 8)).reshape(11, 22))
    np.testing.assert_allclose(ds["lat"].values, cube["lat"].values[:88].reshape(11, 8).mean(1))
    assert set(np.unique(ds["fold"].values)) == set(range(5))
    assert set(np.unique(ds["predicted"].values)) <= set(range(17))
    run = run_folder(out)
    m = json.load(open(os.path.join(run, "metrics.json")))
    lab, fold = ds["label"].values, ds["fold"].values
    for r in m["folds"]:
        conf = np.array(r["confusion"])
        assert conf.shape == (17, 17) and conf.sum() == r["n_tiles"] == (fold == r["fold"]).sum()
        assert r["accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
        # the baseline predicts the fold's majority training class everywhere
        share = ((lab == r["baseline_class"]) & (fold == r["fold"])).sum() / conf.sum()
        assert r["baseline_accuracy"] == pytest.approx(share)
        assert os.path.exists(os.path.join(run, f"confusion_fold{r['fold']}.png"))
        saved = json.load(open(os.path.join(run, f"confusion_fold{r['fold']}.json")))
        assert saved["confusion"] == r["confusion"]
    assert set(m["summary"]) == {"accuracy", "macro_f1", "baseline_accuracy",
                                 "baseline_macro_f1"}
    assert m["summary"]["macro_f1"]["mean"] > m["summary"]["baseline_macro_f1"]["mean"]


def test_a_users_weights_file_is_evaluated_without_training(small_run, tmp_path):
    out, cat = small_run
    ckpt = os.path.join(run_folder(out), "fold0.pt")
    out2 = tmp_path / "w.zarr"
    assert run_small(JOB, out2, cat, *SMALL, "--set", f"model.weights={ckpt}",
                     "--set", "model.fine_tune=false") == 0
    m = json.load(open(tmp_path / "w.run" / "metrics.json"))
    assert all("history" not in r and "epochs_run" not in r for r in m["training"])
    # every fold ran fold 0's model: on fold 0's sector the predictions are the same
    a, b = xr.open_zarr(out), xr.open_zarr(out2)
    sel = a["fold"].values == 0
    np.testing.assert_array_equal(a["predicted"].values[sel], b["predicted"].values[sel])


def test_bad_weights_file_is_one_line_exit_2_nothing_written(tmp_path, run_cli):
    bad = tmp_path / "bad.pt"
    torch.save(resnet18(4, 5, width=8, stem="small").state_dict(), bad)  # 5 classes, not 17
    out = tmp_path / "x.zarr"
    for override in ([f"model.weights={bad}"], [f"model.weights={tmp_path}/none.pt"],
                     ["features=[red, nope]"]):
        code, _, err = run_cli(["run", JOB, "--cluster", "threads", "--output", str(out),
                                *SMALL, *[a for o in override for a in ("--set", o)]])
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "weights" in err or "nope" in err, err
        assert not out.exists() and not (tmp_path / "x.run").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a 2-core machine shared with other work can take 3x longer
def test_shipped_job_as_shipped_beats_the_majority_baseline(tmp_path, run_cli):
    """The CPU job at full size (about 3 minutes on 2 cores)."""
    code, _, err = run_cli(["run", JOB, "--output", str(tmp_path / "c.zarr")])
    assert code == 0, err
    s = json.load(open(tmp_path / "c.run" / "metrics.json"))["summary"]
    assert s["accuracy"]["mean"] > s["baseline_accuracy"]["mean"]
    assert s["macro_f1"]["mean"] > 2 * s["baseline_macro_f1"]["mean"]
