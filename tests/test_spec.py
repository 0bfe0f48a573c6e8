"""Job specs: every bad field gets one line naming it."""

import copy

import pytest
import yaml

from engine.errors import SpecError
from engine.pipelines.spec import GapFillSpec, load_job, parse_spec

GOOD = yaml.safe_load(open("jobs/gapfill.yaml"))


def bad(path, value):
    d = copy.deepcopy(GOOD)
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    if value is KeyError:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return d


def test_shipped_jobs_parse():
    for name in ("jobs/gapfill.yaml", "jobs/gapfill-linear.yaml", "jobs/gapfill-esdc.yaml"):
        spec = load_job(name)
        assert isinstance(spec, GapFillSpec)
        assert spec.resolve(spec.input.catalog).endswith(".yaml")


@pytest.mark.parametrize(
    "path, value, words",
    [
        (("epochz",), 3, "unknown key epochz"),
        (("train", "epoch"), 3, "did you mean 'epochs'"),
        (("train", "epochs"), "ten", "train.epochs must be an integer"),
        (("train", "learning_rate"), "fast", "train.learning_rate must be a number"),
        (("split", "test_fraction"), 1.5, "split.test_fraction must be in (0, 1)"),
        (("split", "test_fraction"), 0, "split.test_fraction must be in (0, 1)"),
        (("split", "blocks"), [3, 10, 10], "split.blocks must be a mapping"),
        (("model", "kind"), "transformer", "model.kind must be one of"),
        (("features",), "AIRT", "features must be a list"),
        (("target",), KeyError, "missing required key target"),
        (("input", "entry"), KeyError, "missing required key input.entry"),
        (("features",), ["SST"], "also listed in features"),
    ],
)
def test_bad_fields(path, value, words):
    with pytest.raises(SpecError) as exc:
        parse_spec(bad(path, value))
    assert words in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_job_file(tmp_path):
    with pytest.raises(SpecError, match="job file not found"):
        load_job(str(tmp_path / "nope.yaml"))


def test_invalid_yaml(tmp_path):
    p = tmp_path / "j.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(str(p))


def test_spec_is_frozen():
    spec = load_job("jobs/gapfill.yaml")
    with pytest.raises(AttributeError):
        spec.target = "AIRT"
