"""Regions written without a cluster: a thread pool in this process."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed

import dask

from engine.io.writer.tasks import Failures, RegionTask, region_data, write_region


def run_local(ds, tasks, retries, on_done) -> Failures:
    """Regions in a thread pool, each computed, written and retried on its own."""
    n = max(1, min(int(dask.config.get("num_workers", None) or os.cpu_count() or 1), len(tasks)))
    # fewer regions than threads: let each region use the threaded scheduler itself
    scheduler = "sync" if len(tasks) >= n > 1 else "threads"

    def attempt(task: RegionTask) -> dict:
        for i in range(retries + 1):
            try:
                return write_region(task, region_data(ds, task).compute(scheduler=scheduler))
            except Exception:
                if i == retries:
                    raise
        raise AssertionError("unreachable")

    failures: Failures = []
    with ThreadPoolExecutor(n, thread_name_prefix="engine-write") as pool:
        futures = {pool.submit(attempt, t): t for t in tasks}
        try:
            for fut in as_completed(futures):
                err = fut.exception()
                if err is None:
                    on_done(fut.result())
                else:
                    failures.append((futures[fut], err))
        finally:
            for fut in futures:
                fut.cancel()
    return failures
