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
    import glob

    from engine.pipelines.registry import get_kind
    from engine.pipelines.spec import JobSpecBase

    kinds = set()
    for name in sorted(glob.glob("jobs/*.yaml")):
        spec = load_job(name)
        assert isinstance(spec, get_kind(yaml.safe_load(open(name))["kind"]).spec)
        assert isinstance(spec, JobSpecBase)
        # a catalog file, or none for a kind that makes its own input (embed's fields)
        assert not spec.input.catalog or spec.resolve(spec.input.catalog).endswith(".yaml")
        kinds.add(spec.kind)
    assert {"gapfill", "regress", "segment", "classify", "apply", "embed",
            "cloud-metrics"} <= kinds
    assert isinstance(load_job("jobs/gapfill.yaml"), GapFillSpec)


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


# Every range check of the spec has a bad-value case (a removed check must fail a test).
RANGE_CASES = [
    (("train", "epochs"), 0, "train.epochs must be in [1,"),
    (("train", "epochs"), 10**9, "train.epochs must be in [1,"),
    (("train", "batch_size"), 0, "train.batch_size must be in [1,"),
    (("train", "batch_size"), 1 << 30, "train.batch_size must be in [1,"),
    (("train", "learning_rate"), 0, "train.learning_rate must be > 0"),
    (("train", "learning_rate"), -0.1, "train.learning_rate must be > 0"),
    (("train", "learning_rate"), float("nan"), "train.learning_rate must be > 0"),
    (("train", "weight_decay"), -1e-4, "train.weight_decay must be >= 0"),
    (("train", "patience"), 0, "train.patience must be in [1,"),
    (("train", "min_delta"), -1.0, "train.min_delta must be >= 0"),
    (("split", "test_fraction"), -0.2, "split.test_fraction must be in (0, 1)"),
    (("split", "validation_fraction"), 0.0, "split.validation_fraction must be in (0, 1)"),
    (("split", "validation_fraction"), 1.0, "split.validation_fraction must be in (0, 1)"),
    (("split", "blocks"), {"lat": 0}, "split.blocks.lat must be >= 1"),
    (("split", "blocks"), {}, "split.blocks must name at least one dimension"),
    (("split", "buffer"), {"lat": -1}, "split.buffer.lat must be >= 0"),
    (("split", "seed"), -1, "split.seed must be in [0, 2**63)"),
    (("seed",), -5, "seed must be in [0, 2**63)"),
    (("model", "hidden"), [64, 0], "model.hidden must list positive layer widths"),
    (("model", "hidden"), [], "model.hidden must list positive layer widths"),
    (("model", "hidden"), [1_000_000_000], "model.hidden widths must be <="),
    (("model", "hidden"), [60_000, 60_000], "parameters, more than"),
    (("output", "plot_time"), -1, "output.plot_time must be >= 0"),
    (("output", "fill_margin"), -0.1, "output.fill_margin must be in [0, 1]"),
    (("output", "fill_margin"), 2.0, "output.fill_margin must be in [0, 1]"),
    (("output", "url"), "", "output.url must name the output store"),
    (("features",), [], "features must list at least one variable"),
    (("features",), ["AIRT", "AIRT"], "features lists 'AIRT' twice"),
    (("mask",), "AIRT", "mask 'AIRT' is also the target or a feature"),
    (("input", "dims"), {"lat": "COADSY"}, "input.dims keys ['lat']: use y, x, time"),
    (("name",), "../../etc", "must be one safe path component"),
    (("name",), "/abs/path", "must be one safe path component"),
    (("name",), "..", "must be one safe path component"),
    (("name",), "a/b", "must be one safe path component"),
    (("name",), "", "must be one safe path component"),
]


@pytest.mark.parametrize("path, value, words", RANGE_CASES,
                         ids=[".".join(c[0]) + f"={c[1]!r}"[:30] for c in RANGE_CASES])
def test_range_checks(path, value, words):
    with pytest.raises(SpecError) as exc:
        parse_spec(bad(path, value))
    assert words in str(exc.value)
    assert "\n" not in str(exc.value)


def test_good_values_at_the_bounds_pass():
    for path, value in ((("train", "epochs"), 1), (("train", "patience"), 1),
                        (("split", "buffer"), {"lat": 0}), (("output", "fill_margin"), 0.0),
                        (("output", "fill_margin"), 1.0), (("name",), "a.b_c-1"),
                        (("model", "hidden"), [65_536])):
        parse_spec(bad(path, value))


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    assert p.stat().st_size < 1024
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as exc:
        load_job(str(p))
    assert time.perf_counter() - t0 < 2
    assert "\n" not in str(exc.value)


def test_python_tags_are_not_executed(tmp_path):
    p = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    p.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SpecError):
        load_job(str(p))
    assert not marker.exists()


def test_overrides_set_dotted_keys_with_yaml_values(tmp_path):
    from engine.pipelines.spec import apply_overrides

    data = apply_overrides(GOOD, ["train.epochs=3", "split.blocks={time: 2, lat: 5, lon: 5}",
                                  "features=[AIRT]", "mask=null", "model.kind=linear"])
    spec = parse_spec(data)
    assert spec.train.epochs == 3 and spec.split.blocks == {"time": 2, "lat": 5, "lon": 5}
    assert spec.features == ["AIRT"] and spec.mask is None and spec.model.kind == "linear"
    assert GOOD["train"]["epochs"] == 60  # the original is untouched
    job = tmp_path / "j.yaml"
    job.write_text(yaml.safe_dump(GOOD))
    assert load_job(str(job), ["train.patience=2"]).train.patience == 2


@pytest.mark.parametrize("item, words", [
    ("train.epochs", "write KEY=VALUE"),
    ("=3", "write KEY=VALUE"),
    ("train..epochs=3", "write KEY=VALUE"),
    ("train.epochs.x=3", "train.epochs is int, not a mapping"),
    ("train.epochs=[1, &a 2, *a]", "anchor &a is not allowed"),
])
def test_bad_overrides_are_one_line(item, words):
    from engine.pipelines.spec import apply_overrides

    with pytest.raises(SpecError) as exc:
        apply_overrides(GOOD, [item])
    assert words in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("item, words", [
    ("train.epoch=3", "did you mean 'epochs'"),
    ("train.epochs=ten", "train.epochs must be an integer"),
    ("train.epochs=0", "train.epochs must be in [1,"),
])
def test_overrides_go_through_the_spec_checks(item, words):
    from engine.pipelines.spec import apply_overrides

    with pytest.raises(SpecError, match=words.replace("[", r"\[").replace("(", r"\(")):
        parse_spec(apply_overrides(GOOD, [item]))
