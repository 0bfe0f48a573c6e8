"""Job kinds are found by name through a registry that installed packages extend."""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from engine.errors import SpecError
from engine.pipelines import registry
from engine.pipelines.registry import JobKind, get_kind, job_kinds
from engine.pipelines.spec import parse_spec


@dataclass(frozen=True)
class ToySpec:
    name: str
    kind: str = "toy"
    size: int = 1


TOY = JobKind(name="toy", summary="a toy kind from a plug-in", spec=ToySpec,
              run=lambda spec, **kw: spec.size, source="toy-package")


def _entry_points(*eps):
    def fake(group):
        assert group == registry.ENTRY_POINT_GROUP
        return list(eps)
    return fake


def _ep(name, obj):
    def load():
        if isinstance(obj, Exception):
            raise obj
        return obj
    return SimpleNamespace(name=name, value=f"toy_package:{name}", load=load)


def test_the_engines_kinds_are_registered():
    kinds = job_kinds()
    assert "gapfill" in kinds and kinds["gapfill"].spec.__name__ == "GapFillSpec"
    assert "regress" in kinds and kinds["regress"].spec.__name__ == "RegressSpec"
    with pytest.raises(SpecError, match="kind must be one of .*gapfill.*regress.*cube-engine "
                                        "jobs"):
        get_kind("segmant")


def test_a_plugin_kind_is_found_parsed_listed_and_run(monkeypatch, run_cli):
    monkeypatch.setattr(registry, "entry_points", _entry_points(_ep("toy", TOY)))
    spec = parse_spec({"name": "t", "kind": "toy", "size": 3})
    assert isinstance(spec, ToySpec) and get_kind("toy").run(spec) == 3
    with pytest.raises(SpecError, match="unknown key sise"):
        parse_spec({"name": "t", "kind": "toy", "sise": 3})
    code, out, _ = run_cli(["jobs"])
    assert code == 0 and "gapfill" in out and "toy" in out and "toy-package" in out


@pytest.mark.parametrize("obj, words", [
    (ImportError("no module named toy_package"), "cannot be loaded"),
    (object(), "is not an engine.pipelines.registry.JobKind"),
])
def test_a_broken_plugin_is_one_line(monkeypatch, run_cli, obj, words):
    monkeypatch.setattr(registry, "entry_points", _entry_points(_ep("toy", obj)))
    code, _, err = run_cli(["jobs"])
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_a_plugin_cannot_replace_an_engine_kind(monkeypatch):
    fake = JobKind(name="gapfill", summary="impostor", spec=ToySpec, run=lambda s, **k: 0)
    monkeypatch.setattr(registry, "entry_points", _entry_points(_ep("gapfill", fake)))
    assert job_kinds()["gapfill"].summary != "impostor"


def test_kind_must_be_a_name():
    with pytest.raises(SpecError, match="kind must be a string"):
        parse_spec({"name": "t", "kind": ["gapfill"]})
