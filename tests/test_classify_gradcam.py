"""kind: classify with ``gradcam`` -- every tile's class activation map, by the model of its
fold, stored as ``cam`` beside the predictions on the cube's cell grid (issue 12, section 4).

``cam`` is NaN on the cells right of and below the last whole tile and on tiles with a
missing input; every other cell has a map (each tile lies in one fold's test sector)."""

import json
import os

import numpy as np
import pytest
import torch
import xarray as xr

from engine.errors import SpecError
from engine.ml.gradcam import gradcam
from engine.pipelines._segcommon import load_state
from engine.pipelines.classify import JOB as CLASSIFY
from engine.pipelines.spec import load_job
from engine.testing.checks import raise_if_dask_computes
from tests._segfixtures import on_small, run_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "classify-landcover.yaml")
T = 8  # tile size of the reduced runs: 90 x 180 cells, 11 x 22 whole tiles
SMALL = ["patches.size=8", "patches.stride=8", "split.buffer=8", "model.width=8",
         "train.epochs=1", "train.patience=1", "train.batch_size=32"]
FEATURES = ["red", "green", "blue", "relief"]


def _spec(cat, *overrides):
    sets = on_small(cat)[1::2]  # input.catalog=..., input.entry=small
    return load_job(JOB, [*sets, *SMALL, *overrides])


def _run(cat, out, *overrides):
    return CLASSIFY.run(_spec(cat, *overrides), output=str(out))


def _tiles(cat):
    """The reduced cube's input tiles ``(11, 22, 4, T, T)`` (raw values, the model's input)."""
    from engine.io.catalog import open_cube

    cube = open_cube(cat, "small")
    x = np.stack([cube[v].values[:88, :176] for v in FEATURES])
    return x.reshape(4, 11, T, 22, T).transpose(1, 3, 0, 2, 4), cube


def _fold_model(spec, run, k):
    m = CLASSIFY.job._model(spec, len(FEATURES))
    load_state(m, os.path.join(run, f"fold{k}.pt"))
    return m.eval()


def _tile_cams(cam):
    return cam[:88, :176].reshape(11, T, 22, T).transpose(0, 2, 1, 3)


@pytest.fixture(scope="module")
def cam_run(tmp_path_factory, small_landcover):
    out = tmp_path_factory.mktemp("clscam") / "c.zarr"
    res = _run(small_landcover, out, "gradcam.plots=3")
    return out, small_landcover, res


def test_cam_is_stored_beside_the_predictions(cam_run):
    out, cat, res = cam_run
    ds = xr.open_zarr(out)
    _, cube = _tiles(cat)
    assert set(ds.data_vars) == {"label", "predicted", "probability", "fold", "cam"}
    cam = ds["cam"]
    assert cam.dims == ("lat_cell", "lon_cell") and cam.dtype == np.float32
    assert dict(ds.sizes) == {"lat": 11, "lon": 22, "lat_cell": 90, "lon_cell": 180}
    np.testing.assert_array_equal(ds["lat_cell"].values, cube["lat"].values)
    np.testing.assert_array_equal(ds["lon_cell"].values, cube["lon"].values)
    assert ds["lat_cell"].attrs["units"] == cube["lat"].attrs["units"]
    v = cam.values
    # NaN exactly outside the 11 x 22 whole tiles (the cube has no missing input)
    assert all(np.isfinite(cube[f].values).all() for f in FEATURES)
    assert np.isfinite(v[:88, :176]).all()
    assert np.isnan(v[88:]).all() and np.isnan(v[:, 176:]).all()
    inner = v[:88, :176]
    assert inner.min() >= 0 and inner.max() <= 1
    peaks = _tile_cams(v).max(axis=(2, 3))
    assert (np.isclose(peaks, 1.0, atol=1e-6) | (peaks == 0)).all()  # per-tile maximum
    assert (peaks > 0).mean() > 0.9 and _tile_cams(v).std(axis=(2, 3)).mean() > 0.05
    a = cam.attrs
    assert a["method"] == "gradcam" and a["layer"] == "layers.3"  # 4 x 4 of an 8-cell tile
    assert a["units"] == "1" and "predicted" in a["explained_class"] and a["long_name"]
    assert json.loads(ds.attrs["engine_gradcam"])["layer"] == "layers.3"
    m = json.load(open(os.path.join(run_folder(out), "metrics.json")))
    assert m["gradcam"]["cells_mapped"] == 88 * 176 and m["gradcam"]["method"] == "gradcam"
    # overlay plots of three test tiles, in the run folder and the report's files
    plots = {k: p for k, p in res.files.items() if k.startswith("gradcam_tile")}
    assert sorted(plots) == ["gradcam_tile0", "gradcam_tile1", "gradcam_tile2"]
    assert all(os.path.getsize(p) > 0 and os.path.dirname(p) == run_folder(out)
               for p in plots.values())


