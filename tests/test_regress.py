"""The CNN regression job (document 000) on the ERA5 sample: split by member without
leakage, baselines computed right, the shipped job end to end on a reduced config, resume,
and the bad-input contract."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import xarray as xr
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.dims import CubeDims
from engine.errors import SpecError
from engine.pipelines.regress import (
    FieldSpec,
    Regress,
    RegressPrepared,
    RegressSpec,
    _climatology,
    _line,
    _stacked,
    member_split,
    thickness_fit,
)
from engine.pipelines.spec import parse_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "regress-t850.yaml")
STORE = os.path.join(ROOT, "catalogs", "data", "era5_levels_members.zarr")
pytestmark = pytest.mark.usefixtures("threads_scheduler")


def _spec(**changes) -> RegressSpec:
    data = yaml.safe_load(open(JOB))
    data.update(changes)
    return parse_spec(data, base_dir=os.path.join(ROOT, "jobs"))


def _prepared(values: dict[str, np.ndarray], spec: RegressSpec | None = None) -> RegressPrepared:
    """A hand-built cube (member, time, y, x) with fields by label, chunked like a cube."""
    spec = spec or _spec()
    n, t, ny, nx = next(iter(values.values())).shape
    coords = {"number": np.arange(n), "time": np.arange(t), "lat": np.linspace(60, -60, ny),
              "lon": np.arange(nx) * 3.0}
    fields = {k: xr.DataArray(v.astype(np.float32), dims=("number", "time", "lat", "lon"),
                              coords=coords).chunk({"number": 3, "lat": 4})
              for k, v in values.items()}
    return RegressPrepared(spec=spec, ds=xr.Dataset(fields), member="number", fields=fields,
                           dims=CubeDims(y="lat", x="lon", time="time"))


def _cube(seed: int, n: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    z500 = 5.5e4 + 500 * rng.standard_normal((n, 3, 6, 8))
    z850 = 1.4e4 + 300 * rng.standard_normal((n, 3, 6, 8))
    t850 = 250 + 0.006 * (z500 - z850) + rng.standard_normal((n, 3, 6, 8))
    return {"z500": z500, "z850": z850, "t850": t850}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(held=st.lists(st.integers(0, 9), min_size=2, max_size=9, unique=True),
       n_val=st.integers(1, 8), noise=st.integers(0, 2**31))
def test_no_held_out_member_reaches_training(held, n_val, noise):
    """Whatever members are held out: the parts are disjoint and cover the cube, and the
    training statistics, thickness fit and training fields do not change when every
    validation and test member is replaced by other values."""
    n_val = min(n_val, len(held) - 1)
    val, test = held[:n_val], held[n_val:]
    spec = _spec(split={"dim": "number", "validation": val, "test": test})
    a = _cube(0)
    b = {k: v.copy() for k, v in _cube(0).items()}
    other = _cube(noise % 1000 + 1)
    for k in b:
        b[k][held] = other[k][held] * 1.5
    pa, pb = _prepared(a, spec), _prepared(b, spec)
    s = member_split(pa)
    assert set(s.train).isdisjoint(held) and sorted(s.train + held) == list(range(10))
    assert s.validation == val and s.test == test
    stats_a, line_a = Regress()._statistics(pa, s)
    stats_b, line_b = Regress()._statistics(pb, s)
    for k in stats_a:
        np.testing.assert_array_equal(stats_a[k], stats_b[k])
    assert line_a == line_b
    np.testing.assert_array_equal(_stacked(pa, s.train, ["z500", "z850"]),
                                  _stacked(pb, s.train, ["z500", "z850"]))
    # and the held-out members differ, so the property is not vacuous
    assert not np.array_equal(_stacked(pa, s.test, ["t850"]), _stacked(pb, s.test, ["t850"]))


def test_the_network_trains_on_training_members_and_stops_on_validation(tmp_path, monkeypatch):
    """What train() hands the training loop: the training members' fields, and the
    validation member's for early stopping; never a test member's."""
    import engine.ml.train as train_mod
    from engine.pipelines.job import RunContext

    seen = {}

    def fake_train_model(model, train, val, **kw):
        seen.update(train=train.x.numpy(), val=val.x.numpy(), train_y=train.y.numpy())
        return train_mod.TrainResult(history=[{"epoch": 0, "train_loss": 1.0, "val_loss": 1.0}])

    monkeypatch.setattr(train_mod, "train_model", fake_train_model)
    values = _cube(3)
    for k in values:  # each member's fields carry its number, so a field names its member
        values[k][:, :, 0, 0] = (np.arange(10) * 1000 + 7)[:, None]
    p = _prepared(values)
    s = member_split(p)
    Regress().train(p, s, RunContext(spec=p.spec, url="unused", run_dir=str(tmp_path),
                                     identity={}))
    member = lambda a: sorted({int(round((v - 7) / 1000)) for v in a[:, 0, 0, 0]})  # noqa: E731
    assert member(seen["train"]) == s.train and member(seen["val"]) == s.validation
    assert member(seen["train_y"]) == s.train
    assert seen["train"].shape == (len(s.train) * 3, 2, 6, 8)


@pytest.mark.parametrize("bias, flagged", [(1000.0, True), (270.0, False)])
def test_implausible_predictions_are_flagged_not_written(tmp_path, bias, flagged):
    """A prediction outside the training target's range (widened by output.range_margin)
    is NaN in the store and flagged; one inside is written as predicted."""
    import torch

    from engine.ml.fields import FieldStandardized
    from engine.pipelines.job import RunContext
    from engine.pipelines.regress import RegressTrained

    p = _prepared(_cube(2))
    s = member_split(p)
    net = torch.nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.fill_(bias)
    ones = np.ones((1, 1, 1))
    model = FieldStandardized(net, np.zeros((2, 1, 1)), np.ones((2, 1, 1)), 0 * ones, ones)
    trained = RegressTrained(model=model, info={"target_range": [250.0, 300.0]},
                             model_hash="h", thickness=(0.0, 0.0))
    ctx = RunContext(spec=p.spec, url="unused", run_dir=str(tmp_path), identity={})
    out = Regress().predict(p, s, trained, ctx).compute()
    pred, flag = out["t850_predicted"].values, out["t850_flag"].values
    assert out["t850_flag"].attrs["valid_range"] == [245.0, 305.0]  # margin 0.1 of 50
    if flagged:
        assert np.isnan(pred).all() and (flag == 1).all()
    else:
        np.testing.assert_allclose(pred, 270.0, rtol=1e-6)
        assert (flag == 0).all()


def test_baselines_on_a_hand_built_case():
    """t850 = 3 + 0.25 (z500 - z850) exactly: the thickness line recovers (3, 0.25); the
    climatology is the mean of the training members over members and time, per cell."""
    rng = np.random.default_rng(1)
    z500 = rng.uniform(5e4, 6e4, (10, 3, 4, 5))
    z850 = rng.uniform(1e4, 2e4, (10, 3, 4, 5))
    t850 = 3 + 0.25 * (z500 - z850)
    p = _prepared({"z500": z500, "z850": z850, "t850": t850})
    s = member_split(p)
    assert s.train == list(range(7)) and s.validation == [7] and s.test == [8, 9]
    import dask

    train = {"number": s.train}
    (sums,) = dask.compute(thickness_fit((p.fields["z500"] - p.fields["z850"]).sel(train),
                                         p.fields["t850"].sel(train)))
    a, b = _line(sums)
    np.testing.assert_allclose([a, b], [3, 0.25], rtol=1e-5, atol=1e-3)
    clim = _climatology(p, s).values
    np.testing.assert_allclose(clim, t850.astype(np.float32)[:7].mean(axis=(0, 1)), rtol=1e-6)
    # the statistics: per cell means, one std per channel, from the training members
    stats, line = Regress()._statistics(p, s)
    assert stats["x_mean"].shape == (2, 4, 5) and stats["x_std"].shape == (2, 1, 1)
    z = z500.astype(np.float32)[:7].astype(np.float64)
    np.testing.assert_allclose(stats["x_mean"][0], z.mean(axis=(0, 1)), rtol=1e-9)
    np.testing.assert_allclose(stats["x_std"][0, 0, 0], (z - z.mean(axis=(0, 1))).std(),
                               rtol=1e-6)
    np.testing.assert_allclose(line, (3, 0.25), rtol=1e-5, atol=1e-3)


def test_a_constant_thickness_cannot_be_fitted():
    from engine.errors import CubeError

    with pytest.raises(CubeError, match="thickness is constant"):
        _line({"n": 4, "sx": 8.0, "sy": 4.0, "sxx": 16.0, "sxy": 8.0})


def test_the_network_is_document_000s():
    import torch

    from engine.ml.registry import build_architecture, list_architectures

    assert "unidata_cnn" in list_architectures()
    net = build_architecture("unidata_cnn", in_channels=2)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (2, 32, (5, 5), (2, 2)), (32, 32, (5, 5), (2, 2)), (32, 1, (5, 5), (2, 2))]
    assert sum(isinstance(m, torch.nn.ELU) for m in net.modules()) == 2
    assert isinstance(list(net.net)[-1], torch.nn.Conv2d)  # no output activation


@pytest.mark.parametrize("changes, words", [
    ({"split": {"validation": [7], "test": [7, 9]}}, "split.validation and split.test"),
    ({"features": [{"variable": "z", "level": 500}, {"variable": "z", "level": 500.0}]},
     "features lists z500 twice"),
    ({"target": {"variable": "z", "level": 500}}, "target z500 is also a feature"),
    ({"model": {"kernel_size": 4}}, "model.kernel_size must be odd"),
    ({"train": {"epochs": 0}}, "train.epochs must be in"),
    ({"output": {"url": "x.zarr", "range_margin": 2}}, "output.range_margin must be in"),
])
def test_spec_checks_name_the_field(changes, words):
    with pytest.raises(SpecError, match=words):
        _spec(**changes)


def _job(tmp_path, out: str | None = None, **changes) -> str:
    data = yaml.safe_load(open(JOB))
    data["input"]["catalog"] = os.path.join(ROOT, "catalogs", "era5.yaml")
    data["train"].update(epochs=4, patience=4)
    for k, v in changes.items():
        data[k] = v
    data["output"]["url"] = out or str(tmp_path / "out" / "t850.zarr")
    path = tmp_path / "regress.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("changes, words", [
    ({"target": {"variable": "tt", "level": 850}}, "target 'tt' is not in the cube"),
    ({"features": [{"variable": "z", "level": 700}]}, "level 700 is not a level of 'z'"),
    ({"features": [{"variable": "z"}]}, "has levels (isobaricInhPa: 850, 500): give one"),
    ({"split": {"validation": [7], "test": [8, 12]}}, "split.test members [12]"),
    ({"split": {"dim": "member", "validation": [7], "test": [8]}}, "split.dim 'member'"),
    ({"output": {"plot_time": 4}}, "output.plot_time must be in [0, 4)"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, refused, changes, words):
    job = _job(tmp_path, **changes)
    for verb in (["validate", job], ["run", job, "--cluster", "threads"]):
        refused(verb, words)
    assert not (tmp_path / "out").exists()


def test_output_at_the_input_store_is_refused_and_nothing_written(tmp_path, refused):
    before = sorted(os.listdir(STORE))
    for out in (STORE, os.path.join(STORE, "t850.zarr")):
        refused(["run", _job(tmp_path, out=out), "--cluster", "threads"], "input")
    assert sorted(os.listdir(STORE)) == before


def test_shipped_job_end_to_end_resumes_and_refuses_a_changed_spec(tmp_path, run_cli):
    """jobs/regress-t850.yaml on a reduced config (4 epochs) end to end; the baselines in
    metrics.json match a numpy computation from the raw store; the CNN beats both; a rerun
    computes nothing; a changed spec is refused without --restart."""
    job = _job(tmp_path)
    code, out, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 0, err
    run = tmp_path / "out" / "t850.run"
    m = json.load(open(run / "metrics.json"))
    assert m["split"]["split_train"] == list(range(7)) and m["split"]["split_test"] == [8, 9]
    ds = xr.open_zarr(tmp_path / "out" / "t850.zarr")
    assert list(ds["number"].values) == [8, 9]  # only test members are predicted
    assert set(ds.data_vars) == {"t850", "t850_predicted", "t850_flag", "t850_climatology",
                                 "t850_thickness_linear"}
    assert m["cells_outside_training_range"] == 0 and int(ds["t850_flag"].sum()) == 0
    assert ds["t850_predicted"].attrs["units"] == "K" and ds.attrs["engine_job_kind"] == "regress"

    raw = xr.open_zarr(STORE)
    t = raw["t"].sel(isobaricInhPa=850).values.astype(np.float64)
    thick = (raw["z"].sel(isobaricInhPa=500) - raw["z"].sel(isobaricInhPa=850)).values
    clim = t[:7].astype(np.float32).mean(axis=(0, 1))
    b, a = np.polyfit(thick[:7].ravel().astype(np.float64), t[:7].ravel(), 1)
    truth = t[8:]

    def rmse(pred):
        return float(np.sqrt(np.mean((pred - truth) ** 2)))

    bl = m["baselines"]
    np.testing.assert_allclose(bl["climatology"]["rmse"], rmse(clim[None, None]), rtol=1e-5)
    np.testing.assert_allclose(bl["thickness_linear"]["rmse"], rmse(a + b * thick[8:]),
                               rtol=1e-4)
    np.testing.assert_allclose(m["thickness_fit"]["slope"], b, rtol=1e-6)
    assert m["model"]["n"] == 2 * 4 * 61 * 120 and m["model"]["n_missing_predictions"] == 0
    np.testing.assert_allclose(m["model"]["rmse"],
                               rmse(ds["t850_predicted"].values.astype(np.float64)), rtol=1e-5)
    assert m["model"]["rmse"] < bl["climatology"]["rmse"] < bl["thickness_linear"]["rmse"]
    assert m["comparison"] == {"model_beats_climatology": True,
                               "model_beats_thickness_linear": True}
    for f in ("best.pt", "loss.png", "map.png", "train.json"):
        assert (run / f).stat().st_size > 0

    # a rerun resumes: the model is loaded, every region skipped, the store unchanged
    ckpt_mtime = (run / "best.pt").stat().st_mtime_ns
    code, out, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 0, err
    assert "nothing new to compute" in " ".join(out.split())
    assert (run / "best.pt").stat().st_mtime_ns == ckpt_mtime
    m2 = json.load(open(run / "metrics.json"))
    assert m2["model_hash"] == m["model_hash"]  # the checkpoint restored weights and statistics
    assert m2["model"] == m["model"] and m2["throughput"]["resumed_runs"][-1]["trained"] is False

    # another spec is refused without --restart, and nothing is touched
    before = sorted(os.listdir(tmp_path / "out" / "t850.zarr"))
    code, _, err = run_cli(["run", job, "--cluster", "threads", "--quiet",
                            "--set", "split.test=[8]"])
    assert code == 2 and "--restart" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "out" / "t850.zarr")) == before
    assert (run / "best.pt").stat().st_mtime_ns == ckpt_mtime


def test_field_spec_labels():
    assert FieldSpec("t", 850).label == "t850" and FieldSpec("z", 500.0).label == "z500"
    assert FieldSpec("q", 92.5).label == "q92.5" and FieldSpec("sp").label == "sp"
