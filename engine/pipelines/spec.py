"""Job specs are data: YAML files parsed into frozen dataclasses.

Parsing names the bad field on every error (``train.epochs must be an integer, got
'ten'``), suggests the closest key for a misspelling, and never guesses.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.errors import SpecError

__all__ = [
    "JobSpecBase",
    "InputSpec",
    "SplitSpec",
    "ModelSpec",
    "TrainSpec",
    "OutputSpec",
    "GapFillOutputSpec",
    "TrackingSpec",
    "GapFillSpec",
    "load_job",
    "parse_spec",
    "apply_overrides",
]


@dataclass(frozen=True)
class InputSpec:
    catalog: str
    entry: str
    chunks: dict[str, int] | None = None
    storage_options: dict[str, Any] | None = None
    #: The cube's dims by role (keys y, x, time, vertical) when CF attributes and names
    #: cannot tell, e.g. ``{y: COADSY, x: COADSX}``.
    dims: dict[str, str] | None = None


@dataclass(frozen=True)
class SplitSpec:
    method: Literal["block", "random"] = "block"
    #: Block size per dim; ``lat``/``lon`` (and ``latitude``, ``y``, ...) mean the cube's
    #: horizontal dims whatever they are called.
    blocks: dict[str, int] = field(default_factory=lambda: {"time": 3, "lat": 10, "lon": 10})
    test_fraction: float = 0.2
    validation_fraction: float = 0.1
    buffer: dict[str, int] = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True)
class ModelSpec:
    kind: Literal["linear", "mlp"] = "linear"
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: Literal["relu", "gelu", "tanh", "elu"] = "relu"


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = 100
    batch_size: int = 1024
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10
    min_delta: float = 0.0

    def check(self) -> None:
        """Ranges of the ``train`` section (one line naming the field)."""
        t = self
        if not 1 <= t.epochs <= MAX_EPOCHS:
            raise SpecError(f"train.epochs must be in [1, {MAX_EPOCHS}], got {t.epochs}")
        if not 1 <= t.batch_size <= MAX_BATCH_SIZE:
            raise SpecError(f"train.batch_size must be in [1, {MAX_BATCH_SIZE}], got "
                            f"{t.batch_size}")
        if not (t.learning_rate > 0 and math.isfinite(t.learning_rate)):
            raise SpecError(f"train.learning_rate must be > 0, got {t.learning_rate}")
        if not (t.weight_decay >= 0 and math.isfinite(t.weight_decay)):
            raise SpecError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
        if not 1 <= t.patience <= MAX_EPOCHS:
            raise SpecError(f"train.patience must be in [1, {MAX_EPOCHS}], got {t.patience}")
        if not (t.min_delta >= 0 and math.isfinite(t.min_delta)):
            raise SpecError(f"train.min_delta must be >= 0, got {t.min_delta}")


@dataclass(frozen=True)
class OutputSpec:
    """Where a job writes: the store, its run folder and the map step of the plots."""

    url: str
    #: Run folder (checkpoint, metrics, plots); default: ``<store name>.run`` beside the store.
    dir: str | None = None
    storage_options: dict[str, Any] | None = None
    plot_time: int = 0


@dataclass(frozen=True)
class GapFillOutputSpec(OutputSpec):
    #: Predictions outside [min, max] of the training target, widened by this share of its
    #: range on each side, are not written as fills (``filled_flag`` 2 = out of range).
    fill_margin: float = 0.0


@dataclass(frozen=True)
class TrackingSpec:
    mlflow: bool = False
    uri: str | None = None
    experiment: str = "cube-engine"


class JobSpecBase:
    """What every job kind's spec shares (a mixin of the kind's frozen dataclass, which
    declares ``name``, ``input``, ``output``, ``seed`` and ``base_dir: str = "."``)."""

    base_dir: str

    def resolve(self, path: str) -> str:
        """Resolve a path of the spec against the job file's directory (URLs untouched)."""
        if "://" in path or os.path.isabs(path):
            return path
        return os.path.normpath(os.path.join(self.base_dir, path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        d.pop("base_dir")
        return d

    def check(self) -> None:
        """Checks that need no cube, run by :func:`parse_spec`; a kind extends it (calling
        ``super().check()``) and raises :class:`SpecError` naming the field."""
        _check_common(self)


@dataclass(frozen=True)
class GapFillSpec(JobSpecBase):
    """A gap-filling job: predict ``target`` from ``features`` where the target is missing."""

    name: str
    input: InputSpec
    target: str
    features: list[str]
    output: GapFillOutputSpec
    kind: Literal["gapfill"] = "gapfill"
    mask: str | None = None
    split: SplitSpec = field(default_factory=SplitSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    seed: int = 0
    #: Directory of the job file; relative catalog paths resolve against it.
    base_dir: str = "."

    def check(self) -> None:
        super().check()
        _check_gapfill(self)


#: Upper bounds of sizes a spec may ask for: a typo must not allocate the machine away.
MAX_LAYER_WIDTH = 65_536
MAX_PARAMETERS = 50_000_000
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 1 << 22
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list,):
        return "a list"
    if origin in (dict,):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except SpecError as err:
                errors.append(err)
        raise errors[0]
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"{where} must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise SpecError(f"{where} must be {_describe(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where} must be a list, got {value!r}")
        (item,) = args
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where} must be a mapping, got {value!r}")
        kt, vt = args
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{where} must be a string, got {value!r}")
        return value
    raise SpecError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "base_dir"}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(
                f"unknown key {prefix}{key}{hint}; allowed keys: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"missing required key {prefix}{name}")
    return cls(**kwargs)


def parse_spec(data: dict[str, Any], base_dir: str = ".") -> Any:
    """Build the spec of the job's ``kind`` (a :class:`GapFillSpec` for gap filling) from a
    mapping; raise :class:`SpecError` naming the bad field."""
    if not isinstance(data, dict):
        raise SpecError("a job spec must be a YAML mapping at the top level")
    from engine.pipelines.registry import get_kind

    kind = data.get("kind", "gapfill")
    if not isinstance(kind, str):
        raise SpecError(f"kind must be a string naming a job kind, got {kind!r}")
    spec = _build(get_kind(kind).spec, data)
    if "base_dir" in {f.name for f in dataclasses.fields(spec)}:
        spec = dataclasses.replace(spec, base_dir=base_dir)
    if isinstance(spec, JobSpecBase):
        spec.check()
    return spec


def _check_common(spec: Any) -> None:
    """What every kind's spec must satisfy: a safe name, a seed, an output store, the
    ``input.dims`` roles and the ``train`` ranges where the kind has a ``train`` section."""
    if not _SAFE_NAME.match(spec.name) or spec.name.strip(".") == "":
        raise SpecError(f"name {spec.name!r} must be one safe path component (letters, digits, "
                        "'.', '_', '-'; no '/', no leading '.'), e.g. gapfill-coads-mlp")
    if not 0 <= spec.seed < 2**63:
        raise SpecError(f"seed must be in [0, 2**63), got {spec.seed}")
    o = spec.output
    if not o.url:
        raise SpecError("output.url must name the output store, e.g. runs/NAME/out.zarr")
    if getattr(o, "plot_time", 0) < 0:
        raise SpecError(f"output.plot_time must be >= 0, got {o.plot_time}")
    if spec.input.dims:
        bad = [k for k in spec.input.dims if k not in ("y", "x", "time", "vertical")]
        if bad:
            raise SpecError(f"input.dims keys {bad}: use y, x, time, vertical")
    if isinstance(getattr(spec, "train", None), TrainSpec):
        spec.train.check()


def _check_gapfill(spec: GapFillSpec) -> None:
    """Gap filling's ranges and sizes that need no cube; the cube-dependent checks run in
    ``prepare``."""
    s = spec.split
    for name, v in (("split.test_fraction", s.test_fraction),
                    ("split.validation_fraction", s.validation_fraction)):
        if not 0.0 < v < 1.0:
            raise SpecError(f"{name} must be in (0, 1), got {v}")
    for name, mapping, low in (("split.blocks", s.blocks, 1), ("split.buffer", s.buffer, 0)):
        for dim, v in mapping.items():
            if v < low:
                raise SpecError(f"{name}.{dim} must be >= {low}, got {v}")
    if s.method == "block" and not s.blocks:
        raise SpecError("split.blocks must name at least one dimension, e.g. {lat: 10, lon: 10}")
    if not 0 <= s.seed < 2**63:
        raise SpecError(f"split.seed must be in [0, 2**63), got {s.seed}")
    if not spec.features:
        raise SpecError("features must list at least one variable")
    if len(set(spec.features)) != len(spec.features):
        dup = next(f for f in spec.features if spec.features.count(f) > 1)
        raise SpecError(f"features lists {dup!r} twice; list each variable once")
    if spec.target in spec.features:
        raise SpecError(f"target {spec.target!r} is also listed in features; remove it there")
    if spec.mask is not None and spec.mask in (spec.target, *spec.features):
        raise SpecError(f"mask {spec.mask!r} is also the target or a feature; use a mask variable")
    m = spec.model
    if m.kind == "mlp":
        if not m.hidden or min(m.hidden) < 1:
            raise SpecError("model.hidden must list positive layer widths for an mlp")
        if max(m.hidden) > MAX_LAYER_WIDTH:
            raise SpecError(f"model.hidden widths must be <= {MAX_LAYER_WIDTH}, got "
                            f"{max(m.hidden)}")
        widths = [len(spec.features), *m.hidden, 1]
        n_params = sum((a + 1) * b for a, b in zip(widths, widths[1:], strict=False))
        if n_params > MAX_PARAMETERS:
            raise SpecError(f"model.hidden {m.hidden} gives {n_params:,} parameters, more than "
                            f"{MAX_PARAMETERS:,}: use narrower or fewer layers")
    o = spec.output
    if not (0 <= o.fill_margin <= 1):
        raise SpecError(f"output.fill_margin must be in [0, 1] (a share of the training target "
                        f"range), got {o.fill_margin}")


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``data`` with each ``KEY=VALUE`` of ``overrides`` set (``--set`` on the command line).

    ``KEY`` is a dotted path (``train.epochs``, ``label.classes``); ``VALUE`` is YAML
    (``3``, ``[0, 15]``, ``{lat: 10}``, ``null``), parsed as data like a job file. Missing
    intermediate mappings are created; whether a key exists is checked by the spec parser
    afterwards, so a misspelling gets the usual "did you mean" line.

    >>> apply_overrides({"train": {"epochs": 60}}, ["train.epochs=3", "split.blocks={lat: 5}"])
    {'train': {'epochs': 3}, 'split': {'blocks': {'lat': 5}}}
    """
    from engine.io.yaml_safe import load_yaml

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise SpecError(f"--set {item!r}: write KEY=VALUE with a dotted key, e.g. "
                            "--set train.epochs=3")
        value = load_yaml(text.encode(), f"--set {key}")
        cur = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = cur.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise SpecError(f"--set {key}: {'.'.join(parts[:i + 1])} is "
                                f"{type(nxt).__name__}, not a mapping")
            cur = nxt
        cur[parts[-1]] = value
    return out


def load_job(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read and validate a job spec YAML file (no aliases, bounded size: a job file is
    untrusted data), with ``overrides`` (``KEY=VALUE``, see :func:`apply_overrides`)."""
    from engine.io.yaml_safe import load_yaml

    if not os.path.isfile(path):
        raise SpecError(f"job file not found: {path}; pass the path of a job spec, "
                        "e.g. jobs/gapfill.yaml")
    data = load_yaml(path, f"job file {path}")
    if overrides:
        if not isinstance(data, dict):
            raise SpecError("a job spec must be a YAML mapping at the top level")
        data = apply_overrides(data, overrides)
    return parse_spec(data, base_dir=os.path.dirname(os.path.abspath(path)))
