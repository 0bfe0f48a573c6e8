"""Cluster specs: parsing, local clusters, clear errors for unreachable schedulers."""

import socket

import pytest
from distributed import LocalCluster

from engine.cluster import cluster_summary, connect, parse_spec
from engine.errors import ClusterError, MissingExtraError, SpecError


def test_parse_spec():
    assert parse_spec("local") == ("local", None)
    assert parse_spec("threads") == ("threads", None)
    assert parse_spec("tcp://1.2.3.4:8786") == ("address", "tcp://1.2.3.4:8786")
    assert parse_spec("scheduler-file:/tmp/s.json") == ("scheduler-file", "/tmp/s.json")
    with pytest.raises(SpecError, match="unknown cluster spec"):
        parse_spec("kubernetes")


def test_threads_cluster():
    with connect("threads", n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        info = cluster_summary(client)
        assert info["n_workers"] == 1 and info["threads"] == 2
        assert client.submit(lambda x: x + 1, 1).result() == 2


def test_existing_scheduler_by_address_and_file(tmp_path):
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc:
        with connect(lc.scheduler_address) as client:
            assert client.submit(sum, [1, 2]).result() == 3
        sf = tmp_path / "scheduler.json"
        lc.scheduler.write_scheduler_file = None
        import json

        sf.write_text(json.dumps({"address": lc.scheduler_address, "type": "Scheduler"}))
        with connect(f"scheduler-file:{sf}") as client:
            assert client.submit(sum, [2, 2]).result() == 4


def test_unreachable_scheduler_is_one_clear_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ClusterError, match=f"cannot reach the scheduler at tcp://127.0.0.1:{port}"):
        connect(f"tcp://127.0.0.1:{port}")


def test_missing_scheduler_file(tmp_path):
    with pytest.raises(ClusterError, match="scheduler file not found"):
        connect(f"scheduler-file:{tmp_path}/none.json")


def test_local_cuda_without_gpu_names_the_extra():
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtraError, match=r"cube-engine\[gpu-cuda12\]"):
            connect("local-cuda")
    else:  # pragma: no cover - only on GPU machines with the extra
        pytest.skip("dask-cuda installed")


# -- local clusters listen on 127.0.0.1 only ----------------------------------------------

def _listening(pids):
    import psutil

    found = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:  # a short-lived helper process
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                found.append((pid, conn.laddr.ip, conn.laddr.port))
    return found


def test_local_cluster_listens_on_localhost_only():
    """Scheduler, nanny, worker and dashboard of connect('local') bind 127.0.0.1, and the
    printed dashboard link is where the dashboard listens."""
    import os

    import psutil

    me = os.getpid()
    before = {(ip, port) for _, ip, port in _listening([me])}
    with connect("local", n_workers=1, threads_per_worker=1) as client:
        client.wait_for_workers(1, timeout=30)
        workers = [p.pid for p in psutil.Process(me).children(recursive=True)]
        assert workers, "the worker runs in a child process"
        sockets = [s for s in _listening([me, *workers]) if (s[1], s[2]) not in before]
        ports = {port for _, _, port in sockets}
        info = cluster_summary(client)
        dash_port = client.cluster.scheduler.http_server.port
        assert info["dashboard"] == f"http://127.0.0.1:{dash_port}/status"
        assert dash_port in ports
        assert int(info["scheduler"].rsplit(":", 1)[1]) in ports
        assert any(pid != me for pid, _, _ in sockets), "worker sockets are checked too"
        assert {ip for _, ip, _ in sockets} == {"127.0.0.1"}, sockets
    # the client owns its cluster: closing it stops the worker processes too
    procs = []
    for pid in {pid for pid, _, _ in sockets if pid != me}:  # not the resource tracker
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(procs, timeout=15)
    assert not alive


def test_process_client_of_the_tests_listens_on_localhost_only():
    import os

    import psutil

    from engine.testing.clusters import process_client

    me = os.getpid()
    before = {(ip, port) for _, ip, port in _listening([me])}
    with process_client(1) as client:
        kids = [p.pid for p in psutil.Process(me).children(recursive=True)]
        sockets = [s for s in _listening([me, *kids]) if (s[1], s[2]) not in before]
        assert client.cluster.scheduler.http_server.port in {port for _, _, port in sockets}
        assert {ip for _, ip, _ in sockets} == {"127.0.0.1"}, sockets


def test_thread_client_of_the_tests_listens_on_localhost_only():
    import os

    from engine.testing.clusters import thread_client

    me = os.getpid()
    before = {(ip, port) for _, ip, port in _listening([me])}
    with thread_client(2, threads_per_worker=2) as client:
        opened = {(ip, port) for _, ip, port in _listening([me])} - before
        assert len(opened) == 3  # the scheduler's HTTP server and one per worker
        assert {ip for ip, _ in opened} == {"127.0.0.1"}, opened
        assert sum(w["nthreads"] for w in client.scheduler_info()["workers"].values()) == 4
        assert client.submit(sum, [1, 2]).result() == 3


