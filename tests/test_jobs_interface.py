"""The job interface: a kind written on engine.pipelines.job.Job, registered through an entry
point, runs end to end through the shared runner and the command line; the runner owns the
plumbing (run folder, resume, provenance, metrics.json, the bad-input contract)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pytest
import xarray as xr
import yaml

from engine.errors import CubeError
from engine.pipelines import registry
from engine.pipelines.job import Job, Prepared, Report, RunContext, Trained, open_input
from engine.pipelines.spec import InputSpec, JobSpecBase, OutputSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOG = os.path.join(ROOT, "catalogs", "era5.yaml")
ENTRY = "era5_levels_members"


@dataclass(frozen=True)
class MeanSpec(JobSpecBase):
    """Predict ``variable`` by its mean over the training members (a toy kind)."""

    name: str
    input: InputSpec
    output: OutputSpec
    variable: str
    test_members: list[int]
    kind: Literal["member-mean"] = "member-mean"
    seed: int = 0
    base_dir: str = "."


class MemberMean(Job):
    """The toy kind: fits a mean field on the training members, predicts it for the test
    members. Counts each step so tests can see what the runner called."""

    name = "member-mean"
    summary = "toy: mean field of the training members"
    title = "member mean"
    spec = MeanSpec
    calls: dict[str, int] = {}

    def _count(self, step: str) -> None:
        self.calls[step] = self.calls.get(step, 0) + 1

    def prepare(self, spec: MeanSpec) -> Prepared:
        self._count("prepare")
        p = open_input(spec)
        if spec.variable not in p.ds.data_vars:
            raise CubeError(f"variable {spec.variable!r} is not in the cube; use one of "
                            f"{', '.join(map(str, p.ds.data_vars))}")
        return p

    def split(self, p: Prepared) -> dict[str, list[int]]:
        self._count("split")
        members = [int(m) for m in p.ds["number"].values]
        bad = [m for m in p.spec.test_members if m not in members]
        if bad:
            raise CubeError(f"test_members {bad} are not members of the cube ({members})")
        return {"train": [m for m in members if m not in p.spec.test_members],
                "test": list(p.spec.test_members)}

    def train(self, p: Prepared, split: Any, ctx: RunContext) -> Trained:
        self._count("train")
        path = ctx.path("mean.npy")
        if ctx.previous is not None:
            mean = np.load(path)
        else:
            self._count("fit")
            mean = p.ds[p.spec.variable].sel(number=split["train"]).mean("number").values
            np.save(path, mean)
        return Trained(model=mean, info={"n_members": len(split["train"])},
                       model_hash=hashlib.sha256(mean.tobytes()).hexdigest(),
                       checkpoints=["mean.npy"], fresh=ctx.previous is None)

    def predict(self, p: Prepared, split: Any, trained: Trained, ctx: RunContext) -> xr.Dataset:
        self._count("predict")
        truth = p.ds[p.spec.variable].sel(number=split["test"])
        pred = xr.zeros_like(truth) + trained.model
        out = xr.Dataset({"truth": truth, "predicted": pred.astype(np.float32)})
        out.attrs["engine_split"] = json.dumps(split)
        return out

    def evaluate(self, p: Prepared, split: Any, trained: Trained, written: xr.Dataset,
                 ctx: RunContext) -> dict[str, Any]:
        self._count("evaluate")
        err = (written["predicted"] - written["truth"]).values
        return {"rmse": float(np.sqrt(np.mean(err**2))), "n": int(err.size)}

    def report(self, p: Prepared, split: Any, trained: Trained, metrics: dict[str, Any],
               written: xr.Dataset, ctx: RunContext) -> Report:
        self._count("report")
        return Report(title=f"{p.spec.name}: test members {split['test']}",
                      columns=["model", "RMSE"], rows=[["member mean", f"{metrics['rmse']:.3f}"]],
                      notes=[f"{metrics['n']:,} test cells"])


@pytest.fixture
def toy(monkeypatch):
    """The toy kind installed as a plug-in (entry point group cube_engine.jobs)."""
    job = MemberMean()
    job.calls = {}
    ep = SimpleNamespace(name="member-mean", value="toy_jobs:JOB", load=lambda: job)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    return job


def _job(tmp_path, **changes) -> str:
    data = {"name": "toy-mean", "kind": "member-mean",
            "input": {"catalog": CATALOG, "entry": ENTRY},
            "output": {"url": str(tmp_path / "out" / "mean.zarr")},
            "variable": "t", "test_members": [8, 9], **changes}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_job_instance_from_an_entry_point_is_a_kind(toy, run_cli):
    kind = registry.get_kind("member-mean")
    assert kind.job is toy and kind.source == "toy_jobs" and kind.spec is MeanSpec
    code, out, _ = run_cli(["jobs"])
    assert code == 0 and "member-mean" in out and "gapfill" in out


def test_the_runner_runs_every_step_and_owns_the_plumbing(toy, tmp_path, run_cli):
    job = _job(tmp_path)
    code, out, err = run_cli(["validate", job])
    assert code == 0 and "output" in out and "create" in out, err
    assert toy.calls == {"prepare": 1, "split": 1}  # validate: no training, nothing written
    assert not (tmp_path / "out").exists()

    code, out, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 0, err
    out = " ".join(out.split())  # the console wraps at 80 columns
    assert toy.calls["fit"] == 1 and toy.calls["report"] == 1
    assert "write" in out and "nothing new" not in out
    assert "member mean" in out and "test members [8, 9]" in out and "test cells" in out
    ds = xr.open_zarr(tmp_path / "out" / "mean.zarr")
    assert list(ds["number"].values) == [8, 9]
    truth = xr.open_zarr(os.path.join(ROOT, "catalogs", "data", "era5_levels_members.zarr"))
    np.testing.assert_allclose(ds["predicted"].isel(number=0).values,
                               truth["t"].sel(number=list(range(8))).mean("number").values,
                               rtol=1e-6)
    # the runner's provenance next to the kind's own keys
    assert json.loads(ds.attrs["engine_split"])["test"] == [8, 9]
    assert ds.attrs["engine_job_kind"] == "member-mean" and "member mean" in ds.attrs["title"]
    assert ds.attrs["engine_catalog_entry"] == ENTRY and ds.attrs["license"].startswith("ERA5")
    run = tmp_path / "out" / "mean.run"
    m = json.load(open(run / "metrics.json"))
    assert m["rmse"] > 0 and m["n"] == 2 * 4 * 2 * 61 * 120
    assert m["identity"]["input_entry"] == ENTRY and m["throughput"]["trained"] is True
    train = json.load(open(run / "train.json"))
    assert train["checkpoints"] == ["mean.npy"] and train["identity"] == m["identity"]

    # a rerun resumes: the checkpoint is loaded, not refitted, and no region is rewritten
    code, out, err = run_cli(["run", job, "--cluster", "threads", "--quiet"])
    assert code == 0, err
    assert toy.calls["fit"] == 1 and toy.calls["train"] == 2
    assert "nothing new to compute" in " ".join(out.split())
    m2 = json.load(open(run / "metrics.json"))
    assert m2["throughput"]["resumed_runs"][0]["regions_written"] == 0
    # --restart refits
    assert run_cli(["run", job, "--cluster", "threads", "--quiet", "--restart"])[0] == 0
    assert toy.calls["fit"] == 2


def test_a_changed_spec_is_refused_without_restart(toy, tmp_path, run_cli):
    job = _job(tmp_path)
    assert run_cli(["run", job, "--cluster", "threads", "--quiet"])[0] == 0
    before = sorted(os.listdir(tmp_path / "out" / "mean.zarr"))
    code, _, err = run_cli(["run", job, "--cluster", "threads", "--quiet",
                            "--set", "test_members=[7, 9]"])
    assert code == 2 and "--restart" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "out" / "mean.zarr")) == before
    assert toy.calls["fit"] == 1


@pytest.mark.parametrize("changes, words", [
    ({"variable": "q"}, "variable 'q'"),
    ({"test_members": [42]}, "test_members [42]"),
    ({"variabel": "t"}, "unknown key variabel"),
    ({"name": "../escape"}, "safe path component"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(toy, tmp_path, run_cli, changes,
                                                         words):
    job = _job(tmp_path, **changes)
    for verb in (["validate", job], ["run", job, "--cluster", "threads"]):
        code, _, err = run_cli(verb)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert not (tmp_path / "out").exists() and toy.calls.get("train", 0) == 0


def test_output_at_the_input_store_is_refused(toy, tmp_path, run_cli):
    store = os.path.join(ROOT, "catalogs", "data", "era5_levels_members.zarr")
    before = sorted(os.listdir(store))
    job = _job(tmp_path, output={"url": os.path.join(store, "out.zarr")})
    code, _, err = run_cli(["run", job, "--cluster", "threads"])
    assert code == 2 and "input" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(store)) == before and toy.calls.get("train", 0) == 0


def test_the_runner_refuses_a_spec_of_another_kind(toy, tmp_path):
    from engine.errors import SpecError
    from engine.pipelines.gapfill import GAPFILL
    from engine.pipelines.runner import plan_job
    from engine.pipelines.spec import load_job

    with pytest.raises(SpecError, match="a gapfill job needs a GapFillSpec, got MeanSpec"):
        plan_job(GAPFILL, load_job(_job(tmp_path)))


def test_the_content_of_a_weights_file_is_part_of_the_resume_identity(tmp_path):
    """A spec that names a weights file (model.weights) depends on its bytes, not its
    path: a file replaced in place changes the identity, so a finished store is not
    reused for a different model."""
    from types import SimpleNamespace

    from engine.pipelines.runner import _weights_digest

    path = tmp_path / "w.pt"
    path.write_bytes(b"one")
    spec = SimpleNamespace(model=SimpleNamespace(weights="w.pt"),
                           resolve=lambda p: str(tmp_path / p))
    first = _weights_digest(spec)
    path.write_bytes(b"two")
    assert first and _weights_digest(spec) not in (None, first)
    assert _weights_digest(SimpleNamespace(model=SimpleNamespace(weights=None))) is None
    assert _weights_digest(SimpleNamespace()) is None
