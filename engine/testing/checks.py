"""Assertions shared by tests and benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dask

__all__ = ["raise_if_dask_computes", "CountingScheduler"]


class CountingScheduler:
    """A dask scheduler that counts computes and can refuse them (xarray's test pattern)."""

    def __init__(self, max_computes: int = 0) -> None:
        self.total_computes = 0
        self.max_computes = max_computes

    def __call__(self, dsk, keys, **kwargs):
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(
                f"Too many computes. Total: {self.total_computes} > max: {self.max_computes}."
            )
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0) -> Iterator[CountingScheduler]:
    """Fail if the block computes anything with dask more than ``max_computes`` times."""
    scheduler = CountingScheduler(max_computes)
    with dask.config.set(scheduler=scheduler):
        yield scheduler
