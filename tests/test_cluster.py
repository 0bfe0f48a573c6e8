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
        with pytest.raises(MissingExtraError, match=r"cube-engine\[gpu\]"):
            connect("local-cuda")
    else:  # pragma: no cover - only on GPU machines with the extra
        pytest.skip("dask-cuda installed")
