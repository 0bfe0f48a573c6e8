"""Every benchmark runs once at a tiny size so none rots (ratios are measured, not asserted
at this size: the bounds are checked by the default-size runs recorded in benchmarks/results)."""

import importlib

import pytest

from benchmarks.__main__ import BENCHMARKS


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_runs_tiny(name):
    res = importlib.import_module(BENCHMARKS[name]).run("tiny")
    assert res["ratios"]
    for value in res["ratios"].values():
        assert value > 0


def test_projection_from_the_committed_results():
    """The projection page's numbers come from the committed default-size results."""
    from benchmarks.projection import GPUS, markdown, project
    from benchmarks.projection import inputs as projection_inputs

    p = project(projection_inputs())
    assert [r["gpus"] for r in p["rows"]] == list(GPUS)
    walls = [r["wall_s"] for r in p["rows"]]
    assert walls == sorted(walls, reverse=True) and walls[-1] > 0
    for r in p["rows"]:  # larger work units always mean fewer tasks
        tasks = [c["tasks"] for c in r["chunkings"].values()]
        assert tasks == sorted(tasks, reverse=True)
    assert "tiles/s per GPU" in markdown(p)


def test_a_subset_run_keeps_the_other_benchmarks_in_the_summary(tmp_path, monkeypatch):
    """``python -m benchmarks predict`` rewrites the summary table with every benchmark's
    committed figures, not only the one it ran."""
    import json
    import sys
    import types

    import benchmarks.__main__ as runner
    import benchmarks._common as common

    monkeypatch.setattr(common, "RESULTS", str(tmp_path))
    fake = types.ModuleType("fake_bench")
    fake.main = lambda argv: {"ratios": {"speed": 2.0}, "targets": {"speed": 1.0}}
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setattr(runner, "BENCHMARKS", {"ran": "fake_bench", "kept": "unused"})
    (tmp_path / "bench_kept-default.json").write_text(
        json.dumps({"ratios": {"old": 3.0}, "targets": {}}))
    assert runner.main(["ran"]) == 0
    rows = json.loads((tmp_path / "summary-default.json").read_text())["rows"]
    assert {(r["benchmark"], r["ratio"]) for r in rows} == {("ran", 2.0), ("kept", 3.0)}


def test_noop_ceiling_compares_two_checkouts_and_refuses_a_wrong_path(tmp_path):
    """The revision comparison runs (here: this checkout against itself) and a path that
    is not a checkout is one clear line."""
    import os

    from benchmarks.noop_ceiling import run

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = run(here, rounds=1, repeats=1)
    assert res["tiles"] == 2312 and 0.3 < res["ratio"] < 3
    with pytest.raises(SystemExit, match="not a cube-engine checkout"):
        run(str(tmp_path))
