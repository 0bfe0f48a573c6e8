"""A mutation audit of the core modules: plausible one-line bugs the suite must catch.

Each mutant replaces one exact snippet of a core module (a dropped check, a wrong seed, a
missing token, ones instead of Gaussian weights) and names the tests that guard it. The
audit copies the checkout to a temporary folder, applies one mutant at a time there (the
working tree is never touched), runs the named tests with ``PYTHONPATH`` pointing at the
copy (so worker processes import the mutant too), and counts a mutant as killed when the
tests fail. A mutant whose snippet no longer occurs is reported as stale: the list must
follow the code.

Run it from the repository root::

    python -m engine.testing.mutate            # all mutants
    python -m engine.testing.mutate -k verify  # those whose name contains "verify"
    make mutate

It prints one line per mutant and the score, and exits 1 when a mutant survives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = ["Mutant", "MUTANTS", "run"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS: tuple[Mutant, ...] = (
    Mutant("patches: chunk order not re-seeded per epoch", "engine/ops/patches.py",
           "np.random.default_rng([self.seed, self.epoch]).permutation(self.n_units)",
           "np.random.default_rng([self.seed]).permutation(self.n_units)",
           ("tests/test_patches.py",)),
    # Not listed: the within-chunk shuffle without the epoch is an equivalent mutant; the
    # shuffle buffer re-permutes every group with (seed, epoch), so the stream's order per
    # epoch is the same kind of uniform permutation either way.
    Mutant("patches: unit keys ignore the unit", "engine/ops/patches.py",
           "dask.base.tokenize(_VERSION, self.dims, self.patch_dims, unit, keys)",
           "dask.base.tokenize(_VERSION, self.dims, self.patch_dims, keys)",
           ("tests/test_patches.py",)),
    Mutant("predict: Gaussian weights replaced by ones", "engine/ml/predict.py",
           'weights = gaussian_weights(tile) if blend == "gaussian" else None',
           "weights = None",
           ("tests/test_predict_grid.py", "tests/test_predict.py")),
    Mutant("predict: no margin before the start edge", "engine/kernels/windows.py",
           "    margin = size - stride\n", "    margin = 0\n",
           ("tests/test_windows.py", "tests/test_predict_grid.py")),
    Mutant("predict: reflect means numpy's symmetric", "engine/kernels/windows.py",
           '            return {"mode": "reflect"}', '            return {"mode": "symmetric"}',
           ("tests/test_windows.py", "tests/test_predict_grid.py")),
    Mutant("predict: keys ignore the model", "engine/ml/predict.py",
           'in_chunks, payload.digest,\n                                   str(boundary),',
           'in_chunks,\n                                   str(boundary),',
           ("tests/test_predict.py", "tests/test_predict_grid.py", "tests/test_keys.py")),
    Mutant("tiled: reflect padding repeats the axis instead of mirroring it",
           "engine/ops/tiled.py", "        return np.where(r >= n, period - r, r)",
           "        return np.mod(r, n)", ("tests/test_tiled.py", "tests/test_predict_grid.py")),
    Mutant("device: the blend overwrites overlapping windows instead of adding them",
           "engine/ml/device.py", "        view[dst].add_(preds[src])",
           "        view[dst].copy_(preds[src])",
           ("tests/test_device.py", "tests/test_gpu_path_cpu.py")),
    Mutant("splits: keys ignore the seed", "engine/ops/splits.py",
           "token = tokenize(_VERSION, dims, sizes, chunks, bsizes, widths, f, seed)",
           "token = tokenize(_VERSION, dims, sizes, chunks, bsizes, widths, f)",
           ("tests/test_splits.py",)),
    Mutant("splits: buffer never applied", "engine/kernels/splits.py",
           "near = _max_filter_1d(near, axis, w)", "near = near",
           ("tests/test_splits.py",)),
    Mutant("stats: statistics over all valid cells (test leakage)", "engine/ops/stats.py",
           "w = where & valid_mask(ds, names)", "w = valid_mask(ds, names)",
           ("tests/test_stats.py",)),
    Mutant("stats: metrics over every cell, not the test cells", "engine/ops/stats.py",
           "e = (p.astype(np.float64) - y).where(w)", "e = (p.astype(np.float64) - y)",
           ("tests/test_stats.py",)),
    Mutant("spec: learning_rate range check removed", "engine/pipelines/spec.py",
           "if not (t.learning_rate > 0 and math.isfinite(t.learning_rate)):",
           "if False:",
           ("tests/test_spec.py",)),
    Mutant("spec: job name not checked", "engine/pipelines/spec.py",
           "if not _SAFE_NAME.match(spec.name) or", "if False and",
           ("tests/test_spec.py",)),
    Mutant("yaml: aliases allowed", "engine/io/yaml_safe.py",
           "if isinstance(event, yaml.AliasEvent):", "if False:",
           ("tests/test_yaml_safe.py", "tests/test_spec.py")),
    Mutant("verify: checksums not compared", "engine/io/verify.py",
           "if now != recorded:", "if False:",
           ("tests/test_verify.py",)),
    Mutant("writer: resume trusts damaged records", "engine/io/writer/__init__.py",
           "done = set(records) - damaged", "done = set(records)",
           ("tests/test_verify.py", "tests/test_writer.py")),
    Mutant("destination: output inside an input allowed", "engine/io/destination.py",
           'return inner == outer or inner.startswith(outer.rstrip("/") + "/")',
           "return inner == outer",
           ("tests/test_destination.py",)),
    Mutant("redact: storage options kept in clear", "engine/redact.py",
           "        else:\n            out[k] = MASK\n    return out",
           "        else:\n            out[k] = value\n    return out",
           ("tests/test_redact.py",)),
    Mutant("catalog: any module:callable accepted as an intake class",
           "engine/io/intake_parse.py",
           "if isinstance(name, str) and (name in supported or pattern.fullmatch(name)):",
           "if True:",
           ("tests/test_catalog_trust.py",)),
    Mutant("gapfill: fills outside the training range", "engine/pipelines/gapfill.py",
           "in_range = (prediction >= lo) & (prediction <= hi)",
           "in_range = prediction == prediction",
           ("tests/test_gapfill.py::test_no_fill_outside_the_training_range",)),
    Mutant("runner: input content not in the resume identity", "engine/pipelines/runner.py",
           'ident["input"] = store_identity(p.input_url, so)', "pass",
           ("tests/test_gapfill_trust.py::"
            "test_changed_input_values_are_refused_then_restart_recomputes",)),
    Mutant("runner: run folder shared by every store in a folder",
           "engine/pipelines/runner.py",
           'return url, os.path.join(os.path.dirname(path), f"{stem}.run")',
           "return url, os.path.dirname(path)",
           ("tests/test_gapfill_trust.py::"
            "test_two_outputs_in_one_folder_keep_their_own_run_folders",)),
    Mutant("cluster: dashboard on every interface", "engine/cluster.py",
           'LOCALHOST = "127.0.0.1"', 'LOCALHOST = "0.0.0.0"',
           ("tests/test_cluster.py",)),
)

_IGNORE = shutil.ignore_patterns(".venv", ".git", "runs", ".pytest_cache", "__pycache__",
                                 ".mypy_cache", ".ruff_cache", ".hypothesis", "*.egg-info",
                                 "build", ".whl")


def _run_one(root: str, m: Mutant, timeout: float) -> tuple[str, float]:
    path = os.path.join(root, m.path)
    with open(path) as f:
        original = f.read()
    if original.count(m.old) != 1:
        return "stale", 0.0
    with open(path, "w") as f:
        f.write(original.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                              "no:cacheprovider", *m.tests], cwd=root, env=env,
                             capture_output=True, text=True, timeout=timeout)
        outcome = "survived" if res.returncode == 0 else \
            "killed" if res.returncode == 1 else f"error (pytest exit {res.returncode})"
    except subprocess.TimeoutExpired:
        outcome = "killed (timeout)"
    finally:
        with open(path, "w") as f:
            f.write(original)
    return outcome, time.perf_counter() - t0


def run(root: str = ".", select: str | None = None, timeout: float = 900) -> int:
    """Run the audit over a copy of ``root``; returns the number of surviving mutants."""
    mutants = [m for m in MUTANTS if not select or select.lower() in m.name.lower()]
    survived = stale = killed = 0
    with tempfile.TemporaryDirectory(prefix="cube-engine-mutate-") as tmp:
        copy = os.path.join(tmp, "repo")
        shutil.copytree(root, copy, ignore=_IGNORE, symlinks=True)
        for m in mutants:
            outcome, seconds = _run_one(copy, m, timeout)
            killed += outcome.startswith("killed")
            survived += outcome == "survived"
            stale += outcome == "stale"
            print(f"{outcome:>18}  {seconds:6.1f} s  {m.name}  [{m.path}]", flush=True)
    scored = len(mutants) - stale
    print(f"mutation score: {killed}/{scored} killed"
          + (f", {survived} survived" if survived else "")
          + (f", {stale} stale (update engine/testing/mutate.py)" if stale else ""))
    return survived + stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.testing.mutate", description=__doc__)
    p.add_argument("-k", dest="select", help="only mutants whose name contains this")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    args = p.parse_args(argv)
    return 1 if run(".", args.select, args.timeout) else 0


if __name__ == "__main__":
    raise SystemExit(main())