def test_each_tile_is_explained_by_its_own_folds_model(cam_run):
    out, cat, _ = cam_run
    ds = xr.open_zarr(out).load()
    tiles, _ = _tiles(cat)
    spec = _spec(cat)
    stored = _tile_cams(ds["cam"].values)
    fold = ds["fold"].values
    classes = np.array(spec.label.classes)
    models = [_fold_model(spec, run_folder(out), k) for k in range(5)]
    differs = 0
    for k, model in enumerate(models):
        sel = fold == k
        assert sel.sum() > 10
        x = torch.from_numpy(tiles[sel].astype(np.float32))
        own = gradcam(model, x, layer="core.layers.3")
        np.testing.assert_allclose(stored[sel], own.heatmaps, rtol=1e-4, atol=1e-5)
        # the map explains the stored prediction, made by the same model
        np.testing.assert_array_equal(classes[own.target], ds["predicted"].values[sel])
        other = gradcam(models[(k + 1) % 5], x, layer="core.layers.3")
        differs += int((np.abs(other.heatmaps - stored[sel]).max(axis=(1, 2)) > 1e-3).sum())
    assert differs > 0.5 * fold.size  # another fold's model gives other maps


def test_gradcam_plus_plus_and_chunking_invariance(cam_run, tmp_path):
    """Two runs of fold 0's model on every fold (no training) with the cube in other dask
    chunks: the same Grad-CAM++ maps, which are fold 0's model's."""
    out, cat, _ = cam_run
    ckpt = os.path.join(run_folder(out), "fold0.pt")
    common = [f"model.weights={ckpt}", "model.fine_tune=false", "gradcam.method=gradcam++",
              "gradcam.plots=0"]
    runs = {}
    for chunks in ("{lat: 30, lon: 45}", "{lat: 45, lon: 100}"):
        o = tmp_path / f"c{len(runs)}.zarr"
        res = _run(cat, o, *common, f"input.chunks={chunks}")
        assert not [k for k in res.files if k.startswith("gradcam")]
        runs[chunks] = xr.open_zarr(o)["cam"]
    a, b = runs.values()
    assert a.encoding["chunks"] != b.encoding["chunks"]  # the store follows the input's
    assert a.attrs["method"] == "gradcam++"
    np.testing.assert_array_equal(np.isnan(a.values), np.isnan(b.values))
    np.testing.assert_allclose(a.values, b.values, rtol=1e-4, atol=1e-5)
    tiles, _ = _tiles(cat)
    x = torch.from_numpy(tiles.reshape(-1, 4, T, T).astype(np.float32))
    model = _fold_model(_spec(cat), run_folder(out), 0)
    ref = gradcam(model, x, layer="core.layers.3", method="gradcam++").heatmaps
    np.testing.assert_allclose(_tile_cams(a.values).reshape(-1, T, T), ref, rtol=1e-4, atol=1e-5)
    plain = gradcam(model, x, layer="core.layers.3", method="gradcam").heatmaps
    assert np.abs(plain - ref).max() > 1e-2


