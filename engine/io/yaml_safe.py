"""YAML that is data only: one loader for catalogs, job specs and manifests.

:func:`load_yaml` parses with PyYAML's safe loader (no ``!!python/...`` tags) after a
scan of the event stream that refuses, each with one line naming the document and the
line:

- documents larger than ``max_bytes`` (1 MB by default), before they are parsed;
- anchors and aliases (``&a`` / ``*a``, hence ``<<: *a`` merges too): a 1 KB "billion
  laughs" document expands to gigabytes once its aliases are resolved;
- nesting deeper than ``max_depth`` (64 by default);
- explicit tags other than the plain YAML types (str, int, float, bool, null, map, seq,
  timestamp);
- a key repeated in one mapping (YAML keeps the last silently; a reviewer reads the first);
- more than one document in the stream.

The scan runs on libyaml's C parser where it is installed, so a refused document is
refused in milliseconds, and nothing is constructed before it passes.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from engine.errors import EngineError, SpecError
from engine.redact import redact_text

__all__ = ["load_yaml", "MAX_BYTES", "MAX_DEPTH"]

#: Largest YAML document accepted, in bytes.
MAX_BYTES = 1 << 20
#: Deepest nesting of mappings and sequences accepted.
MAX_DEPTH = 64

_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TAG = "tag:yaml.org,2002:"
_PLAIN_TAGS = frozenset(
    _TAG + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")
)


def _fail(error: type[EngineError], what: str, msg: str, mark: Any = None) -> EngineError:
    at = f" at line {mark.line + 1}" if mark is not None else ""
    return error(" ".join(redact_text(f"{what}{at}: {msg}").split()))


def _read(
    source: str | os.PathLike | bytes, what: str, max_bytes: int, error: type[EngineError]
) -> str:
    if isinstance(source, (bytes, bytearray)):
        raw = bytes(source)
    else:
        path = os.fspath(source)
        try:
            size = os.stat(path).st_size
            if size > max_bytes:
                raise _fail(
                    error,
                    what,
                    f"{size} bytes is more than the {max_bytes}-byte "
                    "limit for a YAML document; split it or trim it",
                )
            with open(path, "rb") as f:
                raw = f.read(max_bytes + 1)
        except FileNotFoundError:
            raise _fail(error, what, f"file not found: {path}") from None
        except IsADirectoryError:
            raise _fail(error, what, f"{path} is a directory, not a YAML file") from None
        except OSError as err:
            raise _fail(error, what, f"cannot read {path}: {err.strerror or err}") from None
    if len(raw) > max_bytes:
        raise _fail(
            error,
            what,
            f"more than the {max_bytes}-byte limit for a YAML document; split it or trim it",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _fail(error, what, f"not UTF-8 text (bad byte at offset {err.start})") from None


class _Frame:
    __slots__ = ("mapping", "expect_key", "keys")

    def __init__(self, mapping: bool) -> None:
        self.mapping = mapping
        self.expect_key = mapping
        self.keys: set[str] = set()


def _scan(text: str, what: str, max_depth: int, error: type[EngineError]) -> None:
    """Refuse aliases, anchors, deep nesting, odd tags and repeated keys from the events."""
    stack: list[_Frame] = []
    documents = 0
    for event in yaml.parse(text, Loader=_Loader):
        mark = event.start_mark
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _fail(
                    error,
                    what,
                    "more than one YAML document ('---'); keep one document per file",
                    mark,
                )
            continue
        if isinstance(event, yaml.AliasEvent):
            raise _fail(
                error,
                what,
                f"YAML alias *{event.anchor} is not allowed; "
                "write the value out instead of referring to an anchor",
                mark,
            )
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            stack.pop()
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue
        if event.anchor is not None:
            raise _fail(
                error,
                what,
                f"YAML anchor &{event.anchor} is not allowed; write each value out",
                mark,
            )
        tag = getattr(event, "tag", None)
        if tag not in (None, "!") and tag not in _PLAIN_TAGS:
            shown = "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag
            raise _fail(
                error,
                what,
                f"YAML tag {shown} is not allowed (data only: strings, "
                "numbers, booleans, null, lists and mappings)",
                mark,
            )
        parent = stack[-1] if stack else None
        if parent is not None and parent.mapping:
            if parent.expect_key:
                if not isinstance(event, yaml.ScalarEvent):
                    raise _fail(
                        error,
                        what,
                        "a mapping or list used as a key is not allowed; keys must be plain values",
                        mark,
                    )
                if event.value in parent.keys:
                    raise _fail(
                        error,
                        what,
                        f"key {event.value!r} is repeated in one mapping; keep one",
                        mark,
                    )
                parent.keys.add(event.value)
            parent.expect_key = not parent.expect_key
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(stack) >= max_depth:
                raise _fail(
                    error, what, f"nested more than {max_depth} levels deep; flatten it", mark
                )
            stack.append(_Frame(isinstance(event, yaml.MappingStartEvent)))


def load_yaml(
    source: str | os.PathLike | bytes,
    what: str,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    error: type[EngineError] = SpecError,
) -> Any:
    """Parse one YAML document as plain data, refusing what could blow up or run code.

    Parameters
    ----------
    source
        A path (``str`` or ``os.PathLike``) of a YAML file, or the document itself as
        ``bytes`` (UTF-8).
    what
        What the document is, for messages: ``"job file jobs/a.yaml"``, ``"catalog x"``.
    max_bytes, max_depth
        Size and nesting caps.
    error
        The error class raised (:class:`~engine.errors.SpecError` by default; catalogs
        pass :class:`~engine.errors.CatalogError`).

    Returns
    -------
    The parsed value (``None`` for an empty document).

    Raises
    ------
    SpecError (or ``error``)
        With one line: ``"<what> at line N: <what is wrong and what to do>"``.

    Examples
    --------
    >>> load_yaml(b"a: [1, 2]", "example")
    {'a': [1, 2]}
    >>> load_yaml(b"a: &x [1]\\nb: *x", "example")
    Traceback (most recent call last):
    ...
    engine.errors.SpecError: example at line 1: YAML anchor &x is not allowed; write each value out
    """
    text = _read(source, what, max_bytes, error)
    try:
        _scan(text, what, max_depth, error)
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        problem = getattr(err, "problem", None) or "invalid syntax"
        raise _fail(error, what, f"not valid YAML ({problem}); fix the syntax", mark) from None
