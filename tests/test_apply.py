"""kind: apply -- a trained model over an archive, one store appended partition by partition.

The archive is the committed 240-year iris sample (catalogs/archive.yaml), copied per
module so a test may change it, reduced by the jobs' time ranges to a few decades. The
model is a weights file of the registered ``pixel_regressor`` with known coefficients, so
every written value is checked against numpy; one test applies a real gap-filling run
folder and must reproduce that job's own predictions.
"""

from __future__ import annotations

import json
import os
import shutil

import dask
import numpy as np
import pytest
import torch
import xarray as xr

from engine.errors import RegionFailedError, ResumeError, SpecError
from engine.io import archive
from engine.io.writer import local as writer_local
from engine.pipelines.apply import plan_run, run_apply
from engine.pipelines.spec import parse_spec

pytestmark = [pytest.mark.usefixtures("threads_scheduler"), pytest.mark.timeout(240)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE = os.path.join(ROOT, "catalogs", "data", "iris_north_america.zarr")
#: y = A * tas_a1b + B * lat + C: the weights file's model, checked against numpy.
A, B, C = 0.9, -0.05, 30.0


def _catalog(folder, store) -> str:
    text = open(os.path.join(ROOT, "catalogs", "archive.yaml")).read()
    path = os.path.join(folder, "archive.yaml")
    with open(path, "w") as f:
        f.write(text.replace("url: data/iris_north_america.zarr", f"url: {store}"))
    return path


@pytest.fixture
def archive_copy(tmp_path):
    """A private copy of the committed archive and a catalog naming it."""
    store = str(tmp_path / "input" / "iris.zarr")
    shutil.copytree(STORE, store)
    return _catalog(str(tmp_path / "input"), store), store


def _weights(path, a=A, b=B, c=C) -> str:
    from engine.ml.registry import build_architecture
    from engine.pipelines._apply_models import _register

    _register()
    net = build_architecture("pixel_regressor", n_features=2, kind="linear")
    with torch.no_grad():
        net.core.weight.copy_(torch.tensor([[a, b]]))
        net.core.bias.fill_(c)
    torch.save(net.state_dict(), path)
    return str(path)


def _spec(tmp_path, catalog, weights, *, end="1869", start="1860", partition="decade",
          **model):
    data = {
        "name": "apply-test", "kind": "apply",
        "input": {"catalog": catalog, "entry": "iris_north_america"},
        "model": {"weights": weights, "architecture": "pixel_regressor",
                  "kwargs": {"n_features": 2, "kind": "linear"},
                  "variables": ["tas_a1b", "lat"], "output": "tas_hat", "units": "K",
                  **model},
        "time": {"start": start, "end": end},
        "partition": partition,
        "output": {"url": str(tmp_path / "out" / "tas.zarr")},
    }
    return parse_spec(data, base_dir=str(tmp_path))


def _expected(store, first, last, a=A, b=B, c=C) -> np.ndarray:
    ds = xr.open_zarr(store).sel(time=slice(first, last))
    lat = ds["latitude"].values.astype(np.float32)[None, :, None]
    return (a * ds["tas_a1b"].values + b * lat + c).astype(np.float32)


def _chunks(url) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every chunk object of the output variable."""
    out = {}
    folder = os.path.join(url, "tas_hat", "c")
    for d, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), folder)] = (st.st_mtime_ns, st.st_size)
    return out


def _time_index(key: str) -> int:
    return int(key.split(os.sep)[0])


# -- partitions: pure -----------------------------------------------------------------

def test_plan_partitions_by_year_month_decade():
    t = np.array(["1999-12-01", "2000-01-09", "2000-01-17", "2000-02-02", "2010-06-01"],
                 dtype="datetime64[ns]")
    years = archive.plan_partitions(t, "year")
    assert [(p.label, p.start, p.stop) for p in years] == [
        ("1999", 0, 1), ("2000", 1, 4), ("2010", 4, 5)]
    months = archive.plan_partitions(t, "month", offset=10)
    assert [(p.label, p.start, p.stop) for p in months] == [
        ("1999-12", 10, 11), ("2000-01", 11, 13), ("2000-02", 13, 14), ("2010-06", 14, 15)]
    assert [p.label for p in archive.plan_partitions(t, "decade")] == ["1990s", "2000s",
                                                                       "2010s"]
    with pytest.raises(Exception, match="strictly increasing"):
        archive.plan_partitions(t[::-1], "year")


def test_committed_archive_is_the_conversion_of_the_pinned_package(tmp_path):
    pytest.importorskip("iris_sample_data")
    from engine.io.archive_sample import convert_archive_sample

    dest = convert_archive_sample(str(tmp_path / "iris.zarr"), years=240)
    new, old = xr.open_zarr(dest), xr.open_zarr(STORE)
    assert new.sizes == old.sizes == {"time": 240, "latitude": 37, "longitude": 49,
                                      "bnds": 2}
    for name in ("tas_a1b", "tas_e1", "time", "time_bnds", "latitude", "longitude"):
        np.testing.assert_array_equal(new[name].values, old[name].values)
    assert str(new.time.values[0])[:10] == "1860-06-01"
    assert str(new.time.values[-1])[:10] == "2099-06-01"
    assert new.attrs["source_sha256"] == old.attrs["source_sha256"]


# -- the job end to end ----------------------------------------------------------------

def test_apply_writes_resumes_after_a_kill_and_appends(tmp_path, archive_copy, monkeypatch):
    catalog, store = archive_copy
    weights = _weights(tmp_path / "w.pt")
    url = str(tmp_path / "out" / "tas.zarr")
    progress: list[tuple[int, int]] = []

    # 1. the 1860s: one partition of 5 regions (2 years each on 2 threads)
    with dask.config.set(num_workers=2):
        res = run_apply(_spec(tmp_path, catalog, weights),
                        on_region=lambda d, n, **_: progress.append((d, n)))
    assert res.write.n_written == 5 and res.write.n_skipped == 0
    assert progress[0] == (0, 5) and progress[-1] == (5, 5)
    out = xr.open_zarr(url)
    np.testing.assert_allclose(out["tas_hat"].values, _expected(store, "1860", "1869"),
                               rtol=1e-6)
    assert out["tas_hat"].attrs["units"] == "K"
    first = _chunks(url)
    assert len(first) == 10

    # 2. extend to the 1880s while every write of the region holding 1874 fails: a
    # killed run. The 1860s are not touched, the 1880s finish, the 1870s stay unfinished.
    real = writer_local.write_region
    calls: list[int] = []

    def failing(task, data):
        calls.append(task.slices["time"][0])
        if task.slices["time"][0] <= 14 < task.slices["time"][1]:
            raise OSError("disk went away")
        return real(task, data)

    monkeypatch.setattr(writer_local, "write_region", failing)
    with dask.config.set({"num_workers": 2, "engine.write.retries": 0}), \
            pytest.raises(RegionFailedError, match="partition 1870s") as err:
        run_apply(_spec(tmp_path, catalog, weights, end="1889"))
    assert "\n" not in str(err.value)
    assert sorted(calls) == list(range(10, 30, 2))  # not one region of the 1860s
    parts = archive.read_partitions(url)
    assert {k: v["status"] for k, v in parts.items()} == {
        "1860s": "done", "1870s": "running", "1880s": "done"}
    killed = _chunks(url)
    assert {k: v for k, v in killed.items() if _time_index(k) < 10} == first

    # 3. re-run: only the failed region is computed
    counted = []

    def counting(task, data):
        counted.append(task.slices["time"])
        return real(task, data)

    monkeypatch.setattr(writer_local, "write_region", counting)
    with dask.config.set(num_workers=2):
        res = run_apply(_spec(tmp_path, catalog, weights, end="1889"))
    assert counted == [(14, 16)]
    assert res.write.n_written == 1 and res.write.n_skipped == 14
    assert [(p["label"], p["status"]) for p in res.write.partitions] == [
        ("1860s", "skipped"), ("1870s", "resumed"), ("1880s", "skipped")]
    after = _chunks(url)
    unchanged = {k: v for k, v in after.items() if not 14 <= _time_index(k) < 16}
    assert unchanged == {k: v for k, v in killed.items() if not 14 <= _time_index(k) < 16}
    out = xr.open_zarr(url)
    assert out.sizes["time"] == 30
    np.testing.assert_allclose(out["tas_hat"].values, _expected(store, "1860", "1889"),
                               rtol=1e-6)

    # provenance per partition: input identity, model hash, code version (file and attrs)
    parts = archive.read_partitions(url)
    attrs = json.loads(out.attrs["engine_partitions"])
    assert [p["label"] for p in attrs] == ["1860s", "1870s", "1880s"]
    model_hash = res.metrics["model_hash"]
    for p in attrs:
        assert p["status"] == "done" and p["model_hash"] == model_hash
        assert p["input_identity"].startswith("sha256:") and p["code_version"]
        assert parts[p["label"]]["input_identity"] == p["input_identity"]
    assert len({p["input_identity"] for p in attrs}) == 3

    # 4. nothing left: a re-run writes nothing and touches nothing
    counted.clear()
    res = run_apply(_spec(tmp_path, catalog, weights, end="1889"))
    assert counted == [] and res.write.n_written == 0
    assert _chunks(url) == after


def test_changed_model_is_refused_unless_restart(tmp_path, archive_copy, run_cli):
    catalog, store = archive_copy
    weights = _weights(tmp_path / "w.pt")
    url = str(tmp_path / "out" / "tas.zarr")
    run_apply(_spec(tmp_path, catalog, weights, end="1861", partition="year"))
    before = _chunks(url)
    moved = shutil.copy(weights, tmp_path / "moved.pt")  # the same model elsewhere: resumes
    res = run_apply(_spec(tmp_path, catalog, str(moved), end="1861", partition="year"))
    assert res.write.n_written == 0 and _chunks(url) == before
    _weights(tmp_path / "w.pt", c=C + 1.0)  # same file name, other weights
    with pytest.raises(ResumeError, match=r"different job \(model\).*--restart"):
        plan_run(_spec(tmp_path, catalog, weights, end="1861", partition="year"))
    assert _chunks(url) == before
    res = run_apply(_spec(tmp_path, catalog, weights, end="1861", partition="year"),
                    restart=True)
    assert res.write.n_written == 2
    np.testing.assert_allclose(xr.open_zarr(url)["tas_hat"].values,
                               _expected(store, "1860", "1861", c=C + 1.0), rtol=1e-6)


def test_changed_input_of_a_finished_partition_is_refused(tmp_path, archive_copy):
    import zarr

    catalog, store = archive_copy
    weights = _weights(tmp_path / "w.pt")
    url = str(tmp_path / "out" / "tas.zarr")
    run_apply(_spec(tmp_path, catalog, weights, end="1879"))
    before = _chunks(url)
    arr = zarr.open_group(store, mode="r+")["tas_a1b"]
    arr[12] = arr[12] + 1.0  # a year of the 1870s changes in the archive
    with pytest.raises(ResumeError, match="partition 1870s .* different input data"):
        run_apply(_spec(tmp_path, catalog, weights, end="1889"))
    assert _chunks(url) == before
    assert xr.open_zarr(url).sizes["time"] == 20  # not grown either


def test_a_later_start_appends_right_after_the_store(tmp_path, archive_copy):
    catalog, store = archive_copy
    weights = _weights(tmp_path / "w.pt")
    url = str(tmp_path / "out" / "tas.zarr")
    run_apply(_spec(tmp_path, catalog, weights, end="1862", partition="year"))
    res = run_apply(_spec(tmp_path, catalog, weights, start="1866", end="1867",
                          partition="year"))
    # no gap: 1863-1865 are written too, the stored years are not
    assert [p["label"] for p in res.write.partitions] == ["1863", "1864", "1865", "1866",
                                                           "1867"]
    out = xr.open_zarr(url)
    assert [str(t)[:4] for t in out.time.values] == [str(y) for y in range(1860, 1868)]
    np.testing.assert_allclose(out["tas_hat"].values, _expected(store, "1860", "1867"),
                               rtol=1e-6)


def test_bad_inputs_are_one_line_exit_2_nothing_written(tmp_path, archive_copy, run_cli):
    import yaml

    catalog, store = archive_copy
    weights = _weights(tmp_path / "w.pt")
    out = tmp_path / "out"

    def job(name, **changes):
        data = {"name": "apply-bad", "kind": "apply",
                "input": {"catalog": catalog, "entry": "iris_north_america"},
                "model": {"weights": weights, "architecture": "pixel_regressor",
                          "kwargs": {"n_features": 2, "kind": "linear"},
                          "variables": ["tas_a1b", "lat"]},
                "time": {"start": "1860", "end": "1869"},
                "output": {"url": str(out / "x.zarr")}}
        for k, v in changes.items():
            section, _, key = k.partition(".")
            if key:
                data[section] = {**data[section], key: v}
            else:
                data[section] = v
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    before = sorted(os.listdir(os.path.dirname(store)))
    cases = {
        "run": (job("run", model={"run": str(tmp_path / "nope.run")}), "is not a run folder"),
        "weights": (job("weights", **{"model.kwargs": {"n_features": 3, "kind": "linear"}}),
                    "does not load into"),
        "range": (job("range", time={"start": "1700", "end": "1750"}),
                  "outside the archive"),
        "output": (job("output", output={"url": store}), "input store"),
    }
    for name, (path, words) in cases.items():
        code, stdout, stderr = run_cli(["run", path, "--quiet"])
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, (name, stdout, stderr)
        assert len(lines) == 1 and words in lines[0], (name, lines)
        assert not out.exists(), name
    assert sorted(os.listdir(os.path.dirname(store))) == before
    xr.testing.assert_identical(xr.open_zarr(store).load(), xr.open_zarr(STORE).load())


def test_apply_a_gapfill_run_folder_reproduces_its_predictions(tmp_path, archive_copy):
    """A real gap-filling run trained on the archive; apply from its run folder writes the
    values the training job wrote itself (same model, same inputs)."""
    from engine.pipelines.gapfill import run_gapfill

    catalog, store = archive_copy
    train = parse_spec({
        "name": "gapfill-archive", "kind": "gapfill",
        "input": {"catalog": catalog, "entry": "iris_north_america"},
        "target": "tas_e1", "features": ["tas_a1b", "lat"],
        "split": {"blocks": {"time": 40, "lat": 20, "lon": 20}},
        "model": {"kind": "linear"},
        "train": {"epochs": 1, "batch_size": 8192, "learning_rate": 0.01},
        "output": {"url": str(tmp_path / "model" / "fill.zarr")}}, base_dir=str(tmp_path))
    trained = run_gapfill(train)
    run = str(tmp_path / "model" / "fill.run")
    assert os.path.exists(os.path.join(run, "job.json"))
    spec = parse_spec({
        "name": "apply-run", "kind": "apply",
        "input": {"catalog": catalog, "entry": "iris_north_america"},
        "model": {"run": run}, "time": {"start": "1990", "end": "2009"},
        "partition": "decade",
        "output": {"url": str(tmp_path / "out" / "emulated.zarr")}}, base_dir=str(tmp_path))
    res = run_apply(spec)
    assert res.metrics["model_hash"] == trained.metrics["model_hash"]
    got = xr.open_zarr(str(tmp_path / "out" / "emulated.zarr"))["tas_e1_predicted"]
    want = xr.open_zarr(str(tmp_path / "model" / "fill.zarr"))["tas_e1_predicted"]
    want = want.sel(time=slice("1990", "2009"))
    np.testing.assert_array_equal(got.values, want.values)
    assert json.loads(got.attrs["engine_model_source"])["kind"] == "gapfill"
    # the run's training target range (train.json) is the valid range of the output
    lo, hi = json.load(open(os.path.join(run, "train.json")))["target_range"]
    assert got.attrs["valid_range"] == [lo, hi]
    assert "tas_e1_predicted_flag" in xr.open_zarr(str(tmp_path / "out" / "emulated.zarr"))


def test_run_folder_of_an_unsupported_kind_or_damaged_checkpoint(tmp_path):
    from engine.pipelines._apply_models import resolve_model
    from engine.pipelines.apply import ApplyModelSpec

    run = tmp_path / "x.run"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"kind": "segment", "spec": {},
                                              "checkpoints": ["fold0.pt", "fold1.pt"]}))
    with pytest.raises(SpecError, match="'segment' run: apply reads run folders of gapfill, "
                                        "regress"):
        resolve_model(ApplyModelSpec(run=str(run)), str)
    (run / "job.json").unlink()
    with pytest.raises(SpecError, match="holds no job.json"):
        resolve_model(ApplyModelSpec(run=str(run)), str)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SpecError, match="does not load into Standardized"):
        resolve_model(ApplyModelSpec(weights=str(bad), architecture="pixel_regressor",
                                     kwargs={"n_features": 2}, variables=["a", "b"]), str)


def test_apply_a_regress_run_folder_reproduces_its_predictions(tmp_path):
    """A real CNN regression run (one epoch) on the ERA5 sample; apply from its run folder
    over the sample's two days, a day per partition, writes every member's t850, and the
    test members' are the values the regress job wrote itself."""
    from engine.pipelines.registry import get_kind

    era5 = os.path.join(ROOT, "catalogs", "era5.yaml")
    train = parse_spec({
        "name": "regress-archive", "kind": "regress",
        "input": {"catalog": era5, "entry": "era5_levels_members"},
        "target": {"variable": "t", "level": 850},
        "features": [{"variable": "z", "level": 500}, {"variable": "z", "level": 850}],
        "split": {"dim": "number", "validation": [7], "test": [8, 9]},
        "model": {"filters": 4},
        "train": {"epochs": 1, "batch_size": 4},
        "output": {"url": str(tmp_path / "model" / "t850.zarr")}}, base_dir=str(tmp_path))
    trained = get_kind("regress").run(train)
    spec = parse_spec({
        "name": "apply-regress", "kind": "apply",
        "input": {"catalog": era5, "entry": "era5_levels_members"},
        "model": {"run": str(tmp_path / "model" / "t850.run")},
        "time": {"start": "2017-01-01", "end": "2017-01-02"}, "partition": "day",
        "output": {"url": str(tmp_path / "out" / "t850.zarr")}}, base_dir=str(tmp_path))
    res = run_apply(spec)
    assert [p["label"] for p in res.write.partitions] == ["2017-01-01", "2017-01-02"]
    assert res.metrics["model_hash"] == trained.metrics["model_hash"]
    got = xr.open_zarr(str(tmp_path / "out" / "t850.zarr"))["t850_predicted"]
    assert got.sizes["number"] == 10 and got.sizes["time"] == 4
    want = xr.open_zarr(str(tmp_path / "model" / "t850.zarr"))["t850_predicted"]
    got = got.sel(number=want["number"].values).transpose(*want.dims)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-3)


