"""One function that returns a dask Client for a cluster spec.

Specs
-----
``local``              LocalCluster with worker processes (the default)
``threads``            LocalCluster with one process and threads (debugging, small data)
``local-cuda``         dask-cuda LocalCUDACluster, one worker per GPU (``gpu`` extra)
``tcp://host:port``    an existing scheduler (Kubernetes, HPC, ``dask scheduler``)
``scheduler-file:P``   an existing scheduler described by a scheduler file (HPC)

Worker count, threads and memory come from ``engine.cluster.*`` in dask.config
(``DASK_ENGINE__CLUSTER__N_WORKERS=4``); keyword arguments win.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

import dask.config
from distributed import Client, LocalCluster

from engine import config
from engine.errors import ClusterError, MissingExtraError, SpecError

__all__ = ["connect", "parse_spec", "cluster_summary"]

_KINDS = ("local", "threads", "local-cuda")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split a cluster spec into ``(kind, target)``; raise :class:`SpecError` when unknown.

    >>> parse_spec("tcp://10.0.0.5:8786")
    ('address', 'tcp://10.0.0.5:8786')
    >>> parse_spec("local")
    ('local', None)
    """
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
        f"unknown cluster spec {spec!r}: use local, threads, local-cuda, "
        "tcp://host:port or scheduler-file:PATH"
    )


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast, with one clear line, when nothing listens at a tcp address."""
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


def connect(
    spec: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    dashboard_address: str | None = None,
    **cluster_kwargs: Any,
) -> Client:
    """Return a :class:`distributed.Client` for ``spec`` (default ``engine.cluster.spec``).

    Local clusters are owned by the returned client: ``client.close()`` (or a ``with``
    block) shuts them down as well.

    Examples
    --------
    >>> with connect("threads", n_workers=1) as client:  # doctest: +SKIP
    ...     print(client.dashboard_link)
    """
    spec = config.get("cluster.spec", spec)
    kind, target = parse_spec(spec)
    timeout = dask.utils.parse_timedelta(config.get("cluster.connect-timeout"))

    if kind == "address":
        assert target is not None
        _check_reachable(target, timeout)
        try:
            return Client(target, timeout=timeout)
        except (OSError, TimeoutError) as err:
            raise ClusterError(f"cannot connect to the scheduler at {target}: {err}") from None
    if kind == "scheduler-file":
        assert target is not None
        if not os.path.exists(target):
            raise ClusterError(
                f"scheduler file not found: {target}; start the scheduler with "
                f"dask scheduler --scheduler-file {target}"
            )
        try:
            return Client(scheduler_file=target, timeout=timeout)
        except (OSError, TimeoutError) as err:
            raise ClusterError(f"cannot connect to the scheduler in {target}: {err}") from None

    n = config.get("cluster.n-workers", n_workers)
    threads = config.get("cluster.threads-per-worker", threads_per_worker)
    memory = config.get("cluster.memory-limit", memory_limit)
    dash = dashboard_address if dashboard_address is not None else dask.config.get(
        "engine.cluster.dashboard-address"
    )
    common: dict[str, Any] = {"threads_per_worker": threads, "memory_limit": memory}
    if dash is None:
        common["dashboard_address"] = None
    else:
        common["dashboard_address"] = dash
    common.update(cluster_kwargs)

    if kind == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise MissingExtraError(
                "cluster 'local-cuda' needs dask-cuda: install it with "
                "pip install 'cube-engine[gpu]'"
            ) from None
        try:
            cluster = LocalCUDACluster(n_workers=n, resources={"GPU": 1}, **common)
        except Exception as err:  # no GPU, no driver, NVML failure
            raise ClusterError(
                f"cannot start a dask-cuda cluster ({err}); it needs an NVIDIA GPU and driver, "
                "use --cluster local on a machine without one"
            ) from None
        return Client(cluster)

    processes = kind == "local"
    if not processes:
        n = 1 if n is None else n
        common["threads_per_worker"] = max(threads or 1, 1) if n_workers is None else threads
    cluster = LocalCluster(n_workers=n, processes=processes, **common)
    return Client(cluster)


def cluster_summary(client: Client) -> dict[str, Any]:
    """A small, printable description of what the client is connected to."""
    info = client.scheduler_info(n_workers=-1)
    workers = info.get("workers", {})
    return {
        "scheduler": info.get("address"),
        "dashboard": client.dashboard_link if client.dashboard_link else None,
        "n_workers": len(workers),
        "threads": sum(w.get("nthreads", 0) for w in workers.values()),
        "memory_limit_bytes": sum(w.get("memory_limit", 0) or 0 for w in workers.values()),
        "gpus": sum(1 for w in workers.values() if w.get("resources", {}).get("GPU")),
    }
