"""Gap filling end to end on the real demo cube: the engine's job vs the same steps done
with ml4xcube 1.1's sampler and PyTorch trainer.

Data and task
    ``catalogs/demo.yaml#coads_climatology`` (COADS monthly climatology, 12 x 90 x 180,
    chunks 3 x 45 x 90): fill sea-surface temperature ``SST`` from the job's features
    (``AIRT`` for ``jobs/gapfill-linear.yaml``; ``AIRT, SPEH, WSPD, SLP`` for
    ``jobs/gapfill.yaml``) inside ``ocean_mask``. Both methods use **the same blocks**:
    the engine's ``block_split`` with the job's blocks, buffer, test fraction and seed,
    and its validation blocks (seed + 1) inside the train blocks. RMSE is taken in degC
    on **the same test cells**: test blocks, inside the ocean mask, target and every
    feature finite.

Methods
``engine``
    :func:`engine.pipelines.gapfill.run_gapfill` on the job spec (output to a temporary
    directory, ``overwrite=True``) with a ``connect("threads")`` cluster, as
    ``cube-engine run --cluster threads`` calls it: train-only statistics, samples
    streamed chunk by chunk, Adam with early stopping on the validation blocks, blockwise
    prediction of the whole cube, resumable Zarr write, metrics read back from the
    store, loss and map plots. RMSE from its metrics (``test.model.rmse``). Wall time
    includes the cluster start and everything above.
``ml4xcube``
    ml4xcube's documented steps on the same cube: ``assign_mask(ds, ocean_mask)`` (its
    ``filter_mask``), the engine's split passed as the ``split`` variable ml4xcube
    expects (1.0 train, 0.0 validation blocks, -1.0 test and buffer cells, which its
    ``create_split`` drops), ``XrDataset(ds, rand_chunk=False, to_pred="SST")``
    (defaults: points, ``drop_nan="auto"``, ``apply_mask=True``, ``scale_fn=
    "standardize"``) -> ``get_datasets()``, ``TensorDataset``s and
    ``prep_dataloader(train, val, batch_size=job batch size)``, the same model family
    (``nn.Linear`` or the same MLP widths and activation, seeded like the job), Adam
    with the job's learning rate and weight decay, and
    ``ml4xcube.training.pytorch.Trainer(model, train_loader, val_loader, optimizer,
    model_path, early_stopping=True, patience=job patience, loss=nn.MSELoss(),
    epochs=job epochs, device=cpu).train()``. ml4xcube has no prediction path, so the
    test cells are standardised with its ``scale_params``, run through the model and
    un-scaled with ``ml4xcube.postprocessing.undo_standardizing``. Wall time covers
    opening the cube, the split, sampling, training and the test prediction (no write,
    no plots: ml4xcube has neither).
``ml4xcube sampler + stepping loop`` (reference, not in the ratios)
    the same ml4xcube samples, loaders, model, optimizer, epochs and early stopping, in
    a plain PyTorch loop written here that does call ``optimizer.step()``. It isolates
    what ml4xcube's sampler gives from what its trainer does.

Broken peer steps are measured, not patched: an exception is caught and recorded in
``broken`` as ``"<step>: <message>"`` (the wall time then runs to the failure); a wrong
result is detected and recorded the same way. Checked: whether the Trainer changed the
model's weights, and whether ``apply_mask`` kept pixel samples outside the mask.

Ratios (``_mlp`` suffix for the MLP job at default size): ``wall_vs_ml4xcube`` =
t_ml4xcube / t_engine; ``rmse_ml4xcube_over_engine`` = RMSE_ml4xcube / RMSE_engine
(when ml4xcube produced predictions). Sizes: ``tiny`` = the linear job with 3 epochs
(patience 3); ``default`` and ``large`` = the linear and the MLP jobs as configured
(the demo cube has one size). One run of each (end-to-end jobs; seconds are single
runs, not medians).

Needs the ``bench`` extra (``pip install -c constraints.txt -e '.[bench]'``). Run
``python -m benchmarks.bench_gapfill [tiny|default|large] [--tag TAG]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import math
import os
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from benchmarks._common import PeakRSS, cli, machine, na, print_ratios
from engine.io.catalog import open_cube
from engine.ops.splits import block_split
from engine.ops.stats import valid_mask
from engine.pipelines.spec import GapFillSpec, load_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINEAR, MLP = "jobs/gapfill-linear.yaml", "jobs/gapfill.yaml"
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"jobs": {"": LINEAR}, "epochs": 3, "patience": 3},
    "default": {"jobs": {"": LINEAR, "_mlp": MLP}, "epochs": None, "patience": None},
    "large": {"jobs": {"": LINEAR, "_mlp": MLP}, "epochs": None, "patience": None},
}


def _ml4xcube() -> dict[str, Any]:
    """ml4xcube's pieces; ``ml4xcube.splits`` (imported by the sampler) silences all
    warnings on import, so the import runs inside ``catch_warnings``."""
    try:
        with warnings.catch_warnings():
            from ml4xcube.datasets.pytorch import prep_dataloader
            from ml4xcube.datasets.xr_dataset import XrDataset
            from ml4xcube.postprocessing import undo_standardizing
            from ml4xcube.preprocessing import assign_mask
            from ml4xcube.training.pytorch import Trainer
    except ImportError as err:
        raise ImportError(
            f"bench_gapfill needs ml4xcube ({err}); install the benchmark extra: "
            "pip install -c constraints.txt -e '.[bench]'"
        ) from None
    return {"XrDataset": XrDataset, "prep_dataloader": prep_dataloader, "Trainer": Trainer,
            "assign_mask": assign_mask, "undo_standardizing": undo_standardizing}


def _spec(path: str, cfg: dict[str, Any], workdir: str) -> GapFillSpec:
    spec = load_job(os.path.join(ROOT, path))
    train = spec.train
    if cfg["epochs"] is not None:
        train = dataclasses.replace(train, epochs=cfg["epochs"], patience=cfg["patience"])
    out = os.path.join(workdir, "engine", "filled.zarr")
    return dataclasses.replace(spec, train=train,
                               output=dataclasses.replace(spec.output, url=out, dir=None))


def _engine(spec: GapFillSpec) -> dict[str, Any]:
    """The engine's job end to end, as ``cube-engine run --cluster threads`` runs it."""
    from engine.cluster import connect
    from engine.pipelines.gapfill import run_gapfill

    gc.collect()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        with connect("threads") as client:
            res = run_gapfill(spec, output=spec.output.url, overwrite=True, client=client)
        wall = time.perf_counter() - t0
    m = res.metrics
    return {"seconds": wall, "train_s": m["training"]["seconds"],
            "epochs_run": m["training"]["epochs_run"], "best_epoch": m["training"]["best_epoch"],
            "rmse": m["test"]["model"]["rmse"], "n_test": m["test"]["model"]["n"],
            "n_train": m["n_train"], "rmse_ols": m["test"]["ols"]["rmse"],
            "peak_mb": peak.peak_mb, "delta_mb": peak.delta_mb}


