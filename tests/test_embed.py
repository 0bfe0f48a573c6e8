"""The embed kind (Tile2Vec, document 004): the embedder and its loss, the job end to end
on the synthetic organisation fields, the bad-input contract."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from engine.errors import SpecError
from engine.ml.embed import tile_embedder, triplet_loss
from engine.pipelines.embed import EmbedSpec, window_grid
from engine.pipelines.spec import parse_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "embed-clouds.yaml")


def test_loss_is_document_004s_equation_3():
    torch.manual_seed(0)
    out = torch.randn(64, 3, 10)
    a, n, d = out[:, 0], out[:, 1], out[:, 2]
    plain = torch.relu((a - n).norm(dim=1) - (a - d).norm(dim=1) + 0.5).mean()
    sq = torch.relu(((a - n) ** 2).sum(1) - ((a - d) ** 2).sum(1) + 0.5).mean()
    torch.testing.assert_close(triplet_loss(0.5, "l2")(out, None), plain)
    torch.testing.assert_close(triplet_loss(0.5, "squared_l2")(out, None), sq)
    with pytest.raises(SpecError, match="loss.distance"):
        triplet_loss(1.0, "cosine")  # type: ignore[arg-type]


def test_embedder_is_resnet18_with_a_100d_head_and_standardises():
    m = tile_embedder(2, width=8, stem="small").eval()
    blocks = [mod for mod in m.backbone.modules() if type(mod).__name__ == "BasicBlock"]
    assert len(blocks) == 8  # ResNet-18: four stages of two basic blocks
    x = torch.rand(5, 2, 16, 16) * 40 + 300
    m.set_statistics([300.0, 310.0], [10.0, 20.0])
    y = m(x)
    assert y.shape == (5, 100)
    m2 = tile_embedder(2, width=8, stem="small").eval()
    m2.load_state_dict(m.state_dict())
    m2.set_statistics([0.0, 0.0], [1.0, 1.0])
    xs = (x - torch.tensor([300.0, 310.0]).view(1, 2, 1, 1)) / torch.tensor([10.0, 20.0]).view(
        1, 2, 1, 1)
    torch.testing.assert_close(m2(xs), y)
    # triplets go through the same network: (B, 3, C, h, w) -> (B, 3, dim)
    trip = x[:3].unsqueeze(1).expand(3, 3, 2, 16, 16)
    torch.testing.assert_close(m(trip)[:, 1], y[:3])


def test_tile_labels_are_the_majority_of_a_pixel_label_grid():
    from types import SimpleNamespace

    from engine.pipelines.embed import EmbedJob

    lab = np.zeros((2, 8, 8), np.int16)
    lab[0, :, 1:] = 2  # the first 4 px tile of step 0: one column of 0, three of 2
    lab[1, 4:, 4:] = 5
    p = SimpleNamespace(labels=xr.DataArray(lab, dims=("time", "y", "x")))
    g = {"time_index": np.array([0, 1, 1, 0]), "y0": np.array([0, 4, 0, 4]),
         "x0": np.array([0, 4, 0, 0])}
    got = EmbedJob()._tile_labels(p, g, 4)  # type: ignore[arg-type]
    assert got.tolist() == [2, 5, 0, 2]
    per_step = SimpleNamespace(labels=xr.DataArray(np.array([3, 1]), dims="time"))
    assert EmbedJob()._tile_labels(per_step, g, 4).tolist() == [3, 1, 1, 3]  # type: ignore[arg-type,union-attr]


def test_window_grid():
    assert window_grid(128, 32, 16).tolist() == list(range(0, 97, 16))
    assert window_grid(10, 11, 1).tolist() == []


def _spec(**changes) -> EmbedSpec:
    data = yaml.safe_load(open(JOB))
    data.update(changes)
    spec = parse_spec(data, base_dir=os.path.join(ROOT, "jobs"))
    assert isinstance(spec, EmbedSpec)
    return spec


@pytest.mark.parametrize("changes, words", [
    ({"input": {"synthetic": {"n_time": 4}, "catalog": "x.yaml", "entry": "e"}},
     "either catalog and entry, or synthetic"),
    ({"triplets": {"neighbour_km": [40, 20]}}, "triplets.neighbour_km"),
    ({"triplets": {"distant": "min_distance"}}, "min_distance_km > 0"),
    ({"loss": {"margin": 0}}, "loss.margin must be > 0"),
    ({"cluster": {"k": 1}}, "cluster.k must be in"),
    ({"split": {"test_fraction": 1.0}}, "split.test_fraction"),
])
def test_spec_checks_name_the_field(changes, words):
    with pytest.raises(SpecError, match=words):
        _spec(**changes)


def _job(tmp_path, **changes) -> str:
    """The shipped job, reduced: a smaller domain, fewer and smaller batches."""
    data = yaml.safe_load(open(JOB))
    data["input"]["synthetic"].update(n_time=8, size=64)
    data["triplets"].update(n_train=96, n_validation=64)
    data["train"].update(epochs=2, batch_size=16)
    data["embed"]["scales"] = [48]
    data["cluster"]["n_boot"] = 20
    data["model"]["width"] = 8
    data["split"] = {"test_fraction": 0.25}
    data["embed"]["scale_models"] = "shared"
    for k, v in changes.items():
        data[k] = v
    data["output"]["url"] = str(tmp_path / "out" / "emb.zarr")
    path = tmp_path / "embed.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("changes, words", [
    ({"variables": ["clouds"]}, "'clouds' is not in the cube"),
    ({"labels": "klass"}, "'klass' is not in the cube"),
    ({"tiles": {"size": 400, "unit": "km"}}, "larger than the grid"),
    ({"split": {"test_steps": [3, 9]}}, "split.test_steps [9]"),
    ({"model": {"width": 0}}, "model needs"),
    ({"model": {"width": 8, "weights": "nowhere.pt"}}, "nowhere.pt' not found"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, refused, changes, words):
    job = _job(tmp_path, **changes)
    for verb in (["validate", job], ["run", job, "--cluster", "threads"]):
        refused(verb, words)
    assert not (tmp_path / "out").exists()


def test_reduced_job_end_to_end(tmp_path, run_cli, refused):
    """Train, embed the whole domain, cluster and score; the store maps back to the grid
    and the scores are recomputed from it."""
    from engine.ml.cluster import scores
    from engine.testing.organisation_fields import organisation_fields

    job = _job(tmp_path)
    code, out, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 0, err
    ds = xr.open_zarr(tmp_path / "out" / "emb.zarr")
    run = tmp_path / "out" / "emb.run"
    m = json.load(open(run / "metrics.json"))
    # 64 x 64 px at 2 km, tiles 32 px, stride 16 px: 3 x 3 windows per step, 8 steps
    assert ds.sizes["tile"] == 8 * 9 and ds["embedding"].shape == (72, 100)
    assert ds.attrs["engine_job_kind"] == "embed"
    src = organisation_fields(8, 64, dx_km=2.0, seed=0, chunks={})
    t, y0, x0 = (ds[k].values for k in ("time_index", "y0", "x0"))
    np.testing.assert_array_equal(ds["time"].values, src.time.values[t])
    # tile centres in km: first and last pixel centres' midpoint (1 km + 2 km * index)
    np.testing.assert_allclose(ds["y"].values, 1.0 + 2.0 * (y0 + 15.5))
    np.testing.assert_allclose(ds["x"].values, 1.0 + 2.0 * (x0 + 15.5))
    assert set(ds["tile_width"].values.tolist()) == {64.0}
    np.testing.assert_array_equal(ds["label"].values, src["class"].values[t])
    np.testing.assert_array_equal(ds["fold"].values, (t >= 6).astype(int))  # last 25 %
    assert m["split"]["split_test"] == [6, 7]
    # the tile statistics are the tiles' own
    j = 17
    tile = src.cloud.values[t[j], y0[j]:y0[j] + 32, x0[j]:x0[j] + 32]
    np.testing.assert_allclose(ds["tile_statistics"].values[j],
                               [tile.mean(), tile.std(), (tile > 0.15).mean()], rtol=1e-5)
    # clusters: the nearest centre of k-means (k = 4) fitted on the training steps' tiles
    from engine.ml.cluster import kmeans

    emb = ds["embedding"].values
    assert ds["valid"].values.all() and np.isfinite(emb).all()
    km = kmeans(emb[ds["fold"].values == 0], 4, seed=0)
    nearest = ((emb[:, None, :] - km.centers[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(ds["cluster"].values, nearest)
    # scores recomputed from the store equal metrics.json; the bootstrap resamples whole
    # time steps
    test = ds["fold"].values == 1
    again = scores(ds["label"].values[test], ds["cluster"].values[test],
                   ds["embedding"].values[test], n_boot=20, seed=0, groups=t[test])
    e = m["scores"]["embedding_kmeans"]
    for key in ("nmi", "ari", "silhouette", "nmi_ci"):
        assert again[key] == pytest.approx(e[key])
    assert e["n"] == int(test.sum()) == 18
    assert 0 <= e["nmi"] <= 1 and e["nmi_ci"][0] <= e["nmi"] <= e["nmi_ci"][1]
    assert set(m["scores"]) == {"embedding_kmeans", "embedding_ward",
                                "tile_statistics_kmeans", "untrained_network_kmeans"}
    # Ward: every tile by the nearest of k centroids; the figures are in the run folder
    assert set(ds["cluster_ward"].values.tolist()) <= set(range(4))
    for name in ("dendrogram.png", "nmi_vs_scale.png", "embedding_maps.png"):
        assert (run / name).stat().st_size > 1000, name
    assert [r["tile_px"] for r in m["nmi_vs_scale"]] == [24, 32]
    tr = m["training"]
    assert tr["epochs_run"] == 2 and tr["triplets_seen"] == 2 * 96
    assert 0 <= tr["validation_triplet_accuracy"] <= 1 and tr["validation_triplets"] == 64
    assert 0.0 < tr["neighbour_overlap_mean"] < 1.0
    assert (run / "best.pt").stat().st_size > 0

    # a rerun reuses the model and the store
    code, out, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 0, err
    m2 = json.load(open(run / "metrics.json"))
    assert m2["model_hash"] == m["model_hash"]
    assert m2["scores"]["embedding_kmeans"]["nmi"] == e["nmi"]

    # its checkpoint is a weights file another run starts from; one of another width is
    # one line, exit 2, nothing written
    other = _job(tmp_path, model={"width": 8, "stem": "imagenet", "dim": 100, "hidden": 128,
                                  "weights": str(run / "best.pt")})
    code, _, err = run_cli(["validate", other, "--output", str(tmp_path / "o2.zarr")])
    assert code == 0, err
    wrong = _job(tmp_path, model={"width": 16, "weights": str(run / "best.pt")})
    refused(["run", wrong, "--cluster", "threads", "--output", str(tmp_path / "o3.zarr")],
            "does not load into TileEmbedder")
    assert not (tmp_path / "o3.zarr").exists() and not (tmp_path / "o3.run").exists()


@pytest.mark.slow
def test_shipped_job_separates_the_synthetic_classes(tmp_path, run_cli):
    """jobs/embed-clouds.yaml as shipped (about 90 s on 2 cores): the embedding's k-means
    recovers the four classes on the held-out steps far better than k-means on tile
    statistics, and the trained network ranks most validation triplets right."""
    data = yaml.safe_load(open(JOB))
    data["output"]["url"] = str(tmp_path / "emb.zarr")
    job = tmp_path / "embed.yaml"
    job.write_text(yaml.safe_dump(data))
    code, out, err = run_cli(["run", str(job), "--cluster", "threads", "--quiet"])
    assert code == 0, err
    m = json.load(open(tmp_path / "emb.run" / "metrics.json"))
    e, b = m["scores"]["embedding_kmeans"], m["scores"]["tile_statistics_kmeans"]
    assert e["nmi"] > 0.5 and e["nmi_ci"][0] > b["nmi"]
    assert e["ari"] > b["ari"]
    u = m["scores"]["untrained_network_kmeans"]
    assert e["nmi_ci"][0] > u["nmi"]  # the triplet training, not the architecture alone
    assert m["training"]["validation_triplet_accuracy"] > 0.8
    assert [r["tile_px"] for r in m["nmi_vs_scale"]] == [16, 32, 48]


def test_autoencoder_trains_through_fit_on_triplet_batches():
    """The autoencoder learns to reconstruct every tile of triplet batches (fit's own
    loop): its held-out reconstruction error falls well below predicting the mean."""
    from engine.ml.embed import Reconstruction, autoencoder_embedder, reconstruction_loss
    from engine.ml.fit import evaluate_loss, fit

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")

    def batch(n):  # smooth random waves: compressible into 8 numbers
        k = rng.uniform(0.2, 0.6, size=(n, 3, 1, 1, 1, 2))
        ph = rng.uniform(0, 6.3, size=(n, 3, 1, 1, 1))
        x = np.sin(k[..., 0] * yy + k[..., 1] * xx + ph).astype(np.float32)
        return x, np.zeros(n, np.float32)

    data = [batch(32) for _ in range(6)]
    held = [batch(64)]
    m = autoencoder_embedder(1, 16, dim=8, width=8, depth=2)
    net = Reconstruction(m)
    before = evaluate_loss(net, held, reconstruction_loss, torch.device("cpu"), "fp32", 1)
    fit(net, lambda e: data, loss=reconstruction_loss, epochs=10, lr=3e-3, device="cpu",
        seed=0)
    after = evaluate_loss(net, held, reconstruction_loss, torch.device("cpu"), "fp32", 1)
    assert after < 0.5 * before and after < 0.5
    assert tuple(m.eval()(torch.as_tensor(held[0][0][:, 0])).shape) == (64, 8)


def test_autoencoder_job_with_a_model_per_scale(tmp_path, run_cli):
    """model: autoencoder is scored the same way; embed.scale_models: per_scale trains and
    resumes one model per scale."""
    job = _job(tmp_path, model={"architecture": "autoencoder", "width": 8, "dim": 16,
                                "depth": 2},
               embed={"batch_size": 64, "scales": [48], "scale_models": "per_scale"})
    code, out, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 0, err
    run = tmp_path / "out" / "emb.run"
    m = json.load(open(run / "metrics.json"))
    ds = xr.open_zarr(tmp_path / "out" / "emb.zarr")
    assert ds["embedding"].shape == (72, 16) and ds.attrs["engine_model_kind"] == "autoencoder"
    assert m["training"]["objective"] == "reconstruction"
    assert [s["tile_px"] for s in m["training"]["scale_models"]] == [24]
    assert (run / "best-24px.pt").stat().st_size > 0
    assert [(r["tile_px"], r["model"]) for r in m["nmi_vs_scale"]] == [
        (24, "trained at this size"), (32, "trained at this size")]
    e = m["scores"]["embedding_kmeans"]
    assert e["bootstrap"] == "groups" and e["n_groups"] == 2
    code, _, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 0, err
    again = json.load(open(run / "metrics.json"))
    assert again["model_hash"] == m["model_hash"]
    assert again["nmi_vs_scale"] == m["nmi_vs_scale"]


@pytest.mark.parametrize("changes, words", [
    ({"model": {"architecture": "autoencoder", "width": 8, "depth": 2},
      "embed": {"scales": [48]}}, "needs embed.scale_models: per_scale"),
    ({"model": {"architecture": "autoencoder", "width": 8, "depth": 3},
      "tiles": {"size": 44, "unit": "km", "stride": 22}, "embed": {"scales": []}},
     "must divide by 2**depth = 8"),
    ({"embed": {"band_mib": 0}}, "embed.band_mib must be > 0"),
])
def test_bad_autoencoder_settings_are_one_line(tmp_path, refused, changes, words):
    job = _job(tmp_path, **changes)
    refused(["run", job, "--cluster", "threads"], words)
    assert not (tmp_path / "out").exists()


def test_one_image_is_embedded_and_clustered_without_scores(tmp_path, run_cli, refused):
    """A single time step: distant tiles by distance, nothing held out, no scores; the
    maps figure is drawn; without test_steps: [] it is one line."""
    changes = {"triplets": {"n_train": 64, "n_validation": 32, "neighbour_km": [24, 40],
                            "distant": "min_distance", "min_distance_km": 60},
               "split": {"test_steps": []}, "embed": {"batch_size": 64, "scales": []}}
    job = _job(tmp_path, **changes)
    data = yaml.safe_load(open(job))
    data["input"]["synthetic"].update(n_time=1, size=128)
    open(job, "w").write(yaml.safe_dump(data))
    code, _, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 0, err
    m = json.load(open(tmp_path / "out" / "emb.run" / "metrics.json"))
    assert m["scores"] is None and "nothing is held out" in m["scores_reason"]
    assert (tmp_path / "out" / "emb.run" / "embedding_maps.png").stat().st_size > 1000
    ds = xr.open_zarr(tmp_path / "out" / "emb.zarr")
    assert ds.sizes["tile"] == 49 and set(ds["cluster"].values.tolist()) <= set(range(4))
    data["split"] = {"test_fraction": 0.25}
    open(job, "w").write(yaml.safe_dump(data))
    refused(["run", job, "--cluster", "threads", "--output", str(tmp_path / "o2.zarr")],
            "split.test_steps: []")


def test_shipped_real_image_job_reduced(tmp_path, run_cli):
    """jobs/embed-msg.yaml (the MSG image from iris-sample-data, via catalogs/clouds.yaml)
    with fewer triplets and epochs: every 12 px tile of the image gets a row, the tiles
    that cross the image's missing wedge are marked incomplete, clusters are 0..4."""
    data = yaml.safe_load(open(os.path.join(ROOT, "jobs", "embed-msg.yaml")))
    data["input"]["catalog"] = os.path.join(ROOT, "catalogs", "clouds.yaml")
    data["triplets"].update(n_train=64, n_validation=32)
    data["train"].update(epochs=2)
    data["output"]["url"] = str(tmp_path / "msg.zarr")
    job = tmp_path / "msg.yaml"
    job.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["run", str(job), "--cluster", "threads", "--quiet"])
    assert code == 0, err
    ds = xr.open_zarr(tmp_path / "msg.zarr")
    src = xr.open_zarr(os.path.join(ROOT, "catalogs", "data", "msg_ir.zarr"))["bt"][0].values
    ok = np.isfinite(np.lib.stride_tricks.sliding_window_view(src, (12, 12))[::4, ::4])
    ok = ok.all(axis=(2, 3)).ravel()
    assert ds.sizes["tile"] == ok.size == 38 * 62
    np.testing.assert_array_equal(ds["valid"].values.astype(bool), ok)
    assert 0 < (~ok).sum() < ok.size
    cl = ds["cluster"].values
    assert set(cl[ok].tolist()) <= set(range(5)) and (cl[~ok] == -1).all()
    m = json.load(open(tmp_path / "msg.run" / "metrics.json"))
    assert m["scores"] is None and m["maps"] == "embedding_maps.png"
