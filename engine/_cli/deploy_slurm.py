"""``cube-engine deploy slurm JOB``: an sbatch script that runs the job in one allocation.

The script (:func:`engine.hpc.sbatch_script`) starts the dask scheduler on the first
node, one worker per node with ``srun`` (dask-cuda workers with ``GPU=1`` on GPU nodes)
and then ``cube-engine run JOB --cluster scheduler-file:PATH``. The job file is parsed
first: a bad job, flag or ``engine.cluster.slurm`` setting is one line and exit code 2,
and nothing is written. Without ``--output`` the script goes to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

__all__ = ["add_slurm_parser", "cmd_deploy_slurm"]

# first line after the shebang of every script this command writes: an existing file
# without it is someone else's and is never replaced
MARK = "# Written by `cube-engine deploy slurm"


def add_slurm_parser(targets, parents: Sequence[argparse.ArgumentParser] = ()
                     ) -> argparse.ArgumentParser:
    """Add the ``slurm`` target to the subparsers of ``cube-engine deploy``."""
    s = targets.add_parser(
        "slurm", parents=list(parents),
        help="an sbatch script that runs the job in one allocation: scheduler on the first "
             "node, workers by srun, then cube-engine run (defaults: engine.cluster.slurm)")
    s.add_argument("job", help="job spec YAML, e.g. jobs/gapfill.yaml (path as sbatch will "
                               "see it from the submit directory)")
    s.add_argument("--output", metavar="FILE", default=None,
                   help="write the script to FILE (default: stdout)")
    # numbers and times are taken as text and checked here: one line, not argparse's usage
    s.add_argument("--nodes", metavar="N", default=None,
                   help="nodes of the allocation, one worker each (default "
                        "engine.cluster.slurm.scale)")
    s.add_argument("--gpus-per-node", metavar="N", default=None,
                   help="GPUs per node: --gres=gpu:N and dask-cuda workers (default "
                        "engine.cluster.slurm.gpus)")
    s.add_argument("--partition", metavar="P", default=None,
                   help="partition (default engine.cluster.slurm.queue)")
    s.add_argument("--account", metavar="A", default=None,
                   help="account to charge (default engine.cluster.slurm.account)")
    s.add_argument("--time", metavar="HH:MM:SS", default=None,
                   help="time limit of the allocation (default engine.cluster.slurm.walltime)")
    s.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a job field, as for run; passed on to "
                   "the script's cube-engine run (--set output.url=$SCRATCH/out.zarr)")
    return s


def _flag_count(text: str | None, flag: str, minimum: int) -> int | None:
    from engine.errors import SpecError

    if text is None:
        return None
    if not text.strip().isdigit() or int(text) < minimum:
        raise SpecError(f"{flag} must be a whole number of at least {minimum}, got {text!r}: "
                        f"e.g. {flag} {max(minimum, 2)}")
    return int(text)


def _flag_text(text: str | None, flag: str, example: str) -> str | None:
    from engine.errors import SpecError

    if text is None:
        return None
    if not text.strip() or any(c.isspace() for c in text.strip()):
        raise SpecError(f"{flag} must be one word, got {text!r}: e.g. {flag} {example}")
    return text.strip()


def _check_output(path: str) -> None:
    from engine.errors import SpecError

    if os.path.isdir(path):
        raise SpecError(f"--output {path} is a folder: give the script's file name, e.g. "
                        "--output run.sbatch")
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096).splitlines()[1:2]
        if not head or not head[0].startswith(MARK):
            raise SpecError(f"--output {path} exists and was not written by cube-engine "
                            "deploy slurm: move it away or give another file")


def _write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed)."""
    from engine.errors import SpecError

    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".deploy-", suffix=".sbatch")
    except OSError as err:
        raise SpecError(f"--output {path}: cannot write there ({err.strerror or err}); "
                        "give a file in a writable folder") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_deploy_slurm(args: argparse.Namespace) -> int:
    """Check the job and the flags, then print or write the sbatch script."""
    from engine.errors import SpecError
    from engine.hpc import is_walltime, sbatch_script
    from engine.pipelines.spec import load_job

    nodes = _flag_count(args.nodes, "--nodes", 1)
    gpus = _flag_count(args.gpus_per_node, "--gpus-per-node", 0)
    partition = _flag_text(args.partition, "--partition", "gpu")
    account = _flag_text(args.account, "--account", "myproject")
    if args.time is not None and not is_walltime(args.time.strip()):
        raise SpecError(f"--time must be HH:MM:SS or D-HH:MM:SS, got {args.time!r}: "
                        "e.g. --time 04:00:00")
    if args.output is not None:
        _check_output(args.output)
    overrides = list(getattr(args, "overrides", []))
    # the job must parse, with the overrides, before a script that runs it exists
    spec = load_job(args.job, overrides)
    script = sbatch_script(args.job, nodes=nodes, gpus_per_node=gpus, partition=partition,
                           account=account, time_limit=args.time and args.time.strip(),
                           overrides=overrides)
    if args.output is None:
        sys.stdout.write(script)
        return 0
    _write(args.output, script)
    print(f"wrote {args.output} ({spec.kind} job {args.job}); submit: sbatch {args.output}; "
          "watch: squeue --me", file=sys.stderr)
    return 0
