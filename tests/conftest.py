"""Fixtures shared by the test modules, and the suite's quiet logging.

Fixtures
--------
client        a 2-process LocalCluster on 127.0.0.1 and its client, per module; the
              workers start without AWS_* variables (credentials come only through
              storage_options)
threads_scheduler  dask's threaded scheduler for one test (modules use it through
              ``pytestmark = pytest.mark.usefixtures("threads_scheduler")``)
thread_client an in-process cluster of 2 one-thread workers and its client, per test
              (HTTP servers on 127.0.0.1)
s3            moto's S3 server on 127.0.0.1 with one empty bucket, per module
no_compute    a context manager under which any dask compute fails the test
demo_store    a private copy of the committed demo store, per test
run_cli       calls the command line's main and returns (exit code, stdout, stderr)
slurm         a real single-node SLURM for the ``slurm`` tier, per session (conftest_slurm.py)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator

import pytest
from conftest_slurm import slurm  # noqa: F401  (the slurm tier's session fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_STORE = os.path.join(ROOT, "catalogs", "data", "coads_climatology.zarr")

# distributed logs at INFO by default, also from clusters that close at interpreter exit,
# i.e. after pytest's summary; tests assert on results, not on these lines. The variable
# reaches worker processes, the logger level this process (distributed may be imported).
os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")
logging.getLogger("distributed").setLevel(logging.WARNING)


@contextlib.contextmanager
def _default_scheduler_restored() -> Iterator[None]:
    """A client sets itself as dask's default scheduler and, when closed, restores the
    value it found; clients of different fixture scopes close out of order (a per-module
    client outlives a per-test one), which would leave a closed client as the default for
    later tests. After each close, the default is the newest client still running, or
    none."""
    import dask
    from distributed.client import _current_client, _get_global_client

    try:
        yield
    finally:
        current = _current_client.get()
        if current is not None and current.status != "running":
            _current_client.set(None)  # a ``with client:`` left behind by fixture teardown
        c = _get_global_client()  # drops closed clients itself
        dask.config.set(scheduler="dask.distributed" if c is not None else None)


@pytest.fixture(scope="module")
def client() -> Iterator:
    from engine.testing.clusters import process_client

    with pytest.MonkeyPatch.context() as mp, _default_scheduler_restored():
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(name)  # workers inherit this environment: keep credentials out
        with process_client(2) as c:
            yield c


@pytest.fixture
def threads_scheduler() -> Iterator[None]:
    """dask's threaded scheduler for the test, whatever default another module left."""
    import dask

    with dask.config.set(scheduler="threads"):
        yield


@pytest.fixture
def thread_client() -> Iterator:
    from engine.testing.clusters import thread_client

    with _default_scheduler_restored(), thread_client(2) as c:
        yield c


@pytest.fixture(scope="module")
def s3() -> Iterator:
    from engine.testing.s3 import moto_s3

    with moto_s3() as server:
        yield server


@pytest.fixture
def no_compute() -> Callable[[], contextlib.AbstractContextManager]:
    """``with no_compute(): ...`` fails the test if anything inside computes with dask."""
    import dask

    def refuse(dsk, keys, **kwargs):
        raise AssertionError(f"dask computed {list(keys)[:3]} where nothing may compute")

    return lambda: dask.config.set(scheduler=refuse)


@pytest.fixture
def demo_store(tmp_path) -> str:
    """Path of a copy of ``catalogs/data/coads_climatology.zarr`` that a test may change."""
    dest = tmp_path / "input" / "coads_climatology.zarr"
    shutil.copytree(DEMO_STORE, dest)
    return str(dest)


@pytest.fixture
def run_cli(capsys) -> Callable[[list[str]], tuple[int, str, str]]:
    """``code, out, err = run_cli(["run", job, ...])`` through ``engine._cli.main.main``."""
    from engine._cli.main import main

    def run(args: list[str]) -> tuple[int, str, str]:
        code = main(args)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def small_landcover(tmp_path_factory) -> str:
    """Catalog path (entry ``small``) of the committed land-cover cube coarsened to 2 degrees
    (90 x 180 cells, chunks of a quarter per dim), made once: the patch kinds' end-to-end
    cube (tests/_segfixtures.py)."""
    from tests._segfixtures import small_catalog

    return small_catalog(tmp_path_factory.mktemp("landcover_small"))


@pytest.fixture
def refused(run_cli) -> Callable[[list[str], str], str]:
    """``refused(args, words)``: the command exits 2 with one line on stderr that holds
    ``words`` (the bad-input contract); returns that line."""

    def check(args: list[str], words: str) -> str:
        code, _, err = run_cli(args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and words in lines[0], err
        return lines[0]

    return check