def test_a_listed_class_is_explained_by_its_index_and_the_graph_is_lazy(small_landcover):
    """A fixed ``gradcam.target`` (a class code) explains that class in every tile, by its
    index among ``label.classes``; untrained models, nothing computed to build the graph."""
    spec = _spec(small_landcover, "label.classes=[0, 10, 16]", "gradcam.target=16",
                 "gradcam.layer=layers.1")
    job = CLASSIFY.job
    p = job.prepare(spec)
    folds = job.split(p)
    torch.manual_seed(0)
    models = [job._model(spec, 4).eval() for _ in folds]
    with raise_if_dask_computes():
        cam = job._cam(p, folds, models)
    assert cam.attrs["layer"] == "layers.1" and "16" in cam.attrs["explained_class"]
    v = cam.values
    tiles, _ = _tiles(small_landcover)
    centres = np.arange(22) * T + T // 2
    for f, model in zip(folds, models, strict=True):
        cols = np.flatnonzero((centres >= f.lo) & (centres < f.hi))
        x = torch.from_numpy(tiles[:, cols].reshape(-1, 4, T, T).astype(np.float32))
        ref = gradcam(model, x, layer="core.layers.1", target=2)
        assert (ref.target == 2).all()
        np.testing.assert_allclose(_tile_cams(v)[:, cols].reshape(-1, T, T), ref.heatmaps,
                                   rtol=1e-4, atol=1e-5)
        wrong = gradcam(model, x, layer="core.layers.1", target=1).heatmaps
        assert np.abs(wrong - ref.heatmaps).max() > 1e-2


def test_spec_checks_are_one_line(small_landcover):
    with pytest.raises(SpecError, match="gradcam.target"):
        _spec(small_landcover, "gradcam.target=99")
    with pytest.raises(SpecError, match="gradcam.method"):
        _spec(small_landcover, "gradcam.method=cam")
    with pytest.raises(SpecError, match="gradcam.plots"):
        _spec(small_landcover, "gradcam.plots=-1")
    assert _spec(small_landcover, "gradcam=null").gradcam is None
    assert load_job(JOB).gradcam.layer is None


@pytest.mark.parametrize("layer", ["nope", "fc", "pool"])
def test_bad_layer_is_one_line_exit_2_nothing_written(tmp_path, run_cli, small_landcover, layer):
    out = tmp_path / "x.zarr"
    code, _, err = run_cli(["run", JOB, "--cluster", "threads", "--output", str(out),
                            *on_small(small_landcover),
                            *[a for o in SMALL for a in ("--set", o)],
                            "--set", f"gradcam.layer={layer}"])
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "gradcam.layer" in err, err
    assert not out.exists() and not (tmp_path / "x.run").exists()


def test_a_rerun_resumes_without_recomputing_the_maps(cam_run, monkeypatch):
    import engine.ml.gradcam as gc
    from engine.io.verify import verify

    out, cat, _ = cam_run
    before = xr.open_zarr(out)["cam"].values
    calls = []
    real = gc._block_maps

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gc, "_block_maps", counting)
    res = _run(cat, out, "gradcam.plots=3")
    assert not res.trained and res.write.n_written == 0 and res.write.n_skipped > 0
    assert calls == []
    np.testing.assert_array_equal(xr.open_zarr(out)["cam"].values, before)
    # a region lost from the manifest is redone alone, with the same maps
    manifest = os.path.join(out, ".engine", "manifest")
    records = sorted(os.listdir(manifest))
    assert len(records) == res.write.n_regions
    os.remove(os.path.join(manifest, records[0]))  # the region with the most whole tiles
    res = _run(cat, out, "gradcam.plots=3")
    assert res.write.n_written == 1 and calls
    np.testing.assert_array_equal(xr.open_zarr(out)["cam"].values, before)
    assert verify(str(out)).ok