def test_the_shipped_jobs_run_on_a_reduced_archive(tmp_path):
    """jobs/apply-iris-model.yaml (one epoch) makes the run folder that jobs/apply-iris.yaml
    applies to the 1860s, year by year; jobs/apply-iris-weights.yaml applies its checkpoint
    as a weights file, by decade: both stores hold the same values."""
    from engine.pipelines.registry import get_kind
    from engine.pipelines.spec import load_job

    jobs = os.path.join(ROOT, "jobs")
    model = load_job(os.path.join(jobs, "apply-iris-model.yaml"), [
        "train.epochs=1", f"output.url={tmp_path / 'model' / 'emulator.zarr'}",
        f"output.dir={tmp_path / 'model' / 'emulator.run'}"])
    get_kind("gapfill").run(model)
    run = tmp_path / "model" / "emulator.run"
    by_year = load_job(os.path.join(jobs, "apply-iris.yaml"), [
        f"model.run={run}", "time.end=1869", f"output.url={tmp_path / 'year.zarr'}"])
    res = get_kind("apply").run(by_year)
    assert [p["label"] for p in res.write.partitions] == [str(y) for y in range(1860, 1870)]
    by_decade = load_job(os.path.join(jobs, "apply-iris-weights.yaml"), [
        f"model.weights={run / 'best.pt'}", "time.start=1860", "time.end=1869",
        f"output.url={tmp_path / 'decade.zarr'}"])
    res = get_kind("apply").run(by_decade)
    assert [p["label"] for p in res.write.partitions] == ["1860s"]
    a = xr.open_zarr(str(tmp_path / "year.zarr"))["tas_e1_emulated"]
    b = xr.open_zarr(str(tmp_path / "decade.zarr"))["tas_e1_emulated"]
    assert a.attrs["units"] == "K" and a.sizes["time"] == 10
    np.testing.assert_array_equal(a.values, b.values)
    assert np.isfinite(a.values).all()


