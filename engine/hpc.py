"""SLURM: workers as batch jobs (``--cluster slurm``) and whole jobs in one allocation.

Two ways to run on an HPC system, both configured under ``engine.cluster.slurm.*`` in
dask.config (``DASK_ENGINE__CLUSTER__SLURM__QUEUE=gpu``, ``~/.config/dask/*.yaml``):

``--cluster slurm``
    The scheduler runs in this process (a login node); each worker is a SLURM job
    submitted by dask-jobqueue's ``SLURMCluster`` (``pip install 'cube-engine[hpc]'``).
    The client owns the cluster: closing it cancels the jobs.
``cube-engine deploy slurm JOB.yaml``
    An sbatch script that runs scheduler, workers and the job inside one allocation
    (:func:`sbatch_script`), with no dask-jobqueue and no process outside the allocation.

Workers on other nodes reach the scheduler over the network, so both speak TLS by
default: temporary certificates that live as long as the cluster (``tls: false`` turns
it off on a trusted network). GPU jobs ask for ``--gres=gpu:N`` and start one dask-cuda
worker per GPU, each with the ``GPU=1`` resource that inference tasks ask for.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from typing import Any

import dask.config
from dask.utils import format_bytes, parse_bytes, parse_timedelta

from engine.errors import ClusterError, SpecError

__all__ = [
    # settings
    "SlurmSettings",
    "slurm_settings",
    # --cluster slurm
    "slurm_cluster_kwargs",
    "connect_slurm",
    # one allocation
    "sbatch_script",
    "write_temporary_certificates",
]

_PREFIX = "engine.cluster.slurm."
# [D-]HH:MM:SS, the walltime form every SLURM site accepts
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)$")
_MIN_WORKER_MEMORY = parse_bytes("256MiB")  # as engine.cluster.MIN_WORKER_MEMORY


@dataclass(frozen=True)
class SlurmSettings:
    """What a SLURM worker job asks for, and how the cluster around it is set up.

    Every field is the key of the same name under ``engine.cluster.slurm`` (``_`` for
    ``-``); :func:`slurm_settings` reads and checks them.
    """

    queue: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    cores: int = 8
    memory: str = "32GiB"
    processes: int = 1
    gpus: int = 0
    job_extra_directives: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    scale: int = 2
    log_directory: str | None = None
    interface: str | None = None
    host: str | None = None
    python: str | None = None
    tls: bool = True
    shared_directory: str | None = None
    worker_timeout: float = 600.0


def _name(key: str) -> tuple[str, str]:
    """How a message names a key, and the environment variable that sets it."""
    env = "DASK_ENGINE__CLUSTER__SLURM__" + key.upper().replace("-", "_")
    return f"{_PREFIX}{key}", env


def _bad(key: str, what: str, value: Any, example: str) -> SpecError:
    name, env = _name(key)
    return SpecError(f"{name} must be {what}, got {value!r}: e.g. {env}={example}")


def _text(key: str, value: Any, *, allow_none: bool = True) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise _bad(key, "one line of text" + (" or null" if allow_none else ""), value,
                   {"queue": "gpu", "account": "myproject", "interface": "ib0"}.get(key, "x"))
    return value.strip()


def _count(key: str, value: Any, minimum: int, example: int) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if number is None or number < minimum:
        raise _bad(key, f"a whole number of at least {minimum}", value, str(example))
    return number


def _lines(key: str, value: Any, example: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, str) and v.strip() and "\n" not in v for v in value):
        raise _bad(key, "a list of one-line strings", value, example)
    return tuple(v.strip() for v in value)


def _walltime(value: Any) -> str:
    text = value.strip() if isinstance(value, str) else None
    if text is None or not _WALLTIME.match(text) or _seconds(text) == 0:
        raise _bad("walltime", "a time limit HH:MM:SS or D-HH:MM:SS", value, "04:00:00")
    return text


def is_walltime(text: str) -> bool:
    """Whether ``text`` is a SLURM time limit ``[D-]HH:MM:SS`` (and not zero).

    >>> is_walltime("04:00:00"), is_walltime("1-00:00:00"), is_walltime("4h")
    (True, True, False)
    """
    return bool(_WALLTIME.match(text)) and _seconds(text) > 0


def _seconds(walltime: str) -> int:
    m = _WALLTIME.match(walltime)
    assert m is not None
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _bad(key, "true or false", value, "true")


def slurm_settings(**overrides: Any) -> SlurmSettings:
    """Read ``engine.cluster.slurm.*`` from dask.config, with ``overrides`` winning.

    Every value is checked now, before any job is submitted: a bad one is one
    :class:`~engine.errors.SpecError` naming the key and how to set it.

    >>> s = slurm_settings(queue="debug", cores=4, memory="8GiB", walltime="00:30:00")
    >>> s.queue, s.cores, s.memory, s.walltime
    ('debug', 4, '8GiB', '00:30:00')
    >>> slurm_settings(cores=-2)
    Traceback (most recent call last):
    engine.errors.SpecError: engine.cluster.slurm.cores must be a whole number of at least 1, got -2: e.g. DASK_ENGINE__CLUSTER__SLURM__CORES=8
    """  # noqa: E501
    from engine import config  # noqa: F401  (engine.yaml's defaults are in dask.config)

    # DASK_ENGINE__CLUSTER__SLURM__LOG_DIRECTORY arrives as log_directory
    raw: dict[str, Any] = {str(k).replace("_", "-"): v for k, v in
                           (dask.config.get("engine.cluster.slurm", {}) or {}).items()}
    for key, value in overrides.items():
        raw[key.replace("_", "-")] = value
    known = {f.replace("_", "-") for f in SlurmSettings.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
        raise SpecError(f"{_PREFIX}{unknown[0]} is not a setting: {hint}")

    cores = _count("cores", raw.get("cores", 8), 1, 8)
    processes = _count("processes", raw.get("processes", 1), 1, 1)
    if processes > cores:
        raise SpecError(f"{_PREFIX}processes ({processes}) is more than {_PREFIX}cores "
                        f"({cores}): each worker process needs at least one core; lower "
                        "processes or raise cores")
    gpus = _count("gpus", raw.get("gpus", 0), 0, 1)
    memory = raw.get("memory", "32GiB")
    try:
        nbytes = parse_bytes(memory) if isinstance(memory, (str, int)) and not isinstance(
            memory, bool) else -1
    except (ValueError, TypeError):
        nbytes = -1
    if nbytes <= 0:
        raise _bad("memory", "a size per job", memory, "32GiB")
    per_worker = nbytes / max(gpus or processes, 1)
    if per_worker < _MIN_WORKER_MEMORY:
        name, env = _name("memory")
        raise SpecError(f"{name} {memory!r} is {format_bytes(int(per_worker))} per worker, "
                        f"too little to run anything (a bare number is bytes): e.g. "
                        f"{env}=32GiB")
    timeout = raw.get("worker-timeout", "10m")
    try:
        seconds = parse_timedelta(timeout)
    except (ValueError, TypeError, KeyError):
        seconds = None
    if seconds is None or seconds <= 0:
        raise _bad("worker-timeout", "a duration", timeout, "30m")
    return SlurmSettings(
        queue=_text("queue", raw.get("queue")),
        account=_text("account", raw.get("account")),
        walltime=_walltime(raw.get("walltime", "01:00:00")),
        cores=cores,
        memory=str(memory).strip() if isinstance(memory, str) else str(memory),
        processes=processes,
        gpus=gpus,
        job_extra_directives=_lines("job-extra-directives", raw.get("job-extra-directives"),
                                    "'[\"--qos=debug\"]'"),
        job_script_prologue=_lines("job-script-prologue", raw.get("job-script-prologue"),
                                   "'[\"module load cuda\"]'"),
        scale=_count("scale", raw.get("scale", 2), 1, 4),
        log_directory=_text("log-directory", raw.get("log-directory")),
        interface=_text("interface", raw.get("interface")),
        host=_text("host", raw.get("host")),
        python=_text("python", raw.get("python")),
        tls=_bool("tls", raw.get("tls", True)),
        shared_directory=_text("shared-directory", raw.get("shared-directory")),
        worker_timeout=float(seconds),
    )


# -- --cluster slurm -----------------------------------------------------------------

def _shared_directory(settings: SlurmSettings) -> str:
    """Where the workers' copies of the temporary certificates go (compute nodes read it)."""
    path = settings.shared_directory or settings.log_directory or "~/.cube-engine/slurm"
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as err:
        raise SpecError(f"{_PREFIX}shared-directory {path}: cannot create it "
                        f"({err.strerror or err}): give a folder on a filesystem the compute "
                        "nodes see") from None
    return path


