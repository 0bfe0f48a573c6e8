"""The trained model an ``apply`` job runs: from a training job's run folder, or from a
weights file with its registered architecture.

A run folder (``<store>.run``, made by the shared runner) holds ``job.json`` (the
training job's kind and spec, the model hash and the checkpoint names) and the
checkpoint (``best.pt``). Each supported kind rebuilds its model from its spec and reads
the checkpoint with ``torch.load(weights_only=True)``: nothing in a run folder runs as
code. Run folders made before ``job.json`` existed are read through the output store
beside them (``engine_job_kind`` / ``engine_job_spec`` attributes).

Kinds: ``gapfill`` (a per-pixel model on its features; output ``<target>_predicted``)
and ``regress`` (the CNN on whole fields; output ``<target label>_predicted``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from engine.errors import SpecError
from engine.pipelines.regress import FieldSpec

__all__ = ["InputField", "ResolvedModel", "resolve_model", "RUN_KINDS"]


#: One input channel: a variable (or coordinate), at one level if it has levels -- the
#: regress kind's field spec, so a regress run's inputs map onto it unchanged.
InputField = FieldSpec


@dataclass
class ResolvedModel:
    """A loaded model and how to apply it."""

    module: Any
    model_hash: str
    inputs: list[InputField]
    #: ``pixel``: per pixel on the channels; ``field``: whole 2-D fields; ``tiled``:
    #: windows of ``tile`` blended.
    mode: Literal["pixel", "field", "tiled"]
    output: str
    tile: dict[str, int] | None = None
    units: str | None = None
    #: Provenance: where the model came from (run folder and kind, or weights file).
    source: dict[str, Any] = field(default_factory=dict)
    #: Outputs outside ``[lo, hi]`` are not written as data (NaN, flagged); a gap-filling
    #: run's is its training target range widened by its ``output.fill_margin``.
    valid_range: tuple[float, float] | None = None


def _load(module: Any, path: str) -> None:
    """A state_dict file into ``module`` (``torch.load(weights_only=True)``: no code runs);
    a missing, foreign or mismatched file is one line."""
    from engine.ml.archs import load_weights

    load_weights(module, path)


def _job_record(run: str) -> dict[str, Any]:
    """``job.json`` of a run folder; else the job recorded by the store beside it."""
    from engine.pipelines.runner import load_json

    rec = load_json(os.path.join(run, "job.json"))
    if rec is not None:
        return rec
    stem = run[:-4] if run.endswith(".run") else run
    for store in (f"{stem}.zarr", stem):
        meta = load_json(os.path.join(store, "zarr.json"))
        attrs = (meta or {}).get("attributes") or {}
        if "engine_job_spec" in attrs:
            train = load_json(os.path.join(run, "train.json")) or {}
            return {"kind": attrs.get("engine_job_kind"),
                    "spec": json.loads(attrs["engine_job_spec"]),
                    "model_hash": attrs.get("engine_model_hash"),
                    "checkpoints": train.get("checkpoints") or ["best.pt"]}
    raise SpecError(f"model.run {run} holds no job.json and no store beside it records its "
                    "job: re-run the training job (cube-engine run JOB.yaml) or pass "
                    "model.weights with model.architecture")


def _gapfill(spec: Any, ckpt: str, grid: tuple[int, int]) -> ResolvedModel:
    from engine.ml.models import build_regressor
    from engine.pipelines.gapfill import fill_range
    from engine.pipelines.runner import load_json

    m = spec.model
    module = build_regressor(m.kind, len(spec.features), m.hidden, m.activation)
    _load(module, ckpt)
    train = load_json(os.path.join(os.path.dirname(ckpt), "train.json")) or {}
    rng = train.get("target_range")
    valid = None
    if isinstance(rng, list) and len(rng) == 2 and all(v is not None for v in rng):
        valid = fill_range(float(rng[0]), float(rng[1]), spec.output.fill_margin)
    return ResolvedModel(module=module, model_hash="", mode="pixel",
                         inputs=[InputField(f) for f in spec.features],
                         output=f"{spec.target}_predicted", valid_range=valid)


def _regress(spec: Any, ckpt: str, grid: tuple[int, int]) -> ResolvedModel:
    """The CNN inside its standardisation; per-cell statistics are shaped like the grid of
    the cube it is applied to, so a checkpoint of another grid does not load (one line)."""
    from engine.ml.fields import FieldStandardized
    from engine.ml.registry import build_architecture

    m = spec.model
    n = len(spec.features)
    net = build_architecture(m.architecture, in_channels=n, filters=m.filters,
                             kernel_size=m.kernel_size)
    cell = m.standardise == "cell"
    shape = grid if cell else (1, 1)
    module = FieldStandardized(net, np.zeros((n, *shape), np.float32),
                               np.ones((n, 1, 1), np.float32),
                               np.zeros((1, *shape), np.float32), np.ones((1, 1, 1), np.float32))
    _load(module, ckpt)
    return ResolvedModel(module=module, model_hash="", mode="field",
                         inputs=[InputField(f.variable, f.level) for f in spec.features],
                         output=f"{spec.target.label}_predicted")


#: Training kinds whose run folders ``apply`` reads: kind -> model builder.
RUN_KINDS: dict[str, Callable[[Any, str, tuple[int, int]], ResolvedModel]] = {
    "gapfill": _gapfill, "regress": _regress}


def _from_run(run: str, grid: Callable[[list[InputField]], tuple[int, int]]) -> ResolvedModel:
    from engine.ml.train import model_hash
    from engine.pipelines.registry import get_kind
    from engine.pipelines.spec import parse_spec

    if not os.path.isdir(run):
        raise SpecError(f"model.run {run} is not a run folder: train the model first "
                        "(cube-engine run JOB.yaml makes <store>.run) or fix the path")
    rec = _job_record(run)
    kind = str(rec.get("kind"))
    if kind not in RUN_KINDS:
        raise SpecError(f"model.run {run} is a {kind!r} run: apply reads run folders of "
                        f"{', '.join(sorted(RUN_KINDS))}; for another model pass "
                        "model.weights with model.architecture and model.kwargs")
    get_kind(kind)
    spec = parse_spec({**rec["spec"], "kind": kind})
    ckpts = list(rec.get("checkpoints") or [])
    if len(ckpts) != 1:
        raise SpecError(f"model.run {run} holds {len(ckpts)} checkpoints {ckpts}: apply "
                        "runs one model; pass model.weights for the one to apply")
    ckpt = os.path.join(run, str(ckpts[0]))
    if not os.path.isfile(ckpt):
        raise SpecError(f"checkpoint {ckpt} not found: re-run the training job")
    inputs = [InputField(f) if isinstance(f, str) else InputField(f.variable, f.level)
              for f in spec.features]
    model = RUN_KINDS[kind](spec, ckpt, grid(inputs))
    model.model_hash = model_hash(model.module)
    recorded = rec.get("model_hash")
    if recorded and recorded != model.model_hash:
        raise SpecError(f"checkpoint {ckpt} is not the model its run recorded (model hash "
                        f"{model.model_hash[:12]} != {str(recorded)[:12]}): re-run the "
                        "training job")
    model.source = {"run": os.path.abspath(run), "kind": kind, "job": spec.name,
                    "checkpoint": os.path.basename(ckpt)}
    return model


def _from_weights(m: Any, resolve: Callable[[str], str]) -> ResolvedModel:
    from engine.ml.registry import build_architecture
    from engine.ml.train import model_hash

    path = resolve(m.weights)
    try:
        module = build_architecture(m.architecture, **dict(m.kwargs))
    except SpecError:
        raise
    except Exception as err:
        raise SpecError(f"model.architecture {m.architecture!r} cannot be built with "
                        f"model.kwargs {dict(m.kwargs)}: {str(err).splitlines()[0][:160]}") \
            from None
    _load(module, path)
    return ResolvedModel(module=module, model_hash=model_hash(module), mode=m.mode,
                         inputs=[InputField(v) for v in m.variables],
                         output=m.output or "prediction",
                         tile=dict(m.tile) if m.tile else None, units=m.units,
                         source={"weights": os.path.abspath(path),
                                 "architecture": m.architecture, "kwargs": dict(m.kwargs)})


def resolve_model(m: Any, resolve: Callable[[str], str],
                  grid: Callable[[list[InputField]], tuple[int, int]] = lambda f: (1, 1),
                  ) -> ResolvedModel:
    """The model of an ``apply`` job's ``model`` section, loaded and hashed.

    ``resolve`` makes a path of the spec absolute; ``grid(inputs)`` is the ``(y, x)`` size
    of the cube the model is applied to (a regress model's per-cell statistics).

    Raises
    ------
    SpecError
        Unknown or unreadable run folder or weights, weights that do not load into the
        architecture (one line each).
    """
    import engine.ml.models  # noqa: F401  (registers pixel_regressor below)

    _register()
    if m.run:
        model = _from_run(resolve(m.run), grid)
        if m.output:
            model.output = m.output
        if m.units:
            model.units = m.units
    else:
        model = _from_weights(m, resolve)
    if m.valid_range is not None:
        model.valid_range = (float(m.valid_range[0]), float(m.valid_range[1]))
    return model


def _register() -> None:
    """The gap-filling regressor as a registered architecture (``pixel_regressor``), so a
    weights file of one can be applied as ``model.weights`` + ``architecture``."""
    from engine.ml.models import regressor_factory
    from engine.ml.registry import register_architecture

    register_architecture("pixel_regressor", regressor_factory, overwrite=True)
