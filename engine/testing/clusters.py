"""A small multi-process dask cluster for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["process_client"]


@contextmanager
def process_client(n_workers: int = 2) -> Iterator[Any]:
    """A ``LocalCluster`` of ``n_workers`` one-thread worker processes on 127.0.0.1 and
    its client, returned once every worker is up. The dashboard is on 127.0.0.1 too (dask
    binds ``":0"`` to every interface)."""
    import distributed

    with (
        distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                 dashboard_address="127.0.0.1:0", host="127.0.0.1") as cluster,
        distributed.Client(cluster) as client,
    ):
        client.wait_for_workers(n_workers, timeout=30)
        yield client