def slurm_cluster_kwargs(
    settings: SlurmSettings,
    *,
    gpu_threads_per_worker: int = 8,
    dashboard_address: str | None = "127.0.0.1:0",
    security: Any = None,
) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` for ``settings``.

    CPU jobs run ``processes`` workers of ``cores / processes`` threads each. GPU jobs
    (``gpus: N``) ask for ``--gres=gpu:N`` and ``cores`` CPUs, and run one dask-cuda
    worker per GPU with ``gpu_threads_per_worker`` threads and the ``GPU=1`` resource.
    The dashboard binds ``dashboard_address`` (127.0.0.1 when no host is given: reach it
    through an SSH tunnel); so does each worker's HTTP server.

    >>> kw = slurm_cluster_kwargs(slurm_settings(queue="gpu", gpus=2, cores=16,
    ...                                          memory="64GiB", tls=False))
    >>> kw["job_extra_directives"], kw["worker_extra_args"][:2], kw["processes"]
    (['--gres=gpu:2'], ['--resources', 'GPU=1'], 2)
    """
    from engine.cluster import _local_dashboard

    dash = _local_dashboard(dashboard_address)
    worker_args = ["--dashboard-address", "127.0.0.1:0"]
    kwargs: dict[str, Any] = {
        "queue": settings.queue,
        "account": settings.account,
        "walltime": settings.walltime,
        "memory": settings.memory,
        "job_name": "cube-engine-worker",
        "job_extra_directives": list(settings.job_extra_directives),
        "job_script_prologue": list(settings.job_script_prologue),
        "log_directory": settings.log_directory,
        "interface": settings.interface,
        "python": settings.python or sys.executable,
        "scheduler_options": ({"dashboard_address": dash} if dash is not None
                              else {"dashboard": False, "dashboard_address": "127.0.0.1:0"}),
    }
    if settings.host:
        kwargs["scheduler_options"]["host"] = settings.host
    if settings.gpus:
        threads = gpu_threads_per_worker
        kwargs.update(
            cores=settings.gpus * threads,  # dask-jobqueue: threads = cores / processes
            processes=settings.gpus,  # dask-cuda starts one worker per visible GPU
            job_cpu=settings.cores,  # what SLURM books, independent of the thread count
            worker_command="dask_cuda.cli worker",
        )
        kwargs["job_extra_directives"].insert(0, f"--gres=gpu:{settings.gpus}")
        worker_args = ["--resources", "GPU=1", *worker_args]
    else:
        kwargs.update(cores=settings.cores, processes=settings.processes)
    kwargs["worker_extra_args"] = worker_args
    if security is not None:
        kwargs.update(security=security, protocol="tls://",
                      shared_temp_directory=_shared_directory(settings))
    return kwargs


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def connect_slurm(
    security: Any = None,
    *,
    dashboard_address: str | None = "127.0.0.1:0",
    **overrides: Any,
) -> Any:
    """Start a ``SLURMCluster``, submit ``scale`` worker jobs and return its owning Client.

    Waits up to ``worker-timeout`` for the first worker to join; the returned client
    cancels every worker job when it closes. ``security`` (certificates for every role)
    replaces the temporary ones that ``tls: true`` makes.
    """
    from engine.cluster import _client_of, _local_security
    from engine.errors import require

    settings = slurm_settings(**overrides)
    if security is not None or settings.tls:
        security = _local_security(True, security)  # given (checked) or temporary
    gpu_threads = int(dask.config.get("engine.cluster.gpu-threads-per-worker", 8))
    kwargs = slurm_cluster_kwargs(settings, gpu_threads_per_worker=gpu_threads,
                                  dashboard_address=dashboard_address, security=security)
    jobqueue = require("dask_jobqueue", "hpc")
    try:
        cluster = jobqueue.SLURMCluster(**kwargs)
    except Exception as err:
        raise ClusterError(f"cannot start the SLURM cluster's scheduler ({_one_line(err)}): "
                           f"check {_PREFIX}* (interface, host)") from None
    client = _client_of(cluster)
    try:
        cluster.scale(jobs=settings.scale)
        _wait_for_first_worker(client, cluster, settings)
    except BaseException:
        client.close()
        raise
    return client


def _wait_for_first_worker(client: Any, cluster: Any, settings: SlurmSettings) -> None:
    try:
        client.wait_for_workers(1, timeout=settings.worker_timeout)
        return
    except TimeoutError:
        pass
    jobs = [j for j in (getattr(w, "job_id", None) for w in cluster.workers.values()) if j]
    where = (f"in {settings.log_directory}" if settings.log_directory
             else f"in the folder the jobs ran in (set {_PREFIX}log-directory)")
    raise ClusterError(
        f"no SLURM worker joined within {format_seconds(settings.worker_timeout)} "
        f"(jobs {', '.join(jobs) or 'none submitted'}): check squeue --me and the job logs "
        f"{where}, or wait longer with {_PREFIX}worker-timeout"
    )


def format_seconds(seconds: float) -> str:
    """``90`` -> ``'1m30s'``; for messages."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# -- one allocation ------------------------------------------------------------------

def write_temporary_certificates(folder: str) -> tuple[str, str, str]:
    """Write a self-signed certificate and its key into ``folder`` (mode 0600 files).

    One certificate serves as CA, scheduler, worker and client certificate: everything
    in one allocation shares it, and nothing outside the allocation has it. Returns
    the paths of ``ca.pem``, ``cert.pem`` and ``key.pem``.
    """
    from engine.security import temporary_security

    security = temporary_security()
    os.makedirs(folder, mode=0o700, exist_ok=True)
    paths = []
    pems = security.get_tls_config_for_role("client")  # PEM text, not file names
    for name, text in (("ca.pem", pems["ca_file"]), ("cert.pem", pems["cert"]),
                       ("key.pem", pems["key"])):
        path = os.path.join(folder, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        paths.append(path)
    return paths[0], paths[1], paths[2]


_SCRIPT = """\
#!/bin/bash
# Written by `cube-engine deploy slurm {job}`
# The dask scheduler on the first node of the allocation, workers on every node (srun),
# then the job itself. Everything speaks TLS with a certificate made for this allocation
# only. Submit from the folder the job path is relative to: sbatch THIS_FILE
{directives}
set -euo pipefail
{prologue}
# A folder every node sees (the submit directory by default), private to this job
RUN_DIR="${{CUBE_ENGINE_RUN_DIR:-$SLURM_SUBMIT_DIR/.cube-engine}}/slurm-$SLURM_JOB_ID"
mkdir -p "$RUN_DIR" && chmod 700 "$RUN_DIR"
SCHEDULER_FILE="$RUN_DIR/scheduler.json"
python -c 'import sys; from engine.hpc import write_temporary_certificates as w; \\
w(sys.argv[1])' "$RUN_DIR/tls"
TLS=(--tls-ca-file "$RUN_DIR/tls/ca.pem" --tls-cert "$RUN_DIR/tls/cert.pem" \\
     --tls-key "$RUN_DIR/tls/key.pem")
cleanup() {{ kill $(jobs -p) 2>/dev/null || true; rm -rf "$RUN_DIR/tls"; }}
trap cleanup EXIT

# scheduler: on this (the first) node; dashboard on 127.0.0.1 (ssh -L to reach it)
python -m distributed.cli.dask_scheduler --protocol tls --port 0 \\
  --dashboard-address 127.0.0.1:8787 --scheduler-file "$SCHEDULER_FILE" "${{TLS[@]}}" \\
  > "$RUN_DIR/scheduler.log" 2>&1 &
for _ in $(seq 120); do [ -s "$SCHEDULER_FILE" ] && break; sleep 1; done
[ -s "$SCHEDULER_FILE" ] || {{ echo "no scheduler: see $RUN_DIR/scheduler.log" >&2; exit 1; }}

# workers: one srun task per node, with the node's CPUs (srun does not inherit them)
srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=0 \\
  {worker} \\
  --scheduler-file "$SCHEDULER_FILE" "${{TLS[@]}}" > "$RUN_DIR/workers.log" 2>&1 &

cube-engine run {job} --cluster "scheduler-file:$SCHEDULER_FILE" \\
  --tls-ca "$RUN_DIR/tls/ca.pem" --tls-cert "$RUN_DIR/tls/cert.pem" \\
  --tls-key "$RUN_DIR/tls/key.pem" --quiet{sets}
"""


def sbatch_script(
    job: str,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    partition: str | None = None,
    account: str | None = None,
    time_limit: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> str:
    """The sbatch script that runs job file ``job`` in one allocation of ``nodes`` nodes.

    Defaults come from ``engine.cluster.slurm``: ``scale`` nodes, ``gpus`` per node,
    ``queue`` as partition, ``account``, ``walltime``, ``cores`` and ``memory`` per node,
    extra directives and prologue lines. GPU nodes run ``dask cuda worker`` (one worker
    per GPU, ``--resources GPU=1``); CPU nodes ``processes`` workers of
    ``cores / processes`` threads. ``overrides`` (``KEY=VALUE``) become ``--set`` options
    of the script's ``cube-engine run``.

    >>> script = sbatch_script("jobs/gapfill.yaml", nodes=2, partition="compute",
    ...                        time_limit="02:00:00")
    >>> [line for line in script.splitlines() if line.startswith(
    ...     ("#SBATCH --nodes", "#SBATCH --time", "#SBATCH --partition"))]
    ['#SBATCH --nodes=2', '#SBATCH --time=02:00:00', '#SBATCH --partition=compute']
    """
    settings = slurm_settings(**{k: v for k, v in (
        ("scale", nodes), ("gpus", gpus_per_node), ("queue", partition),
        ("account", account), ("walltime", time_limit)) if v is not None})
    directives = [
        "--job-name=cube-engine",
        f"--nodes={settings.scale}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={settings.cores}",
        f"--mem={_slurm_memory(settings.memory)}",
        f"--time={settings.walltime}",
    ]
    if settings.queue:
        directives.append(f"--partition={settings.queue}")
    if settings.account:
        directives.append(f"--account={settings.account}")
    if settings.gpus:
        directives.append(f"--gres=gpu:{settings.gpus}")
    directives += settings.job_extra_directives
    gpu_threads = int(dask.config.get("engine.cluster.gpu-threads-per-worker", 8))
    # the workers get 3/4 of each node's memory: the first node also runs the scheduler
    # and the job's own process
    per_worker = parse_bytes(settings.memory) * 3 // 4 // (settings.gpus or settings.processes)
    limit = format_bytes(per_worker).replace(" ", "")
    if settings.gpus:
        worker = (f"python -m dask_cuda.cli worker --nthreads {gpu_threads} \\\n"
                  f"  --memory-limit {limit} --resources GPU=1 --dashboard-address 127.0.0.1:0")
    else:
        worker = (f"python -m distributed.cli.dask_worker --nworkers {settings.processes} "
                  f"--nthreads {settings.cores // settings.processes} \\\n"
                  f"  --memory-limit {limit} --dashboard-address 127.0.0.1:0")
    return _SCRIPT.format(
        job=shlex.quote(job),
        directives="\n".join(f"#SBATCH {d}" for d in directives),
        prologue="\n".join(settings.job_script_prologue) or "# (no job-script-prologue)",
        worker=worker,
        sets="".join(f" \\\n  --set {shlex.quote(o)}" for o in overrides),
    )


def _slurm_memory(size: str | int) -> str:
    """A size as SLURM writes it: whole MiB with an ``M`` (``32GiB`` -> ``32768M``)."""
    nbytes = parse_bytes(size) if isinstance(size, str) else int(size)
    return f"{max(1, -(-nbytes // 2**20))}M"