def test_closing_the_client_closes_its_local_cluster():
    with connect("threads", n_workers=1) as client:
        cluster = client.cluster
        assert client.submit(sum, [1, 1]).result() == 2
    assert cluster.status.name == "closed"
    client = connect("threads", n_workers=1)
    client.close()
    assert client.cluster.status.name == "closed"


def test_threads_cluster_binds_localhost_only():
    """In-process clusters open only HTTP sockets (dashboard, worker /health): on 127.0.0.1,
    with the dashboard on or off."""
    import os

    import dask

    def listening():
        return {(ip, port) for _, ip, port in _listening([os.getpid()])}

    for address in (":0", 0, "0", None):
        before = listening()
        with dask.config.set({"engine.cluster.dashboard-address": address}):
            with connect("threads", n_workers=1) as client:
                server = client.cluster.scheduler.http_server
                opened = listening() - before
                assert {ip for ip, _ in opened} == {"127.0.0.1"}, (address, opened)
                assert ("127.0.0.1", server.port) in opened
                link = cluster_summary(client)["dashboard"]
                if address is None:
                    assert link is None
                else:
                    assert link == f"http://127.0.0.1:{server.port}/status"


def test_local_cuda_kwargs_bind_localhost_and_tls():
    """What LocalCUDACluster gets (no GPU here): loopback host, TLS when asked."""
    from distributed import Security

    from engine.cluster import local_cluster_kwargs

    plain = local_cluster_kwargs("local-cuda", n_workers=None, threads_per_worker=1,
                                 memory_limit="auto", dashboard_address="127.0.0.1:0",
                                 security=None)
    assert plain["host"] == "127.0.0.1" and plain["resources"] == {"GPU": 1}
    assert "protocol" not in plain and "processes" not in plain
    sec = Security.temporary()
    tls = local_cluster_kwargs("local-cuda", n_workers=2, threads_per_worker=1,
                               memory_limit=None, dashboard_address=None, security=sec)
    assert tls["protocol"] == "tls://" and tls["security"] is sec and tls["n_workers"] == 2


# -- bad sizes are one line, before anything starts ----------------------------------------

BAD_SIZES = [
    ({"n_workers": 0}, "n_workers must be a whole number of at least 1"),
    ({"n_workers": -1}, "n_workers must be a whole number of at least 1"),
    ({"n_workers": True}, "n_workers must be a whole number"),
    ({"threads_per_worker": 0}, "threads_per_worker must be a whole number of at least 1"),
    ({"memory_limit": "lots"}, "memory_limit must be a size, got 'lots'"),
    ({"memory_limit": "-1GB"}, "memory_limit must be a size of at least 0"),
    ({"memory_limit": "4"}, "memory_limit '4' is 4 B per worker, too little"),
    ({"memory_limit": "1e-9"}, "too little to run anything"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["local", "threads"])
@pytest.mark.parametrize(("kwargs", "message"), BAD_SIZES)
def test_bad_sizes_are_one_line_before_a_cluster_starts(kind, kwargs, message, monkeypatch):
    import time

    import distributed

    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr("engine.cluster.LocalCluster", no_cluster)
    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=message) as err:
        connect(kind, **kwargs)
    assert time.perf_counter() - t0 < 2
    assert "\n" not in str(err.value) and "e.g. " in str(err.value)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("n-workers", 0, r"engine.cluster.n-workers \(dask config\) must be a whole number.*"
                     r"DASK_ENGINE__CLUSTER__N_WORKERS=2"),
    ("n-workers", "four", "engine.cluster.n-workers"),
    ("threads-per-worker", -2, "DASK_ENGINE__CLUSTER__THREADS_PER_WORKER=1"),
    ("memory-limit", "lots", r"engine.cluster.memory-limit \(dask config\) must be a size"),
])
def test_bad_sizes_in_dask_config_name_the_key(key, value, message):
    import dask

    with dask.config.set({f"engine.cluster.{key}": value}):
        with pytest.raises(SpecError, match=message):
            connect("threads")


def test_good_sizes_pass_unchanged():
    from engine.cluster import check_cluster_options

    assert check_cluster_options("2", "3", "4GiB", source="cli") == (2, 3, "4GiB")
    assert check_cluster_options(None, None, None) == (None, None, None)
    for memory in ("auto", 0, "0", "0.5", 0.5, "1", 2**30, "512MiB", "1.5 GB"):
        assert check_cluster_options(memory_limit=memory)[2] == memory


def test_threads_cluster_memory_limit_fraction_is_applied():
    from distributed.system import MEMORY_LIMIT

    with connect("threads", n_workers=1, memory_limit="0.5", dashboard_address=None) as client:
        assert cluster_summary(client)["memory_limit_bytes"] == int(0.5 * MEMORY_LIMIT)


