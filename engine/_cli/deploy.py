"""``cube-engine deploy TARGET JOB``: write the files that run a job where the users run.

``slurm``: an sbatch script for one allocation (:mod:`engine._cli.deploy_slurm`).
``k8s``: manifests for the dask-kubernetes operator (:mod:`engine.deploy.k8s`). Every
bad flag or job field is one line and exit code 2, and nothing is written; the manifests
go into ``--output DIR`` as ``NAME.yaml``, replacing only a file this command wrote.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

__all__ = ["add_parser", "cmd_deploy"]


def add_parser(subparsers, parents: Sequence[argparse.ArgumentParser] = ()
               ) -> argparse.ArgumentParser:
    """Add the ``deploy`` verb and its targets to a ``cube-engine`` parser's subparsers."""
    p = subparsers.add_parser("deploy", parents=list(parents),
                              help="write the files that run a job on Kubernetes or SLURM")
    targets = p.add_subparsers(dest="deploy_target", required=True, metavar="TARGET")
    from engine._cli.deploy_slurm import add_slurm_parser

    add_slurm_parser(targets, parents)
    k = targets.add_parser(
        "k8s", parents=list(parents),
        help="manifests for the dask-kubernetes operator: a DaskJob (scheduler, CPU workers, "
             "job pod), a GPU worker group and the job file in a ConfigMap")
    k.add_argument("job", help="job spec YAML, e.g. jobs/gapfill.yaml")
    # numbers are taken as text and checked by the engine: one line, not argparse's usage
    k.add_argument("--workers", metavar="N", default="2", help="CPU workers (default 2)")
    k.add_argument("--gpus", metavar="N", default="0",
                   help="dask-cuda workers, one GPU each (default 0: no GPU worker group)")
    k.add_argument("--job-gpu", action="store_true",
                   help="one GPU for the job pod, where training runs (GPU image)")
    k.add_argument("--image", metavar="IMG", default=None,
                   help="image of the scheduler, CPU workers and job pod (deploy/Dockerfile)")
    k.add_argument("--gpu-image", metavar="IMG", default=None,
                   help="image of the GPU workers (deploy/Dockerfile.gpu)")
    k.add_argument("--namespace", metavar="NS", default=None,
                   help="namespace of every object (default: kubectl's current one)")
    k.add_argument("--secret", metavar="NAME", default=None,
                   help="Kubernetes Secret whose keys become environment variables of the "
                        "job pod and workers (object-store credentials)")
    k.add_argument("--operator-namespace", metavar="NS", default=None,
                   help="namespace of the dask-kubernetes operator, admitted by the "
                        "cluster's NetworkPolicy (default dask-operator)")
    k.add_argument("--output", metavar="DIR", default="k8s",
                   help="folder of the manifests (default k8s/); writes DIR/NAME.yaml")
    k.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a job field, as for run "
                   "(--set output.url=s3://bucket/out.zarr)")
    return p


def _count(text: str, flag: str) -> int:
    from engine.errors import SpecError

    try:
        return int(text, 10)
    except ValueError:
        raise SpecError(f"{flag} must be a whole number, got {text!r}") from None


def _destination(output: str, name: str) -> str:
    """``output/NAME.yaml``, checked: a folder (or none yet), and no file of someone else's."""
    from engine.deploy.k8s import HEADER
    from engine.errors import SpecError

    if os.path.exists(output) and not os.path.isdir(output):
        raise SpecError(f"--output {output} is a file, not a folder: give a folder for the "
                        "manifests (it is created if missing)")
    path = os.path.join(output, f"{name}.yaml")
    if os.path.isdir(path):
        raise SpecError(f"{path} is a folder: give another --output")
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(len(HEADER))
        if head != HEADER:
            raise SpecError(f"{path} exists and was not written by cube-engine deploy k8s: "
                            "move it away or give another --output")
    return path


def _write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed)."""
    from engine.errors import SpecError

    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".deploy-", suffix=".yaml")
    except OSError as err:
        raise SpecError(f"--output {folder}: cannot write there ({err.strerror or err}); "
                        "give a writable folder") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_deploy(args: argparse.Namespace) -> int:
    """Run ``cube-engine deploy TARGET``; return the exit code."""
    if args.deploy_target == "slurm":
        from engine._cli.deploy_slurm import cmd_deploy_slurm

        return cmd_deploy_slurm(args)
    from engine.deploy import k8s

    workers = _count(args.workers, "--workers")
    gpus = _count(args.gpus, "--gpus")
    docs, dropped = k8s.job_manifests(
        args.job, args.overrides, workers=workers, gpus=gpus, image=args.image,
        gpu_image=args.gpu_image, namespace=args.namespace, secret=args.secret,
        operator_namespace=args.operator_namespace or k8s.OPERATOR_NAMESPACE,
        job_gpu=args.job_gpu)
    name = next(d["metadata"]["name"] for d in docs if d["kind"] == "DaskJob")
    path = _destination(args.output, name)
    _write(path, k8s.render(docs, os.path.basename(args.job)))
    if dropped:
        print(f"left out of the ConfigMap (the pods read them from Secret {args.secret}): "
              + ", ".join(dropped), file=sys.stderr)
    kinds = ", ".join(f"{d['kind']} {d['metadata']['name']}" for d in docs)
    ns = f" -n {args.namespace}" if args.namespace else ""
    print(f"wrote {path} ({kinds})")
    print(f"apply: kubectl apply -f {path}; watch: kubectl get daskjob {name}{ns} -w; "
          f"dashboard: kubectl port-forward svc/{name}-scheduler{ns} 8787")
    return 0
