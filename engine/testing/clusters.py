"""Small dask clusters for tests and benchmarks, listening on 127.0.0.1 only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["process_client", "thread_client"]

# dask binds a dashboard address without a host (":0") to every interface
_DASHBOARD = "127.0.0.1:0"


@contextmanager
def process_client(n_workers: int = 2) -> Iterator[Any]:
    """A ``LocalCluster`` of ``n_workers`` one-thread worker processes on 127.0.0.1 and
    its client, returned once every worker is up. The dashboard is on 127.0.0.1 too."""
    import distributed

    with (
        distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                 dashboard_address=_DASHBOARD, host="127.0.0.1") as cluster,
        distributed.Client(cluster) as client,
    ):
        client.wait_for_workers(n_workers, timeout=30)
        yield client


@contextmanager
def thread_client(n_workers: int = 2, threads_per_worker: int = 1) -> Iterator[Any]:
    """An in-process cluster (``Client(processes=False)``) and its client.

    Its comms are in-process; its HTTP servers (dashboard, each worker's /health and
    /metrics) listen on 127.0.0.1, where ``Client(processes=False, dashboard_address=":0")``
    opens them on every interface.
    """
    import distributed

    with (
        distributed.LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                 processes=False, dashboard_address=_DASHBOARD,
                                 worker_dashboard_address=_DASHBOARD) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client
