"""The gap-fill job does not give stale answers or destroy data: resume identity covers the
input values, run folders belong to their store, outputs never overlap inputs, and the job
runs on cubes whose dims are not lat/lon. Fast linear runs on a copy of the demo cube."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
import yaml

from engine._cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "catalogs", "data", "coads_climatology.zarr")

CATALOG = """\
version: 2
metadata: {{}}
user_parameters: {{}}
aliases: {{}}
data:
  store:
    datatype: intake.readers.datatypes:Zarr
    kwargs: {{url: {url}, storage_options: {{}}, root: ''}}
    metadata: {{}}
    user_parameters: {{}}
entries:
  cube:
    reader: intake.readers.readers:XArrayDatasetReader
    output_instance: xarray:Dataset
    kwargs:
      args: ['{{data(store)}}']
      consolidated: {consolidated}
      chunks: {chunks}
    user_parameters: {{}}
    metadata: {{}}
"""


def make_catalog(tmp_path, store, chunks="{time: 3, lat: 45, lon: 90}", consolidated="true"):
    cat = tmp_path / "catalog.yaml"
    cat.write_text(CATALOG.format(url=store, chunks=chunks, consolidated=consolidated))
    return str(cat)


def make_job(tmp_path, catalog, out, name="job.yaml", **changes):
    data = {
        "name": "trust-linear",
        "kind": "gapfill",
        "input": {"catalog": catalog, "entry": "cube"},
        "target": "SST",
        "features": ["AIRT"],
        "mask": "ocean_mask",
        "split": {"method": "block", "blocks": {"time": 3, "lat": 10, "lon": 10},
                  "test_fraction": 0.2, "validation_fraction": 0.1, "buffer": {"lat": 1}},
        "model": {"kind": "linear"},
        "train": {"epochs": 3, "batch_size": 1024, "learning_rate": 0.01, "patience": 2},
        "output": {"url": str(out)},
    }
    for k, v in changes.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) \
            else v
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.fixture
def cube(tmp_path, demo_store):
    return demo_store, make_catalog(tmp_path, demo_store)


def one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _garble_values(store, var="AIRT"):
    """Change the input's values in place (same layout, same file names); not an affine
    change, which standardisation would cancel."""
    ds = xr.open_zarr(store)
    new = ds[[var]].load()
    new[var] = new[var] + 5.0 * (new["lat"] > 0)
    new[var].encoding = {}
    new.to_zarr(store, mode="r+", region="auto")


def test_changed_input_values_are_refused_then_restart_recomputes(cube, tmp_path, run_cli):
    store, cat = cube
    out = tmp_path / "out" / "filled.zarr"
    job = make_job(tmp_path, cat, out)
    assert run_cli(["run", job, "--cluster", "threads", "--quiet"])[0] == 0
    before = xr.open_zarr(out).SST_predicted.values
    _garble_values(store)
    code, _, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 2
    line = one_line(err)
    assert "input" in line and "--restart" in line
    np.testing.assert_array_equal(xr.open_zarr(out).SST_predicted.values, before)
    code, stdout, _ = run_cli(["run", job, "--cluster", "threads", "--quiet", "--restart"])
    assert code == 0 and "reusing the trained model" not in stdout
    after = xr.open_zarr(out).SST_predicted.values
    assert not np.allclose(np.nan_to_num(after), np.nan_to_num(before))


def test_two_outputs_in_one_folder_keep_their_own_run_folders(cube, tmp_path, run_cli):
    _, cat = cube
    a = make_job(tmp_path, cat, tmp_path / "out" / "a.zarr", name="a.yaml")
    b = make_job(tmp_path, cat, tmp_path / "out" / "b.zarr", name="b.yaml",
                 train={"epochs": 2}, features=["AIRT", "SLP"])
    assert run_cli(["run", a, "--cluster", "threads", "--quiet"])[0] == 0
    assert run_cli(["run", b, "--cluster", "threads", "--quiet"])[0] == 0
    ma = json.load(open(tmp_path / "out" / "a.run" / "metrics.json"))
    mb = json.load(open(tmp_path / "out" / "b.run" / "metrics.json"))
    assert ma["features"] == ["AIRT"] and mb["features"] == ["AIRT", "SLP"]
    assert not (tmp_path / "out" / "metrics.json").exists()
    # a re-run of a finds its own model, not b's
    code, stdout, _ = run_cli(["run", a, "--cluster", "threads", "--quiet"])
    assert code == 0 and "reusing the trained model" in stdout and "a.run" in stdout


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_output_overlapping_the_input_is_refused_before_anything_runs(cube, tmp_path, run_cli,
                                                                       where):
    store, cat = cube
    out = {"inside": os.path.join(store, "pred.zarr"), "same": store,
           "parent": os.path.dirname(store)}[where]
    listing = sorted(os.listdir(store))
    job = make_job(tmp_path, cat, tmp_path / "unused.zarr")
    for extra in ([], ["--overwrite"], ["--restart"]):
        code, _, err = run_cli(["run", job, "--cluster", "threads", "--output", out, *extra])
        assert code == 2, extra
        assert "input" in one_line(err)
        assert sorted(os.listdir(store)) == listing
        xr.open_zarr(store).SST.values  # still readable  # noqa: B018
    code, _, err = run_cli(["validate", job, "--output", out, "--overwrite"])
    assert code == 2 and "input" in err


def test_restart_never_replaces_a_foreign_store(cube, tmp_path, run_cli):
    _, cat = cube
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"x": ("i", np.arange(3.0))}).to_zarr(foreign, consolidated=False)
    before = sorted(os.listdir(foreign))
    job = make_job(tmp_path, cat, foreign)
    code, _, err = run_cli(["run", job, "--cluster", "threads", "--restart"])
    assert code == 2
    line = one_line(err)
    assert "--overwrite" in line and "--restart" not in line.split("pass", 1)[-1]
    assert sorted(os.listdir(foreign)) == before


@pytest.mark.parametrize("out", ["/proc/x.zarr", "/etc/hostname/x.zarr"])
def test_unwritable_output_is_refused_before_training(cube, tmp_path, run_cli, out):
    _, cat = cube
    job = make_job(tmp_path, cat, out)
    code, _, err = run_cli(["run", job, "--cluster", "threads"])
    assert code == 2
    assert out.rsplit("/", 1)[0] in one_line(err)


def test_unwritable_run_folder_is_refused(cube, tmp_path, run_cli):
    _, cat = cube
    job = make_job(tmp_path, cat, tmp_path / "out.zarr", output={"dir": "/proc/runs"})
    code, _, err = run_cli(["validate", job])
    assert code == 2 and "/proc/runs" in one_line(err)


def test_debug_after_the_subcommand(cube, tmp_path):
    _, cat = cube
    job = make_job(tmp_path, cat, tmp_path / "o.zarr", train={"epochs": "ten"})
    from engine.errors import SpecError

    with pytest.raises(SpecError):
        main(["validate", job, "--debug"])
    with pytest.raises(SpecError):
        main(["run", job, "--debug"])


def test_catalog_show_json_into_a_closed_pipe():
    cmd = (f"{sys.executable} -m engine catalog show --json "
           f"{ROOT}/catalogs/demo.yaml coads_climatology | head -c 10")
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.stdout.startswith("{")


def test_coordinates_as_features(cube, tmp_path, run_cli):
    """Physics needs latitude and season: numeric coordinates and xarray's virtual
    variables (time.month) are features like any variable."""
    _, cat = cube
    job = make_job(tmp_path, cat, tmp_path / "o.zarr", features=["AIRT", "lat", "time.month"])
    code, out, err = run_cli(["validate", job])
    assert code == 0, err
    bad = make_job(tmp_path, cat, tmp_path / "o.zarr", name="bad.yaml",
                   features=["AIRT", "nonexistent"])
    code, _, err = run_cli(["validate", bad])
    assert code == 2 and "nonexistent" in one_line(err)


def test_cube_with_other_dim_names_and_a_depth_dim(tmp_path, run_cli):
    """The job runs unchanged on a cube whose dims are (time, depth, row, col) without CF
    attributes: input.dims names them; maps and splits follow."""
    src = xr.open_zarr(DEMO).load()
    ren = src.rename({"lat": "row", "lon": "col"})
    for name, v in ren.variables.items():
        if name in ("row", "col"):
            v.attrs = {}
        v.attrs.pop("axis", None)
        v.encoding = {}
    deep = xr.concat([ren, ren.assign({k: ren[k] - 1.0 for k in ("SST", "AIRT")})],
                     dim=xr.DataArray([0.0, 10.0], dims="depth", name="depth"))
    deep["ocean_mask"] = ren["ocean_mask"]
    store = tmp_path / "deep.zarr"
    deep = deep.transpose("time", "depth", "row", "col")
    deep.chunk({"time": 3, "depth": 1, "row": 45, "col": 60}).to_zarr(store, consolidated=False)
    cat = make_catalog(tmp_path, store, chunks="{time: 3, depth: 1, row: 45, col: 60}",
                       consolidated="false")
    job = make_job(tmp_path, cat, tmp_path / "out" / "deep.zarr",
                   input={"dims": {"y": "row", "x": "col"}},
                   split={"blocks": {"time": 3, "row": 15, "col": 20},
                          "buffer": {"row": 1, "col": 1}})
    code, out, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 0, err
    ds = xr.open_zarr(tmp_path / "out" / "deep.zarr")
    assert ds.SST_filled.dims == ("time", "depth", "row", "col")
    m = json.load(open(tmp_path / "out" / "deep.run" / "metrics.json"))
    assert m["test"]["model"]["rmse"] < m["test"]["train_mean"]["rmse"] / 3
    assert (tmp_path / "out" / "deep.run" / "map.png").stat().st_size > 0
    # without input.dims the job cannot tell Y/X apart from other dims: one clear line
    job2 = make_job(tmp_path, cat, tmp_path / "out" / "deep2.zarr", name="nodims.yaml",
                    split={"blocks": {"time": 3, "row": 15, "col": 20}})
    code, _, err = run_cli(["validate", job2])
    assert code == 2 and "input.dims" in one_line(err)


def test_provenance_never_holds_credentials():
    from types import SimpleNamespace

    from engine.pipelines.runner import provenance, spec_fingerprint
    from engine.pipelines.spec import parse_spec

    data = yaml.safe_load(open(os.path.join(ROOT, "jobs", "gapfill.yaml")))
    data["output"]["storage_options"] = {
        "key": "AKIAEXAMPLE", "secret": "s3cr3t-value",
        "client_kwargs": {"headers": {"Authorization": "Bearer tok-value"}},
        "endpoint_url": "http://minio:p4ssword@127.0.0.1:9000"}
    data["input"]["storage_options"] = {"sas_token": "sv=2020&sig=abcdef",
                                        "account_key": "azure-key-value"}
    spec = parse_spec(data)
    p = SimpleNamespace(ds=xr.Dataset(attrs={"engine_catalog": "https://u:pw-value@h/c.yaml"}))
    prov = provenance(spec, p, {"job": spec_fingerprint(spec), "input": "x"}, "h", "gap filling")
    text = json.dumps(prov)
    for secret in ("AKIAEXAMPLE", "s3cr3t-value", "tok-value", "p4ssword", "abcdef",
                   "azure-key-value", "pw-value"):
        assert secret not in text
    # rotating a secret does not change the resume identity
    data["output"]["storage_options"]["secret"] = "rotated"
    assert spec_fingerprint(parse_spec(data)) == spec_fingerprint(spec)


def test_gapfill_on_the_second_real_cube(tmp_path, run_cli):
    """The shipped ERA5 job (dims number, time, isobaricInhPa, latitude, longitude) runs end
    to end: a level dim and a member dim, coordinates as features, maps on lat/lon."""
    data = yaml.safe_load(open(os.path.join(ROOT, "jobs", "gapfill-era5.yaml")))
    data["input"]["catalog"] = os.path.join(ROOT, "catalogs", "era5.yaml")
    data["output"]["url"] = str(tmp_path / "era5" / "filled.zarr")
    data["train"].update(epochs=4, patience=2)
    job = tmp_path / "era5.yaml"
    job.write_text(yaml.safe_dump(data))
    code, out, err = run_cli(["run", str(job), "--cluster", "threads", "--quiet"])
    assert code == 0, err
    ds = xr.open_zarr(tmp_path / "era5" / "filled.zarr")
    assert {"number", "isobaricInhPa"} <= set(ds.t_filled.dims)
    m = json.load(open(tmp_path / "era5" / "filled.run" / "metrics.json"))
    t = m["test"]
    assert t["model"]["rmse"] < t["train_mean"]["rmse"] / 2
    assert m["cells_filled"] == 0  # the sample has no gaps: nothing is invented
    np.testing.assert_array_equal(ds.t_filled.values, ds.t.values)
    assert (tmp_path / "era5" / "filled.run" / "map.png").stat().st_size > 0


def test_corrupt_checkpoint_is_one_line(cube, tmp_path, run_cli):
    _, cat = cube
    out = tmp_path / "out" / "c.zarr"
    job = make_job(tmp_path, cat, out)
    assert run_cli(["run", job, "--cluster", "threads", "--quiet"])[0] == 0
    ckpt = tmp_path / "out" / "c.run" / "best.pt"
    ckpt.write_bytes(b"not a checkpoint" * 10)
    code, _, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 2 and "--restart" in one_line(err) and "best.pt" in err
    code, _, _ = run_cli(["run", job, "--cluster", "threads", "--quiet", "--restart"])
    assert code == 0 and ckpt.stat().st_size > 200


def test_mlflow_gets_redacted_params_and_a_usable_default_store(tmp_path, monkeypatch):
    """tracking.mlflow without a uri: a SQLite store in the run folder (current mlflow
    refuses its old default file store), and parameters logged with secrets hidden."""
    import sys
    import types

    from engine.pipelines.runner import _Tracker
    from engine.pipelines.spec import parse_spec

    calls = {}
    fake = types.ModuleType("mlflow")
    fake.set_tracking_uri = lambda uri: calls.setdefault("uri", uri)
    fake.set_experiment = lambda name: None
    fake.start_run = lambda run_name=None: object()
    fake.log_params = lambda params: calls.setdefault("params", params)
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    data = yaml.safe_load(open(os.path.join(ROOT, "jobs", "gapfill.yaml")))
    data["tracking"] = {"mlflow": True}
    data["output"]["storage_options"] = {"secret": "mlflow-leak", "token": "tok-leak"}
    _Tracker(parse_spec(data), str(tmp_path / "run"))
    assert calls["uri"].startswith("sqlite:///") and str(tmp_path / "run") in calls["uri"]
    text = json.dumps(calls["params"])
    assert "mlflow-leak" not in text and "tok-leak" not in text
    assert calls["params"]["name"] == data["name"]


def test_out_of_memory_is_one_line(run_cli, monkeypatch, tmp_path):
    import engine._cli.main as cli_main

    def boom(args):
        raise MemoryError

    monkeypatch.setattr(cli_main, "cmd_validate", boom)
    code, _, err = run_cli(["validate", str(tmp_path / "job.yaml")])
    assert code == 2 and "out of memory" in one_line(err)


def test_s3_endpoint_with_a_password_is_one_line_and_hidden(cube, tmp_path, run_cli):
    _, cat = cube
    job = make_job(tmp_path, cat, "s3://bucket/out.zarr",
                   output={"storage_options": {"endpoint_url":
                                               "http://user:hunter2@127.0.0.1:1",
                                               "key": "k", "secret": "s3-secret"}})
    code, out, err = run_cli(["validate", job])
    assert code == 2
    line = one_line(err)
    assert "hunter2" not in err + out and "s3-secret" not in err + out
    assert "s3://bucket/out.zarr" in line


def test_a_run_plans_once(cube, tmp_path, run_cli, monkeypatch):
    """The command line checks everything before the cluster starts and the run uses that
    plan: the input store is listed for its identity once, not once per check."""
    import engine.io.stores as stores

    calls = []
    real = stores.store_identity

    def counting(url, storage_options=None):
        calls.append(url)
        return real(url, storage_options)

    monkeypatch.setattr(stores, "store_identity", counting)
    _, cat = cube
    job = make_job(tmp_path, cat, tmp_path / "out" / "once.zarr")
    assert run_cli(["run", job, "--cluster", "threads", "--quiet"])[0] == 0
    assert len(calls) == 1
