"""One function that returns a dask Client for a cluster spec.

Specs
-----
``local``              LocalCluster with worker processes (the default)
``threads``            LocalCluster with one process and threads (debugging, small data)
``local-cuda``         dask-cuda LocalCUDACluster, one worker per GPU (``gpu-cuda12/13`` extra)
``slurm``              workers as SLURM jobs through dask-jobqueue (``hpc`` extra; engine.hpc)
``tls://host:port``    an existing scheduler that speaks TLS (Kubernetes, HPC)
``tcp://host:port``    an existing plaintext scheduler (only on a trusted network)
``scheduler-file:P``   an existing scheduler described by a scheduler file (HPC)

Worker count, threads and memory come from ``engine.cluster.*`` in dask.config
(``DASK_ENGINE__CLUSTER__N_WORKERS=4``); keyword arguments win. Every bad value is one
:class:`~engine.errors.SpecError` naming the option, raised before anything starts.

Local clusters listen on 127.0.0.1 only: scheduler, nannies, workers and dashboard.
``tls=True`` (``engine.cluster.tls``) also encrypts and authenticates their connections
with temporary certificates. A TLS scheduler is reached with the cluster's CA and a
client certificate: ``security=`` (see :func:`engine.security.tls_security`), or dask's
``distributed.comm.tls.*`` configuration when no ``security`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import signal
import socket
import threading
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import dask.config
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client, LocalCluster, Security

from engine import config
from engine.errors import ClusterError, EngineWarning, MissingExtraError, SpecError
from engine.security import configured_security, has_client_tls, temporary_security

__all__ = ["connect", "parse_spec", "check_cluster_options", "cluster_summary"]

_KINDS = ("local", "threads", "local-cuda", "slurm")
LOCALHOST = "127.0.0.1"
# Below this a worker is paused or restarted by its own memory monitor before it does
# any work, and the run waits forever; "4" is 4 bytes to dask, not 4 GB.
MIN_WORKER_MEMORY = parse_bytes("256MiB")
_TLS_HINT = ("--tls-ca, --tls-cert and --tls-key (or distributed.comm.tls.ca-file and "
             "distributed.comm.tls.client.cert/.key in dask config)")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split a cluster spec into ``(kind, target)``; raise :class:`SpecError` when unknown.

    >>> parse_spec("tls://10.0.0.5:8786")
    ('address', 'tls://10.0.0.5:8786')
    >>> parse_spec("local")
    ('local', None)
    """
    if not isinstance(spec, str):
        raise SpecError(f"cluster spec must be a string, got {spec!r}: use local, threads, "
                        "local-cuda, slurm, tls://host:port, tcp://host:port or "
                        "scheduler-file:PATH")
    spec = spec.strip()
    if spec in _KINDS:
        return spec, None
    if spec.startswith("scheduler-file:"):
        path = spec.split(":", 1)[1]
        if not path:
            raise SpecError("cluster spec 'scheduler-file:' needs a path: scheduler-file:PATH")
        return "scheduler-file", path
    parsed = urlparse(spec)
    if parsed.scheme in ("tcp", "tls", "ucx", "inproc", "ws", "wss") and parsed.netloc:
        return "address", spec
    raise SpecError(
        f"unknown cluster spec {spec!r}: use local, threads, local-cuda, slurm, "
        "tls://host:port, tcp://host:port or scheduler-file:PATH"
    )


# -- options -------------------------------------------------------------------------

def _names(option: str, source: str) -> tuple[str, str]:
    """How to name an option in a message, and how to set it, for where it came from."""
    if source == "cli":
        flag = "--" + option
        return flag, f"e.g. {flag} {{example}}"
    if source == "config":
        env = "DASK_ENGINE__CLUSTER__" + option.upper().replace("-", "_")
        return f"engine.cluster.{option} (dask config)", f"e.g. {env}={{example}}"
    kw = option.replace("-", "_")
    return kw, f"e.g. {kw}={{example!r}}"


def _whole(value: Any, option: str, source: str, *, allow_none: bool) -> int | None:
    name, fix = _names(option, source)
    if value is None and allow_none:
        return None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value)
    if number is None or number < 1:
        default = "one per core" if option == "n-workers" else "dask's default"
        what = "a whole number of at least 1" + (f" or null ({default})" if allow_none else "")
        raise SpecError(f"{name} must be {what}, got {value!r}: "
                        + fix.format(example=2 if option == "n-workers" else 1))
    return number


