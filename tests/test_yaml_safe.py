"""engine.io.yaml_safe: YAML as data only, with size, nesting and alias limits."""

from __future__ import annotations

import datetime
import time

import pytest

from engine.errors import CatalogError, SpecError
from engine.io.yaml_safe import MAX_BYTES, load_yaml

BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(
        f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
).encode()


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_plain_data_round_trips(tmp_path):
    text = (
        b"name: demo\nsize: 3\nratio: 0.5\nok: true\nnothing: null\n"
        b"when: 2020-01-02\nitems: [1, two, {x: 3}]\n'quoted': '!x'\n"
    )
    expected = {
        "name": "demo",
        "size": 3,
        "ratio": 0.5,
        "ok": True,
        "nothing": None,
        "when": datetime.date(2020, 1, 2),
        "items": [1, "two", {"x": 3}],
        "quoted": "!x",
    }
    assert load_yaml(text, "doc") == expected
    path = tmp_path / "a.yaml"
    path.write_bytes(text)
    assert load_yaml(path, "doc") == expected
    assert load_yaml(str(path), "doc") == expected
    assert load_yaml(b"", "doc") is None


def test_billion_laughs_is_refused_fast_in_one_line():
    assert len(BOMB) < 1024
    start = time.perf_counter()
    with pytest.raises(SpecError) as err:
        load_yaml(BOMB, "job file bomb.yaml")
    assert time.perf_counter() - start < 1.0
    msg = _one_line(err)
    assert msg.startswith("job file bomb.yaml at line 1:") and "anchor &a" in msg


def test_alias_without_anchor_and_merge_key_are_refused():
    with pytest.raises(SpecError, match=r"line 2: YAML alias \*x is not allowed"):
        load_yaml(b"a: 1\nb: *x\n", "doc")
    with pytest.raises(SpecError, match="anchor &base"):
        load_yaml(b"base: &base {a: 1}\nother:\n  <<: *base\n", "doc")


@pytest.mark.parametrize(
    "text, tag",
    [
        (b"!!python/object/apply:os.system ['touch x']", "!!python/object/apply:os.system"),
        (b"a: !!python/name:os.system", "!!python/name:os.system"),
        (b"a: !custom 1", "!custom"),
        (b"a: !!binary aGk=", "!!binary"),
    ],
)
def test_tags_other_than_plain_types_are_refused(text, tag):
    with pytest.raises(SpecError) as err:
        load_yaml(text, "doc")
    assert f"YAML tag {tag} is not allowed" in _one_line(err)


def test_size_cap_checked_before_parsing(tmp_path):
    big = b"a: '" + b"x" * MAX_BYTES + b"'\n"
    with pytest.raises(SpecError, match="byte limit"):
        load_yaml(big, "doc")
    path = tmp_path / "big.yaml"
    path.write_bytes(big)
    with pytest.raises(SpecError, match=r"big.yaml: \d+ bytes is more than"):
        load_yaml(path, f"catalog {path}")
    assert load_yaml(b"a: 'xxxx'", "doc", max_bytes=9) == {"a": "xxxx"}
    with pytest.raises(SpecError, match="10-byte limit"):
        load_yaml(b"a: 'xxxxxx'", "doc", max_bytes=10)


def test_depth_cap():
    ok = b"x: " + b"[" * 63 + b"]" * 63
    assert load_yaml(ok, "doc")["x"] is not None  # the mapping plus 63 lists: 64 levels
    deep = b"x: " + b"[" * 64 + b"]" * 64
    with pytest.raises(SpecError, match="nested more than 64 levels deep"):
        load_yaml(deep, "doc")
    with pytest.raises(SpecError, match="more than 3 levels"):
        load_yaml(b"a: {b: {c: {d: 1}}}", "doc", max_depth=3)


def test_repeated_keys_complex_keys_and_documents_are_refused():
    with pytest.raises(SpecError, match=r"line 3: key 'a' is repeated"):
        load_yaml(b"a: 1\nb: {a: 2}\na: 3\n", "doc")
    with pytest.raises(SpecError, match="used as a key"):
        load_yaml(b"? [1, 2]\n: v\n", "doc")
    with pytest.raises(SpecError, match="more than one YAML document"):
        load_yaml(b"a: 1\n---\nb: 2\n", "doc")


def test_errors_name_what_and_the_line_and_can_be_catalog_errors(tmp_path):
    with pytest.raises(CatalogError) as err:
        load_yaml(b"a: 1\nb: [\n", "catalog c.yaml", error=CatalogError)
    msg = _one_line(err)
    assert msg.startswith("catalog c.yaml at line ") and "not valid YAML" in msg
    with pytest.raises(SpecError, match="file not found"):
        load_yaml(tmp_path / "missing.yaml", "doc")
    with pytest.raises(SpecError, match="is a directory"):
        load_yaml(tmp_path, "doc")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_yaml(b"a: \xff", "doc")


def test_what_with_a_password_is_redacted():
    with pytest.raises(SpecError) as err:
        load_yaml(b"a: *x", "catalog https://u:hunter2@h/c.yaml")
    assert "hunter2" not in str(err.value) and "u:***@h" in str(err.value)
