"""The shared runner: the plumbing every job kind repeats, done once.

:func:`plan_job` does everything that needs no cluster (the kind's ``prepare`` and
``split``, output locations, resume identity, destination checks); :func:`run_job` runs
the kind's steps around the run folder, tracker, throughput meter, model reuse,
provenance, the resumable write and ``metrics.json``. The contract between the two and a
kind is in :mod:`engine.pipelines.job`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from engine._version import code_version
from engine.errors import SpecError
from engine.pipelines.job import Job, JobResult, Prepared, RunContext, Trained
from engine.redact import redact

__all__ = ["RunPlan", "plan_job", "run_job", "spec_fingerprint", "job_identity",
           "output_locations", "check_outputs", "provenance", "write_json", "load_json",
           "finite"]


def spec_fingerprint(spec: Any) -> str:
    """sha256 of the job spec as data (stable key order, credentials redacted so rotating a
    secret never changes it): the job part of a run's resume identity."""
    text = json.dumps(redact(spec.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def output_locations(spec: Any, output: str | None = None) -> tuple[str, str]:
    """The output store URL and its run folder (checkpoint, metrics, plots).

    The run folder belongs to the store: ``<store>.run`` beside a local store (``.zarr``
    dropped), so two jobs writing into one folder never share a checkpoint; for a remote
    store ``runs/<job name>/<store name>.run`` here.
    """
    url = output or spec.output.url
    if spec.output.dir:
        return url, spec.resolve(spec.output.dir) if not _is_url(spec.output.dir) \
            else spec.output.dir
    stem = url.rstrip("/").rsplit("/", 1)[-1]
    stem = stem[:-5] if stem.endswith(".zarr") else stem
    if not _is_url(url):
        path = os.path.abspath(url.removeprefix("file://"))
        return url, os.path.join(os.path.dirname(path), f"{stem}.run")
    return url, os.path.join("runs", spec.name, f"{stem}.run")


def job_identity(spec: Any, p: Prepared) -> dict[str, str]:
    """What the job's values depend on, besides the model: the job spec, the code and the
    input data (the source store's content identity). A finished store or a trained model
    is reused only when all of these are unchanged."""
    from engine.io.stores import store_identity

    ident = {"job": spec_fingerprint(spec), "code_version": code_version(),
             "input_entry": f"{spec.input.entry}"}
    if p.input_url is not None:
        so = {**p.input_storage_options, **(spec.input.storage_options or {})}
        ident["input"] = store_identity(p.input_url, so)
    weights = _weights_digest(spec)
    if weights is not None:  # the spec names the file; its content decides the results
        ident["model_weights"] = weights
    return ident


def _weights_digest(spec: Any) -> str | None:
    """sha256 of the local weights file a spec's ``model.weights`` names, if any."""
    path = getattr(getattr(spec, "model", None), "weights", None)
    if not isinstance(path, str) or not path or _is_url(path):
        return None
    resolve = getattr(spec, "resolve", None)
    full = resolve(path) if callable(resolve) else path
    if not os.path.isfile(full):
        return None  # the kind's own checks say so in one line
    h = hashlib.sha256()
    with open(full, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_outputs(spec: Any, p: Prepared, url: str, run_dir: str, identity: dict,
                  *, overwrite: bool, restart: bool, must_resume: bool = True) -> str:
    """Every destination check a run needs, before a cluster starts or anything is written:
    the store (foreign, different, unwritable, or overlapping an input) and the run folder
    (writable, not inside an input)."""
    from engine.io.destination import check_destination, check_outside_inputs, probe_writable

    inputs = [u for u in (p.input_url,) if u]
    action = check_destination(url, spec.output.storage_options, fingerprint=identity,
                               overwrite=overwrite, restart=restart, must_resume=must_resume,
                               inputs=inputs)
    check_outside_inputs(run_dir, inputs)
    if not _is_url(run_dir):
        probe_writable(run_dir)
    return action


@dataclass
class RunPlan:
    """What a run will do, found before a cluster starts: the opened cube and its split,
    where it writes, its resume identity and what happens to the store (create, resume or
    replace)."""

    job: Job
    prepared: Prepared
    split: Any
    url: str
    run_dir: str
    identity: dict[str, str]
    action: str

    @property
    def epochs(self) -> int | None:
        """Epochs the run trains at most (the progress bar's length)."""
        return self.job.epochs(self.prepared.spec)

    def describe(self) -> str:
        """One line for ``cube-engine validate``."""
        return (f"{self.job.describe(self.prepared)}; output {self.url} ({self.action}); "
                f"run folder {self.run_dir}")


def plan_job(job: Job, spec: Any, output: str | None = None, *, overwrite: bool = False,
             restart: bool = False, must_resume: bool = True) -> RunPlan:
    """Open the cube, split it, compute the resume identity and check every destination,
    once: the command line plans before it starts a cluster and hands the plan to
    :func:`run_job` (the input store is listed for its identity once per run)."""
    if not isinstance(spec, job.spec):
        raise SpecError(f"a {job.name} job needs a {job.spec.__name__}, got "
                        f"{type(spec).__name__}")
    p = job.prepare(spec)
    split = job.split(p)
    url, run_dir = output_locations(spec, output)
    identity = job.identity(spec, p)
    action = check_outputs(spec, p, url, run_dir, identity, overwrite=overwrite,
                           restart=restart, must_resume=must_resume)
    return RunPlan(job=job, prepared=p, split=split, url=url, run_dir=run_dir,
                   identity=identity, action=action)


def provenance(spec: Any, p: Any, identity: dict[str, str], mhash: str,
               title: str) -> dict[str, Any]:
    """Global attributes every output store carries: CF (Conventions, history,
    date_created, the input's licence) and the engine's provenance; JSON values as JSON,
    credentials redacted. ``title``: what the job does ("gap filling")."""
    now = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
    history = f"{now}: cube-engine {code_version()} {title}, job {spec.name}"
    if p.ds.attrs.get("history"):
        history = f"{p.ds.attrs['history']}\n{history}"
    prov: dict[str, Any] = {
        "Conventions": "CF-1.10",
        "title": f"cube-engine {title}: {spec.name}",
        "history": history,
        "date_created": now,
        "engine_job_kind": spec.kind,
        "engine_job_spec": json.dumps(redact(spec.to_dict()), sort_keys=True, default=str),
        "engine_job_fingerprint": identity["job"],
        "engine_input_identity": identity.get("input", ""),
        "engine_code_version": code_version(),
        "engine_model_hash": mhash,
        "engine_model_hash_kind": "sha256 of the state_dict tensors (name order)",
        "engine_seed": spec.seed,
        "engine_catalog": redact(p.ds.attrs.get("engine_catalog",
                                                spec.resolve(spec.input.catalog))),
        "engine_catalog_entry": spec.input.entry,
    }
    for k in ("license", "source", "institution", "references"):
        if k in p.ds.attrs:
            prov[k if k == "license" else f"input_{k}"] = str(p.ds.attrs[k])
    return prov


def load_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default, allow_nan=False)
    os.replace(tmp, path)


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def finite(x: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _previous_training(run_dir: str, identity: dict[str, str],
                       log: Callable[[str], None]) -> dict[str, Any] | None:
    """The training record in ``run_dir`` when this job trained it on these inputs and its
    checkpoints are all there."""
    info = load_json(os.path.join(run_dir, "train.json"))
    if info is None:
        return None
    ckpts = info.get("checkpoints")
    if not ckpts or not all(os.path.exists(os.path.join(run_dir, str(c))) for c in ckpts):
        return None
    if info.get("identity") != identity:
        old = info.get("identity") or {}
        changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        log(f"not reusing {', '.join(map(str, ckpts))} in {run_dir}: trained with a "
            f"different {', '.join(changed)}")
        return None
    return info


def _throughput(metrics_path: str, wres: Any, trained: Trained, meter: Any, total_s: float,
                identity: dict[str, str]) -> dict[str, Any]:
    """This run's rates: what it actually did (no write rate when nothing was written, no
    training rate when the model was reused). A run that did nothing new keeps the first
    run's figures and records itself as a resume."""
    wrote = bool(wres.n_written)
    this = {
        "total_s": total_s,
        "trained": trained.fresh,
        "regions_written": wres.n_written,
        "regions_skipped": wres.n_skipped,
        "write_s": wres.seconds if wrote else None,
        "bytes_written": wres.bytes_written,
        "mb_per_s_written": wres.bytes_written / 1e6 / wres.seconds
        if wrote and wres.seconds else None,
        "train_samples_per_s": trained.info.get("samples_per_s") if trained.fresh else None,
        **meter.summary(),  # per phase: totals, per worker, per GPU
    }
    pw = (this.get("phases") or {}).get("predict+write", {}).get("total", {})
    this["output_pixels_per_s"] = pw.get("output_pixels_per_s") if wrote else None
    if trained.fresh or wrote:
        return this
    old = load_json(metrics_path)
    first = (old or {}).get("throughput")
    if first is None or (old or {}).get("identity", identity) != identity:
        return this
    first = dict(first)
    first["resumed_runs"] = [*first.get("resumed_runs", []),
                             {"total_s": total_s, "regions_written": 0,
                              "regions_skipped": wres.n_skipped, "trained": False}]
    return first


def run_job(
    job: Job,
    spec: Any,
    *,
    output: str | None = None,
    overwrite: bool = False,
    restart: bool = False,
    client: Any = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_region: Callable[..., None] | None = None,
    log: Callable[[str], None] = lambda s: None,
    plan: RunPlan | None = None,
) -> JobResult:
    """Run ``job`` on ``spec``: every input is validated before anything is written.

    ``plan``: the :func:`plan_job` of the same arguments, when the caller made it already.
    ``on_epoch(record)`` is called once per training epoch, ``on_region(done, total)`` per
    written region, ``log(line)`` with what the run decides (model reused, ...).
    """
    from engine.meter import Meter

    t_start = time.perf_counter()
    # Refuse a foreign, different or input-overlapping store *before* training.
    plan = plan or plan_job(job, spec, output, overwrite=overwrite, restart=restart)
    p, url, run_dir, identity = plan.prepared, plan.url, plan.run_dir, plan.identity
    tracking = getattr(spec, "tracking", None)
    tracker = _Tracker(spec, run_dir) if tracking is not None and tracking.mlflow else None
    os.makedirs(run_dir, exist_ok=True)
    metrics_path = os.path.join(run_dir, "metrics.json")

    def _epoch(rec: dict[str, Any]) -> None:
        if tracker:
            tracker.epoch(rec)
        if on_epoch:
            on_epoch(rec)

    ctx = RunContext(spec=spec, url=url, run_dir=run_dir, identity=identity, client=client,
                     log=log, on_epoch=_epoch, restart=restart, overwrite=overwrite,
                     previous=None if (restart or overwrite)
                     else _previous_training(run_dir, identity, log))
    meter = Meter(client)
    meter.begin("train")
    trained = job.train(p, plan.split, ctx)
    if trained.fresh:
        write_json(os.path.join(run_dir, "train.json"),
                   finite({**trained.info, "identity": identity,
                           "checkpoints": list(trained.checkpoints)}))
        # what rebuilds the model elsewhere (kind: apply): the kind and its spec
        write_json(os.path.join(run_dir, "job.json"),
                   finite({"kind": spec.kind, "spec": redact(spec.to_dict()),
                           "model_hash": trained.model_hash,
                           "checkpoints": list(trained.checkpoints),
                           "code_version": code_version()}))

    # blockwise prediction, written through the resumable writer with its identity
    meter.begin("predict+write")
    out = job.predict(p, plan.split, trained, ctx)
    out.attrs.update(provenance(spec, p, identity, trained.model_hash, job.title))
    wres = job.write(out, url, ctx=ctx, trained=trained, progress=on_region)
    meter.end()
    trained.release()

    # metrics and plots from the written store (the model is not run twice)
    written = xr.open_zarr(url, storage_options=spec.output.storage_options)
    metrics = job.evaluate(p, plan.split, trained, written, ctx)
    report = job.report(p, plan.split, trained, metrics, written, ctx)
    metrics["identity"] = identity
    metrics["throughput"] = _throughput(metrics_path, wres, trained, meter,
                                        time.perf_counter() - t_start, identity)
    write_json(metrics_path, finite(metrics))
    files = {"metrics": metrics_path, **report.files}
    if tracker:
        tracker.finish(metrics, files)
    return JobResult(output_url=url, run_dir=run_dir, metrics=metrics, report=report,
                     files=files, throughput=metrics["throughput"], write=wres,
                     trained=trained.fresh)


class _Tracker:
    """Optional mlflow tracking; parameters are logged with credentials redacted."""

    def __init__(self, spec: Any, run_dir: str) -> None:
        from engine.errors import require

        mlflow = require("mlflow", "track")
        self.mlflow = mlflow
        # mlflow's default (a file store in the working directory) is refused by current
        # mlflow; default to a SQLite store inside the run folder.
        uri = spec.tracking.uri or "sqlite:///" + os.path.abspath(
            os.path.join(run_dir, "mlflow.db"))
        os.makedirs(run_dir, exist_ok=True)
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(spec.tracking.experiment)
            self.run = mlflow.start_run(run_name=spec.name)
        except Exception as err:
            from engine.redact import redact_text

            raise SpecError(f"tracking.uri {redact_text(uri)!r} cannot be used by mlflow "
                            f"({type(err).__name__}: {redact_text(str(err)).splitlines()[0]})"
                            "; fix tracking.uri or set tracking.mlflow: false") from None
        flat = json.loads(json.dumps(redact(spec.to_dict()), default=str))
        mlflow.log_params({k: str(v)[:250] for k, v in _flatten(flat).items()})

    def epoch(self, rec: dict[str, Any]) -> None:
        prefix = f"fold{rec['fold']}_" if "fold" in rec else ""
        self.mlflow.log_metrics({f"{prefix}train_loss": rec["train_loss"],
                                 f"{prefix}val_loss": rec["val_loss"]},
                                step=int(rec["epoch"]))

    def finish(self, metrics: dict[str, Any], files: dict[str, str]) -> None:
        # every number of metrics.json but the throughput and the training record
        flat = _flatten({k: v for k, v in metrics.items()
                         if k not in ("throughput", "identity", "training")}, sep="_")
        self.mlflow.log_metrics({k: float(v) for k, v in flat.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and math.isfinite(v)})
        for path in files.values():
            if os.path.exists(path):
                self.mlflow.log_artifact(path)
        self.mlflow.end_run()


def _flatten(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + sep, sep))
        else:
            out[key] = v
    return out