_KILLED = """
import sys, time
import dask
from engine.io.writer import local
from engine.pipelines.apply import run_apply
from engine.pipelines.spec import parse_spec

real = local.write_region
def slow(task, data):  # a slow archive: time to kill the run between regions
    out = real(task, data)
    time.sleep(0.4)
    return out
local.write_region = slow
catalog, weights, url = sys.argv[1:4]
spec = parse_spec({"name": "apply-test", "kind": "apply",
    "input": {"catalog": catalog, "entry": "iris_north_america"},
    "model": {"weights": weights, "architecture": "pixel_regressor",
              "kwargs": {"n_features": 2, "kind": "linear"},
              "variables": ["tas_a1b", "lat"], "output": "tas_hat", "units": "K"},
    "time": {"start": "1860", "end": "1889"}, "partition": "decade",
    "output": {"url": url}})
with dask.config.set(scheduler="threads", num_workers=2):
    run_apply(spec)
"""


def test_a_killed_run_resumes_only_its_unfinished_regions(tmp_path, archive_copy, monkeypatch):
    """The run is a process killed with SIGKILL mid-archive; the re-run computes exactly the
    regions the manifest does not record, and the store equals the model's values."""
    import signal
    import subprocess
    import sys
    import time

    from engine.io.manifest import read_manifest

    catalog, store = archive_copy
    weights = _weights(tmp_path / "w.pt")
    url = str(tmp_path / "out" / "tas.zarr")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, catalog, weights, url],
                            cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(url) or len(read_manifest(url)) < 4:
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "no progress from the run to kill"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    recorded = {tuple(r["slices"]["time"]) for r in read_manifest(url).values()}
    assert 4 <= len(recorded) < 15
    counted = []
    real = writer_local.write_region

    def counting(task, data):
        counted.append(task.slices["time"])
        return real(task, data)

    monkeypatch.setattr(writer_local, "write_region", counting)
    with dask.config.set(num_workers=2):
        res = run_apply(_spec(tmp_path, catalog, weights, end="1889"))
    every = {(a, a + 2) for a in range(0, 30, 2)}
    assert set(counted) == every - recorded and len(counted) == len(set(counted))
    assert res.write.n_skipped == len(recorded)
    np.testing.assert_allclose(xr.open_zarr(url)["tas_hat"].values,
                               _expected(store, "1860", "1889"), rtol=1e-6)
    assert {p["status"] for p in archive.read_partitions(url).values()} == {"done"}


def test_outputs_outside_the_valid_range_are_flagged_not_written(tmp_path, archive_copy):
    catalog, store = archive_copy
    weights = _weights(tmp_path / "w.pt")
    want = _expected(store, "1860", "1861")
    lo, hi = (float(v) for v in np.percentile(want, [10, 90]))
    spec = _spec(tmp_path, catalog, weights, end="1861", partition="year",
                 valid_range=[lo, hi])
    run_apply(spec)
    out = xr.open_zarr(str(tmp_path / "out" / "tas.zarr"))
    outside = (want < lo) | (want > hi)
    assert 0.15 < outside.mean() < 0.25
    np.testing.assert_array_equal(out["tas_hat_flag"].values, outside.astype(np.int8))
    got = out["tas_hat"].values
    assert np.isnan(got[outside]).all()
    np.testing.assert_allclose(got[~outside], want[~outside], rtol=1e-6)
    assert out["tas_hat"].attrs["valid_range"] == [lo, hi]