class _Arrays:
    """The engine's blocks as ml4xcube's ``split`` labels, and the shared test cells."""

    def __init__(self, spec: GapFillSpec) -> None:
        ds = open_cube(spec.resolve(spec.input.catalog), spec.input.entry)
        s = spec.split
        dims = ds[spec.target].dims
        split = block_split(ds, s.blocks, s.test_fraction, s.seed, s.buffer)
        val = block_split(ds, s.blocks, s.validation_fraction, s.seed + 1)
        split = split.broadcast_like(ds[spec.target]).transpose(*dims)
        val = val.broadcast_like(ds[spec.target]).transpose(*dims)
        # 1 train, 0 validation blocks (ml4xcube's "test" set, its early-stopping data),
        # -1 test and buffer cells: create_split keeps split == True / split == False only
        labels = xr.where(split == 1, xr.where(val == 0, 0.0, 1.0), -1.0)
        self.ds = ds
        self.split = labels.chunk(dict(zip(dims, ds[spec.target].data.chunksize, strict=True)))
        valid = valid_mask(ds, [spec.target, *spec.features], spec.mask)
        finite = valid_mask(ds, [spec.target, *spec.features])
        test = (valid & (split == 0)).values
        self.x_test = np.stack([ds[f].values[test] for f in spec.features], axis=-1)
        self.y_test = ds[spec.target].values[test]
        lab = self.split.values
        fin = finite.values
        self.n_train_in_mask = int(((lab == 1) & valid.values).sum())
        self.n_train_any = int(((lab == 1) & fin).sum())