def _parse(argv):
    import argparse

    from engine._cli.cluster_args import add_cluster_arguments, connect_kwargs

    parser = argparse.ArgumentParser()
    add_cluster_arguments(parser)
    return connect_kwargs(parser.parse_args(argv))


@pytest.mark.parametrize(("argv", "message"), [
    (["--n-workers", "0"], r"^--n-workers must be .* got '0': e.g. --n-workers 2$"),
    (["--n-workers", "-1"], "--n-workers must be a whole number"),
    (["--n-workers", "two"], "--n-workers must be a whole number"),
    (["--threads-per-worker", "0"], r"--threads-per-worker .* e.g. --threads-per-worker 1"),
    (["--memory-limit", "lots"], r"^--memory-limit must be a size, got 'lots': e.g. "
                                 r"--memory-limit 4GiB"),
    (["--cluster", "kubernetes"], "unknown cluster spec 'kubernetes'"),
    (["--cluster", "tcp://10.0.0.5:8786", "--n-workers", "4"],
     "--n-workers applies to local clusters only"),
    (["--cluster", "scheduler-file:/s.json", "--tls"], "--tls applies to local clusters only"),
])
def test_cli_cluster_flags_are_checked_with_the_flag_named(argv, message):
    with pytest.raises(SpecError, match=message) as err:
        _parse(argv)
    assert "\n" not in str(err.value)


def test_cli_cluster_flags_become_connect_kwargs():
    assert _parse(["--cluster", "threads", "--n-workers", "2", "--threads-per-worker", "3",
                   "--memory-limit", "2GiB"]) == {
        "spec": "threads", "n_workers": 2, "threads_per_worker": 3, "memory_limit": "2GiB",
        "security": None, "tls": None}
    assert _parse([])["spec"] is None and _parse(["--tls"])["tls"] is True


def test_sizes_for_an_existing_scheduler_are_refused():
    with pytest.raises(SpecError, match="n_workers sizes local clusters only"):
        connect("tcp://127.0.0.1:8786", n_workers=4)


# -- addresses that are not our scheduler -------------------------------------------------

@pytest.fixture
def short_timeout():
    import dask

    with dask.config.set({"engine.cluster.connect-timeout": "1s"}):
        yield 1.0


@pytest.mark.timeout(60)
def test_silent_server_is_one_line_within_the_timeout(short_timeout):
    """A port that accepts and says nothing used to block distributed.Client forever."""
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        t0 = time.perf_counter()
        with pytest.raises(ClusterError, match=f"no dask scheduler answered at "
                                               f"tcp://127.0.0.1:{port} within 1s") as err:
            connect(f"tcp://127.0.0.1:{port}")
        assert time.perf_counter() - t0 < 8
        assert "\n" not in str(err.value)


@pytest.mark.timeout(60)
def test_http_server_is_not_a_scheduler(short_timeout):
    import http.server
    import threading

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ClusterError) as err:
            connect(f"tcp://127.0.0.1:{httpd.server_address[1]}")
        assert "\n" not in str(err.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_worker_address_is_not_a_scheduler():
    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0",
                      host="127.0.0.1", protocol="tcp://") as lc:
        worker = next(iter(lc.scheduler.workers))
        with pytest.raises(ClusterError, match=f"{worker} is a dask Worker, not a scheduler"):
            connect(worker)


def test_bad_scheduler_file(tmp_path):
    sf = tmp_path / "scheduler.json"
    sf.write_text("{not json")
    with pytest.raises(ClusterError, match="cannot read the scheduler file"):
        connect(f"scheduler-file:{sf}")
    sf.write_text('{"type": "Scheduler"}')
    with pytest.raises(ClusterError, match="has no scheduler address"):
        connect(f"scheduler-file:{sf}")


def test_plaintext_to_a_remote_host_warns(short_timeout):
    from engine.errors import EngineWarning

    with pytest.warns(EngineWarning, match="plaintext and unauthenticated"):
        with pytest.raises(ClusterError):
            connect("tcp://scheduler.invalid:8786")  # .invalid never resolves


@pytest.mark.timeout(60)
def test_server_sending_garbage_is_one_line(short_timeout):
    """A peer whose bytes read as a 64 PiB frame: no MemoryError traceback, one line."""
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    conns = []

    def answer():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conns.append(conn)
            conn.sendall(b"\xff" * 64)  # and keep the connection open

    threading.Thread(target=answer, daemon=True).start()
    try:
        with pytest.raises(ClusterError, match=f"tcp://127.0.0.1:{port}") as err:
            connect(f"tcp://127.0.0.1:{port}")
        assert "\n" not in str(err.value)
    finally:
        server.close()
        for conn in conns:
            conn.close()