def _memory(value: Any, source: str) -> str | int | float | None:
    """A memory limit LocalCluster accepts: ``auto``, a size, a fraction or 0 (no limit)."""
    name, fix = _names("memory-limit", source)
    fix = fix.format(example="4GiB") + ", 0.5 (half the machine), auto or 0 (no limit)"
    if value is None or value == "auto":
        return value
    bad = SpecError(f"{name} must be a size, got {value!r}: {fix}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    nbytes: float
    fraction = False
    try:
        nbytes = float(value)  # dask's reading: a number <= 1 is a fraction of the machine
        fraction = nbytes <= 1
    except ValueError:
        try:
            nbytes = float(parse_bytes(value))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise bad from None
    if not math.isfinite(nbytes) or nbytes < 0:
        raise SpecError(f"{name} must be a size of at least 0, got {value!r}: {fix}")
    if nbytes == 0:
        return value  # no limit, as in dask
    if fraction:
        from distributed.system import MEMORY_LIMIT

        nbytes *= MEMORY_LIMIT
    if nbytes < MIN_WORKER_MEMORY:
        raise SpecError(
            f"{name} {value!r} is {dask.utils.format_bytes(int(nbytes))} per worker, too "
            f"little to run anything (dask reads a bare number as bytes): {fix}"
        )
    return value


def check_cluster_options(
    n_workers: Any = None,
    threads_per_worker: Any = None,
    memory_limit: Any = None,
    *,
    source: str = "keyword",
) -> tuple[int | None, int | None, str | int | float | None]:
    """Check worker count, threads per worker and memory limit; return them normalised.

    ``source`` (``"cli"``, ``"config"`` or ``"keyword"``) chooses how a message names
    the option (``--n-workers``, ``engine.cluster.n-workers`` or ``n_workers``). A
    ``None`` is passed through (it means: use the default).

    >>> check_cluster_options("2", "1", "4GiB", source="cli")
    (2, 1, '4GiB')
    >>> check_cluster_options(0, source="cli")
    Traceback (most recent call last):
    engine.errors.SpecError: --n-workers must be a whole number of at least 1 or null (one per core), got 0: e.g. --n-workers 2
    """  # noqa: E501
    return (_whole(n_workers, "n-workers", source, allow_none=True),
            _whole(threads_per_worker, "threads-per-worker", source, allow_none=True),
            _memory(memory_limit, source))


def _option(key: str, value: Any) -> tuple[Any, str]:
    """The keyword value if given, else engine.cluster.<key>; and which it was."""
    if value is not None:
        return value, "keyword"
    return dask.config.get(f"engine.cluster.{key}", None), "config"


def _local_dashboard(address: Any) -> str | None:
    """``":0"``, ``8787`` or ``":8787"`` bound to 127.0.0.1, where dask binds 0.0.0.0."""
    if address is None or address is False:
        return None
    text = str(address).strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    if not port.isdigit():
        raise SpecError(f"dashboard address {address!r} needs a port: e.g. ':8787', "
                        "'127.0.0.1:0', or null to turn the dashboard off")
    return f"{host or LOCALHOST}:{port}"


# -- existing schedulers -----------------------------------------------------------

def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast, with one clear line, when nothing listens at a tcp/tls address."""
    parsed = urlparse(address)
    if parsed.scheme not in ("tcp", "tls") or parsed.hostname is None:
        return
    port = parsed.port or 8786
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as err:
        raise ClusterError(
            f"cannot reach the scheduler at {address} ({err.strerror or err}): start it "
            "(dask scheduler) or check --cluster"
        ) from None


def _one_line(err: BaseException) -> str:
    parts: list[str] = []
    e: BaseException | None = err
    while e is not None and len(parts) < 3:
        text = " ".join(str(e).split())
        if text and text not in " ".join(parts):
            parts.append(text)
        e = e.__cause__
    return "; ".join(parts) or type(err).__name__


def _ask_identity(address: str, security: Security | None, timeout: float) -> dict:
    """Open one dask connection and ask who answers, within ``timeout`` seconds.

    ``distributed.Client`` waits forever on a peer that accepts the connection and then
    says nothing (not a dask server), so the first contact is bounded here.
    """
    from distributed.comm import connect as comm_connect

    args = (security or Security()).get_connection_args("client")

    async def ask() -> dict:
        comm = await comm_connect(address, timeout=timeout, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    async def bounded() -> dict:
        return await asyncio.wait_for(ask(), timeout)

    result: dict[str, Any] = {}

    def run() -> None:  # own thread and loop: connect() may be called inside a loop
        try:
            result["reply"] = asyncio.run(bounded())
        except BaseException as err:
            result["error"] = err

    thread = threading.Thread(target=run, name="engine-connect-probe", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if "error" in result:
        raise result["error"]
    if "reply" not in result:
        raise TimeoutError(f"no answer within {timeout:g}s")
    return result["reply"]


def _probe_scheduler(address: str, security: Security | None, timeout: float) -> None:
    """One :class:`ClusterError` line for every way an address is not our scheduler."""
    from distributed.comm.core import CommClosedError, FatalCommClosedError

    scheme = urlparse(address).scheme
    try:
        reply = _ask_identity(address, security, timeout)
    except TimeoutError:
        raise ClusterError(
            f"no dask scheduler answered at {address} within {timeout:g}s: check the address "
            "(a scheduler listens on port 8786 by default) and whether it speaks tls:// or "
            "tcp://"
        ) from None
    except Exception as err:  # whatever answered, it is not a scheduler we can use
        detail = _one_line(err)
        if scheme == "tls" and "certificate does not match" in detail:
            raise ClusterError(
                f"the scheduler at {address} has a certificate that the given CA did not "
                f"sign ({detail}): use this cluster's CA file with --tls-ca"
            ) from None
        rejected = " alert " in f" {detail.lower()} " or (
            isinstance(err, CommClosedError) and not isinstance(err, FatalCommClosedError))
        if scheme == "tls" and rejected:  # the scheduler's verdict on our certificate
            raise ClusterError(
                f"the scheduler at {address} closed the TLS connection ({detail}): it did not "
                "accept this client's certificate; use one signed by the cluster's CA "
                "(--tls-cert, --tls-key)"
            ) from None
        if scheme == "tls":
            raise ClusterError(
                f"TLS handshake with {address} failed ({detail}): is it a TLS scheduler? "
                "A plaintext one is reached with tcp://"
            ) from None
        if isinstance(err, CommClosedError):
            raise ClusterError(
                f"the server at {address} closed the connection ({detail}): if the scheduler "
                f"speaks TLS, connect with tls:// and {_TLS_HINT}"
            ) from None
        raise ClusterError(f"cannot connect to the scheduler at {address} ({detail}): is a "
                           "dask scheduler listening there?") from None
    kind = reply.get("type") if isinstance(reply, dict) else None
    if not (isinstance(kind, str) and kind.endswith("Scheduler")):
        what = f"a dask {kind}" if isinstance(kind, str) else "not a dask server"
        raise ClusterError(f"{address} is {what}, not a scheduler: use the scheduler's "
                           "address (port 8786 by default)")


def _client_security(address: str, security: Security | None) -> Security | None:
    """The Security for a client of ``address``: given, or from dask config; checked."""
    if security is None:
        security = configured_security()
    scheme = urlparse(address).scheme
    if scheme == "tls" and not has_client_tls(security):
        raise ClusterError(
            f"{address} speaks TLS and this client has no certificate: give the cluster's CA "
            f"and a client certificate with {_TLS_HINT}"
        )
    if scheme != "tls" and security is not None and security.require_encryption:
        raise ClusterError(
            f"{address} is plaintext but encryption is required (TLS settings or "
            "distributed.comm.require-encryption): connect with tls://host:port"
        )
    return security


def _connect_address(address: str, security: Security | None, timeout: float) -> Client:
    parsed = urlparse(address)
    security = _client_security(address, security)
    if parsed.scheme == "tcp" and not _is_loopback(parsed.hostname):
        warnings.warn(
            f"{address} is plaintext and unauthenticated: anyone who reaches it can run code "
            "on the cluster; use tls:// (deploy/README.md, 'TLS')",
            EngineWarning, stacklevel=3,
        )
    _check_reachable(address, timeout)
    if parsed.scheme in ("tcp", "tls"):
        _probe_scheduler(address, security, timeout)
    try:
        return Client(address, timeout=timeout, security=security)
    except (OSError, TimeoutError, RuntimeError) as err:
        raise ClusterError(f"cannot connect to the scheduler at {address}: {_one_line(err)}"
                           ) from None


def _scheduler_file_address(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise ClusterError(
            f"scheduler file not found: {path}; start the scheduler with "
            f"dask scheduler --scheduler-file {path}"
        ) from None
    except (OSError, ValueError) as err:
        raise ClusterError(f"cannot read the scheduler file {path} ({_one_line(err)}): "
                           "point scheduler-file: at the JSON file the scheduler wrote") from None
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, str) or "://" not in address:
        raise ClusterError(f"the scheduler file {path} has no scheduler address: point "
                           "scheduler-file: at the JSON file the scheduler wrote")
    return address


# -- local clusters ----------------------------------------------------------------

class _OwningClient(Client):
    """A Client that shuts its local cluster down when it closes.

    ``Client(cluster).close()`` leaves the cluster (and its worker processes) running;
    only a cluster the Client started itself is closed with it.
    """

    def close(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().close(*args, **kwargs)
        finally:
            cluster = self.cluster
            if cluster is not None and not self.asynchronous:
                cluster.close()


def _local_security(tls: bool, security: Security | None) -> Security | None:
    if security is not None:
        roles = ("tls_ca_file", "tls_scheduler_cert", "tls_worker_cert", "tls_client_cert")
        if not all(getattr(security, role, None) for role in roles):
            raise SpecError("a local cluster with security= needs certificates for every role "
                            "(scheduler, worker, client): use engine.security.tls_security or "
                            "tls=True for temporary ones")
        return security
    return temporary_security() if tls else None


def local_cluster_kwargs(
    kind: str,
    *,
    n_workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str | int | float | None,
    dashboard_address: str | None,
    security: Security | None,
) -> dict[str, Any]:
    """The keyword arguments ``connect`` gives the local cluster class of ``kind``."""
    kwargs: dict[str, Any] = {
        "host": LOCALHOST,
        "n_workers": n_workers,
        "threads_per_worker": threads_per_worker,
        "memory_limit": memory_limit,
        "dashboard_address": dashboard_address,
    }
    if dashboard_address is None:
        # Dask still serves /health and /metrics then, on every interface: keep it local.
        kwargs["scheduler_kwargs"] = {"dashboard": False, "dashboard_address": f"{LOCALHOST}:0"}
    if security is not None:
        kwargs.update(security=security, protocol="tls://")
    if kind == "local-cuda":
        kwargs["resources"] = {"GPU": 1}
    elif kind == "threads":
        kwargs["processes"] = False
        kwargs["n_workers"] = 1 if n_workers is None else n_workers
        if security is None:  # in-process comms (inproc://) open no socket at all
            del kwargs["host"]
            # but the worker's HTTP server (/health, /metrics) binds every interface
            # unless it is given an address
            kwargs["worker_dashboard_address"] = f"{LOCALHOST}:0"
    else:
        kwargs["processes"] = True
    return kwargs


def connect(
    spec: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | float | None = None,
    dashboard_address: str | None = None,
    security: Security | None = None,
    tls: bool | None = None,
    **cluster_kwargs: Any,
) -> Client:
    """Return a :class:`distributed.Client` for ``spec`` (default ``engine.cluster.spec``).

    Local clusters are owned by the returned client: ``client.close()`` (or a ``with``
    block) shuts them down as well. They listen on 127.0.0.1 only.

    Parameters
    ----------
    spec
        ``local``, ``threads``, ``local-cuda``, ``slurm``, ``tls://host:port``,
        ``tcp://host:port`` or ``scheduler-file:PATH``. ``slurm`` submits worker jobs
        sized by ``engine.cluster.slurm.*`` (keyword arguments such as ``queue=`` win)
        and is owned by the client like a local cluster: see :func:`engine.hpc.connect_slurm`.
    n_workers, threads_per_worker, memory_limit, dashboard_address
        Size of a local cluster; default ``engine.cluster.*``. Checked before anything
        starts: a bad value is one :class:`SpecError` naming it.
    security
        A :class:`distributed.Security` with the cluster's CA and a client certificate
        (:func:`engine.security.tls_security`); default dask's ``distributed.comm.tls.*``
        configuration. For a local cluster: its certificates for every role.
    tls
        Start a local cluster with TLS and temporary certificates (default
        ``engine.cluster.tls``).

    Examples
    --------
    >>> with connect("threads", n_workers=1) as client:  # doctest: +SKIP
    ...     print(client.dashboard_link)
    """
    spec = config.get("cluster.spec", spec)
    kind, target = parse_spec(spec)
    timeout = parse_timedelta(config.get("cluster.connect-timeout"))

    if kind in ("address", "scheduler-file"):
        assert target is not None
        for key, value in (("n-workers", n_workers), ("threads-per-worker", threads_per_worker),
                           ("memory-limit", memory_limit)):
            if value is not None:
                raise SpecError(
                    f"{key.replace('-', '_')} sizes local clusters only; {spec} is sized "
                    "where it runs: leave it out (or use --cluster local)"
                )
        if tls:
            raise SpecError(f"tls=True starts a local TLS cluster; for {spec} give the "
                            f"cluster's certificates with {_TLS_HINT}")
        address = target if kind == "address" else _scheduler_file_address(target)
        return _connect_address(address, security, timeout)

    if kind == "slurm":
        for key, value in (("n-workers", n_workers), ("threads-per-worker", threads_per_worker),
                           ("memory-limit", memory_limit)):
            if value is not None:
                raise SpecError(f"{key.replace('-', '_')} sizes local clusters only; slurm "
                                "jobs are sized by engine.cluster.slurm (scale, cores, memory, "
                                "processes): leave it out")
        from engine.hpc import connect_slurm

        if tls is not None:
            cluster_kwargs["tls"] = tls
        return connect_slurm(
            security,
            dashboard_address=dashboard_address if dashboard_address is not None
            else dask.config.get("engine.cluster.dashboard-address", None),
            **cluster_kwargs)

    n, n_src = _option("n-workers", n_workers)
    threads, t_src = _option("threads-per-worker", threads_per_worker)
    if kind == "local-cuda":
        # one worker per GPU (dask-cuda's default) and several threads each, so the
        # blocks in flight on a GPU (predict.gpu-tasks-per-gpu) overlap their copies,
        # forward passes and host work; keywords still win
        if n_workers is None:
            n, n_src = None, "config"
        if threads_per_worker is None:
            threads, t_src = _option("gpu-threads-per-worker", None)
    memory, m_src = _option("memory-limit", memory_limit)
    n = check_cluster_options(n, source=n_src)[0]
    threads = check_cluster_options(threads_per_worker=threads, source=t_src)[1]
    memory = check_cluster_options(memory_limit=memory, source=m_src)[2]
    dash = _local_dashboard(
        dashboard_address if dashboard_address is not None
        else dask.config.get("engine.cluster.dashboard-address", None)
    )
    use_tls = bool(tls if tls is not None else dask.config.get("engine.cluster.tls", False))
    kwargs = local_cluster_kwargs(
        kind, n_workers=n, threads_per_worker=threads, memory_limit=memory,
        dashboard_address=dash, security=_local_security(use_tls, security),
    )
    kwargs.update(cluster_kwargs)

    if kind == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise MissingExtraError(
                "cluster 'local-cuda' needs dask-cuda: install it with "
                "pip install 'cube-engine[gpu-cuda12]' (CUDA 12 drivers) or "
                "'cube-engine[gpu-cuda13]' (CUDA 13), or make install-gpu CUDA=12|13"
            ) from None
        try:
            with _children_ignore_sigint():
                cluster = LocalCUDACluster(**kwargs)
        except Exception as err:  # no GPU, no driver, NVML failure
            raise ClusterError(
                f"cannot start a dask-cuda cluster ({_one_line(err)}); it needs an NVIDIA GPU "
                "and driver, use --cluster local on a machine without one"
            ) from None
        return _client_of(cluster)

    with _children_ignore_sigint():
        cluster = LocalCluster(**kwargs)
    return _client_of(cluster)


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Start worker processes with SIGINT ignored (an ignored signal stays ignored across
    exec, and Python then installs no KeyboardInterrupt handler): Ctrl-C in a terminal
    reaches the whole process group, and the workers must not die with tracebacks while
    this process closes the cluster in order. Ctrl-C during the few seconds of start-up
    is held back too, so a half-started cluster is never left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _client_of(cluster: Any) -> Client:
    try:
        return _OwningClient(cluster)
    except BaseException:
        cluster.close()
        raise


def dashboard_link(client: Client) -> str | None:
    """The dashboard's address as it is bound, for a local cluster; else what dask says."""
    from distributed.utils import format_dashboard_link

    cluster = getattr(client, "cluster", None)
    scheduler = getattr(cluster, "scheduler", None)
    server = getattr(scheduler, "http_server", None)
    options = getattr(cluster, "scheduler_spec", {}).get("options", {})
    if options.get("dashboard") is False:  # the HTTP server still runs, without the dashboard
        return None
    host = getattr(server, "address", None)
    port = getattr(server, "port", None)
    if host and port:
        return format_dashboard_link(host if ":" not in host else f"[{host}]", port)
    return client.dashboard_link or None


def cluster_summary(client: Client) -> dict[str, Any]:
    """A small, printable description of what the client is connected to."""
    info = client.scheduler_info(n_workers=-1)
    workers = info.get("workers", {})
    return {
        "scheduler": info.get("address"),
        "dashboard": dashboard_link(client),
        "tls": str(info.get("address", "")).startswith("tls://"),
        "n_workers": len(workers),
        "threads": sum(w.get("nthreads", 0) for w in workers.values()),
        "memory_limit_bytes": sum(w.get("memory_limit", 0) or 0 for w in workers.values()),
        "gpus": sum(1 for w in workers.values() if w.get("resources", {}).get("GPU")),
    }