def _model(spec: GapFillSpec) -> nn.Module:
    """The job's model family on standardised inputs (ml4xcube scales the data itself)."""
    torch.manual_seed(spec.seed)
    nf = len(spec.features)
    if spec.model.kind == "linear":
        return nn.Linear(nf, 1)
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "elu": nn.ELU}[spec.model.activation]
    layers: list[nn.Module] = []
    width = nf
    for h in spec.model.hidden:
        layers += [nn.Linear(width, int(h)), act()]
        width = int(h)
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _stepping_loop(model: nn.Module, train: Any, val: Any, spec: GapFillSpec) -> int:
    """Reference: a plain loop that steps the optimizer; early stopping on ``val``."""
    t = spec.train
    opt = torch.optim.Adam(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    loss_fn = nn.MSELoss()
    best, best_state, strikes, epochs_run = math.inf, None, 0, 0
    for _ in range(t.epochs):
        epochs_run += 1
        model.train()
        for x, y in train:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for x, y in val:
                total += float(loss_fn(model(x), y)) * len(x)
                n += len(x)
        v = total / max(n, 1)
        if v < best - t.min_delta:
            best, strikes = v, 0
            best_state = {k: p.detach().clone() for k, p in model.state_dict().items()}
        else:
            strikes += 1
        if strikes >= t.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return epochs_run


def _rmse(m4: dict[str, Any], model: nn.Module, arrays: _Arrays, spec: GapFillSpec,
          scale: dict[str, list[float]]) -> float:
    """RMSE in degC on the shared test cells, with ml4xcube's scaling undone."""
    mean = np.array([scale[f][0] for f in spec.features], np.float32)
    std = np.array([scale[f][1] for f in spec.features], np.float32)
    x = torch.from_numpy(((arrays.x_test - mean) / std).astype(np.float32))
    model.eval()
    with torch.no_grad():
        z = model(x).numpy()[:, 0]
    pred = m4["undo_standardizing"](z, scale[spec.target][0], scale[spec.target][1])
    return float(np.sqrt(np.mean((pred.astype(np.float64) - arrays.y_test) ** 2)))


def _ml4x(m4: dict[str, Any], spec: GapFillSpec, workdir: str) -> dict[str, Any]:
    """ml4xcube's sampler and trainer on the engine's blocks; breakage recorded, not fixed."""
    broken: list[str] = []
    out: dict[str, Any] = {"broken": broken}
    quiet = io.StringIO()  # XrDataset and Trainer print progress
    gc.collect()
    step = "prepare"
    with PeakRSS() as peak, contextlib.redirect_stdout(quiet):
        t0 = time.perf_counter()
        try:
            arrays = _Arrays(spec)
            out["n_test"] = len(arrays.y_test)
            step = "assign_mask"
            mask = arrays.ds[spec.mask].data != 0
            sub = m4["assign_mask"](arrays.ds[[*spec.features, spec.target]], mask)
            sub = sub.assign(split=arrays.split)
            step = "XrDataset.get_datasets"
            sampler = m4["XrDataset"](sub, rand_chunk=False, to_pred=spec.target)
            (x_tr, y_tr), (x_va, y_va) = sampler.get_datasets()
            scale = sampler.scale_params
            out.update(n_train=len(y_tr), n_val=len(y_va))
            if len(y_tr) != arrays.n_train_in_mask:
                outside = len(y_tr) - arrays.n_train_in_mask
                broken.append(
                    f"XrDataset(apply_mask=True): {len(y_tr)} training samples, "
                    f"{arrays.n_train_in_mask} inside the mask ({outside:+d}; "
                    f"{arrays.n_train_any} with the mask ignored)")
            step = "prep_dataloader"
            tds = torch.utils.data.TensorDataset
            train, val = m4["prep_dataloader"](
                tds(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
                tds(torch.from_numpy(x_va), torch.from_numpy(y_va)),
                batch_size=spec.train.batch_size)
            out["prep_s"] = time.perf_counter() - t0
            step = "Trainer.train"
            model = _model(spec)
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            opt = torch.optim.Adam(model.parameters(), lr=spec.train.learning_rate,
                                   weight_decay=spec.train.weight_decay)
            trainer = m4["Trainer"](
                model, train, val, opt, os.path.join(workdir, "ml4xcube_best.pt"),
                early_stopping=True, patience=spec.train.patience, loss=nn.MSELoss(),
                epochs=spec.train.epochs, device=torch.device("cpu"))
            t1 = time.perf_counter()
            model = trainer.train()
            out["train_s"] = time.perf_counter() - t1
            out["epochs_run"] = len(trainer.train_list)
            if all(torch.equal(before[k], v) for k, v in model.state_dict().items()):
                losses = trainer.train_list
                broken.append(
                    f"Trainer.train: model weights unchanged after {len(losses)} epochs "
                    f"(train loss {losses[0]:.4g} -> {losses[-1]:.4g}); optimizer.step() is "
                    "never called")
            step = "predict test cells"
            out["rmse"] = _rmse(m4, model, arrays, spec, scale)
        except Exception as err:  # a broken peer step is a result, not a crash
            broken.append(f"{step}: {type(err).__name__}: {err}")
        out["seconds"] = time.perf_counter() - t0
    out.update(peak_mb=peak.peak_mb, delta_mb=peak.delta_mb)

    if "prep_s" in out:  # the reference loop on the same samples
        t1 = time.perf_counter()
        model = _model(spec)
        epochs = _stepping_loop(model, train, val, spec)
        rmse = _rmse(m4, model, arrays, spec, scale)
        out["reference"] = {"seconds": out["prep_s"] + time.perf_counter() - t1,
                            "train_s": time.perf_counter() - t1, "epochs_run": epochs,
                            "rmse": rmse}
    return out


def run(size: str = "default") -> dict[str, Any]:
    """Run the benchmark at ``size`` (tiny, default, large); returns the result dict."""
    cfg = SIZES[size]
    m4 = _ml4xcube()
    rows, ratios, jobs, broken = [], {}, {}, {}
    for suffix, path in cfg["jobs"].items():
        with tempfile.TemporaryDirectory(prefix="bench-gapfill-") as workdir:
            spec = _spec(path, cfg, workdir)
            eng = _engine(spec)
            m4x = _ml4x(m4, spec, workdir)
        kind = spec.model.kind
        if "n_test" in m4x:
            assert m4x["n_test"] == eng["n_test"], (m4x["n_test"], eng["n_test"])
        jobs[kind] = {"job": path, "epochs": spec.train.epochs, "patience": spec.train.patience,
                      "batch_size": spec.train.batch_size, "features": list(spec.features),
                      "n_test": eng["n_test"], "n_train_engine": eng["n_train"],
                      "n_train_ml4xcube": m4x.get("n_train"), "n_val_ml4xcube": m4x.get("n_val"),
                      "rmse_ols": eng["rmse_ols"]}
        rows.append({"name": f"engine ({kind})", "seconds": eng["seconds"],
                     "train_s": eng["train_s"], "epochs_run": eng["epochs_run"],
                     "rmse": eng["rmse"], "peak_mb": eng["peak_mb"], "delta_mb": eng["delta_mb"],
                     "note": "run_gapfill, threads cluster: train, predict, write, metrics, plots"})
        rows.append({"name": f"ml4xcube ({kind})", "seconds": m4x["seconds"],
                     "train_s": m4x.get("train_s"), "epochs_run": m4x.get("epochs_run"),
                     "rmse": m4x.get("rmse"), "peak_mb": m4x["peak_mb"],
                     "delta_mb": m4x["delta_mb"],
                     "note": "XrDataset + Trainer; " + ("BROKEN" if m4x["broken"] else "ok")})
        if "reference" in m4x:
            ref = m4x["reference"]
            rows.append({"name": f"ml4xcube sampler + step loop ({kind})",
                         "seconds": ref["seconds"], "train_s": ref["train_s"],
                         "epochs_run": ref["epochs_run"], "rmse": ref["rmse"], "peak_mb": None,
                         "delta_mb": None, "note": "reference: same samples, loop that steps"})
        ratios[f"wall_vs_ml4xcube{suffix}"] = m4x["seconds"] / eng["seconds"]
        if m4x.get("rmse") is not None:
            ratios[f"rmse_ml4xcube_over_engine{suffix}"] = m4x["rmse"] / eng["rmse"]
        if m4x["broken"]:
            broken[kind] = "; ".join(m4x["broken"])
    return {
        "benchmark": "gapfill",
        "size": size,
        "machine": machine(),
        "cube": {"catalog": "catalogs/demo.yaml", "entry": "coads_climatology",
                 "shape": {"time": 12, "lat": 90, "lon": 180}, "target": "SST"},
        "jobs": jobs,
        "rows": rows,
        "broken": broken or None,
        "ratios": ratios,
        "targets": {},
        "note": ("single runs; engine seconds include cluster start, whole-cube prediction, "
                 "Zarr write and plots, ml4xcube seconds only sampling, training and the "
                 "test-cell prediction (it has no write path); RMSE in degC on the same "
                 "test cells; if ml4xcube breaks with an exception, its seconds run to "
                 "the failure"),
    }


def _print(res: dict[str, Any]) -> None:
    print(f"gapfill benchmark ({res['size']}): {res['cube']['catalog']}#"
          f"{res['cube']['entry']} 12x90x180, target SST, {res['machine']['cpus']} cores")
    for kind, j in res["jobs"].items():
        print(f"  {kind}: {j['job']} features {','.join(j['features'])}, epochs {j['epochs']}, "
              f"patience {j['patience']}, batch {j['batch_size']}; test cells {j['n_test']:,}; "
              f"train samples engine {j['n_train_engine']:,}, ml4xcube "
              f"{'n/a' if j['n_train_ml4xcube'] is None else format(j['n_train_ml4xcube'], ',')}; "
              f"OLS RMSE {j['rmse_ols']:.4f}")

    print(f"{'method':36s} {'seconds':>8s} {'train s':>8s} {'epochs':>6s} {'RMSE degC':>9s} "
          f"{'peak MB':>8s} {'+MB':>6s}  note")
    for r in res["rows"]:
        print(f"{r['name']:36s} {r['seconds']:8.2f} {na(r['train_s'], '8.2f'):>8s} "
              f"{na(r['epochs_run'], 'd'):>6s} {na(r['rmse'], '9.4f'):>9s} "
              f"{na(r['peak_mb'], '8.0f'):>8s} {na(r['delta_mb'], '6.0f'):>6s}  {r['note']}")
    for kind, msg in (res["broken"] or {}).items():
        print(f"ml4xcube broken ({kind}): {msg}")
    print_ratios(res, lambda k: ("ml4xcube seconds / engine seconds" if k.startswith("wall")
                                 else "ml4xcube RMSE / engine RMSE") + f" ({k})")


main = cli("gapfill", run, _print)

if __name__ == "__main__":
    main()
