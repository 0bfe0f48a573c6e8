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
