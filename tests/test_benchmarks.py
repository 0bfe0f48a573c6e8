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
