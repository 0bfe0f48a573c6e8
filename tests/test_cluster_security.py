"""TLS clusters: who gets in, who is refused, and in one line; TLS local clusters; deploy files."""

import argparse
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import dask
import pytest
import yaml
from distributed import LocalCluster, Security

from engine._cli.cluster_args import add_cluster_arguments, connect_kwargs
from engine.cluster import cluster_summary, connect
from engine.errors import ClusterError, SpecError
from engine.security import tls_security
from engine.testing.tls import write_tls_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls")
    return {"cluster": write_tls_files(base / "cluster", "cluster"),
            "stranger": write_tls_files(base / "stranger", "stranger")}


@pytest.fixture(scope="module")
def tls_cluster(certs):
    """A scheduler and one worker that speak TLS only, on 127.0.0.1."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
                      host="127.0.0.1", security=certs["cluster"].security(),
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster


@pytest.fixture
def short_timeout():
    with dask.config.set({"engine.cluster.connect-timeout": "2s"}):
        yield


def _clients(cluster):
    return set(cluster.scheduler.clients) - {"fire-and-forget"}


def _files(tls):
    return str(tls.ca_file), str(tls.cert_file), str(tls.key_file)


def test_client_with_the_cluster_certificate_computes(certs, tls_cluster):
    address = tls_cluster.scheduler_address
    assert address.startswith("tls://127.0.0.1:")
    with connect(address, security=tls_security(*_files(certs["cluster"]))) as client:
        assert client.submit(lambda x: x * 7, 6).result() == 42
        assert cluster_summary(client)["tls"] is True


def test_certificates_from_dask_config(certs, tls_cluster):
    ca, cert, key = _files(certs["cluster"])
    with dask.config.set({"distributed.comm.tls.ca-file": ca,
                          "distributed.comm.tls.client.cert": cert,
                          "distributed.comm.tls.client.key": key}):
        with connect(tls_cluster.scheduler_address) as client:
            assert client.submit(sum, [20, 22]).result() == 42


def test_certificates_from_dask_config_with_home_paths(certs, tls_cluster, monkeypatch):
    """dask does not expand ~ in its TLS paths; connect does."""
    home = certs["cluster"].ca_file.parent
    monkeypatch.setenv("HOME", str(home))
    with dask.config.set({"distributed.comm.tls.ca-file": "~/cluster-ca.pem",
                          "distributed.comm.tls.client.cert": "~/cluster-cert.pem",
                          "distributed.comm.tls.client.key": "~/cluster-key.pem"}):
        with connect(tls_cluster.scheduler_address) as client:
            assert client.submit(sum, [2, 3]).result() == 5


def test_cli_flags_give_the_security(certs, tls_cluster):
    parser = argparse.ArgumentParser()
    add_cluster_arguments(parser)
    ca, cert, key = _files(certs["cluster"])
    kwargs = connect_kwargs(parser.parse_args([
        "--cluster", tls_cluster.scheduler_address, "--tls-ca", ca, "--tls-cert", cert,
        "--tls-key", key]))
    assert isinstance(kwargs["security"], Security)
    with connect(**kwargs) as client:
        assert client.submit(sum, [1, 2]).result() == 3


def test_client_without_a_certificate_is_one_line(tls_cluster):
    before = _clients(tls_cluster)
    with pytest.raises(ClusterError, match="speaks TLS and this client has no certificate: "
                                           "give the cluster's CA and a client certificate "
                                           "with --tls-ca") as err:
        connect(tls_cluster.scheduler_address)
    assert "\n" not in str(err.value)
    assert _clients(tls_cluster) == before


def test_scheduler_refuses_a_tls_connection_without_a_client_certificate(certs, tls_cluster):
    """Not only our client refuses to try: the scheduler itself demands a certificate."""
    host, port = tls_cluster.scheduler_address.split("://")[1].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(certs["cluster"].ca_file))
    ctx.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw) as tls:
                # TLS 1.3: the server's verdict on the client arrives after the handshake
                tls.sendall(b"\0" * 16)
                if not tls.recv(1):
                    raise ConnectionError("closed by the scheduler")


@pytest.mark.parametrize("who", ["stranger", "stranger-with-cluster-ca"])
def test_client_with_a_foreign_certificate_is_refused(certs, tls_cluster, short_timeout, who):
    ca, cert, key = _files(certs["stranger"])
    if who == "stranger-with-cluster-ca":  # trusts the scheduler, but the scheduler not it
        ca = str(certs["cluster"].ca_file)
        expected = "did not accept this client's certificate"
    else:
        expected = "certificate that the given CA did not sign"
    before = _clients(tls_cluster)
    with pytest.raises(ClusterError, match=expected) as err:
        connect(tls_cluster.scheduler_address, security=tls_security(ca, cert, key))
    assert "\n" not in str(err.value)
    assert _clients(tls_cluster) == before


def test_plain_tcp_to_a_tls_scheduler_is_one_line(tls_cluster, short_timeout):
    address = tls_cluster.scheduler_address.replace("tls://", "tcp://")
    with pytest.raises(ClusterError, match=f"the server at {address} closed the connection.*"
                                           "connect with tls://") as err:
        connect(address)
    assert "\n" not in str(err.value)


def test_tls_to_a_plain_scheduler_is_one_line(certs, short_timeout):
    with LocalCluster(n_workers=1, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as plain:
        address = plain.scheduler_address.replace("tcp://", "tls://")
        with pytest.raises(ClusterError, match=f"TLS handshake with {address} failed") as err:
            connect(address, security=certs["cluster"].security())
        assert "\n" not in str(err.value)


def test_tls_spec_with_nothing_listening_is_one_line(certs):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ClusterError, match=f"cannot reach the scheduler at tls://127.0.0.1:{port}"):
        connect(f"tls://127.0.0.1:{port}", security=certs["cluster"].security())


def test_required_encryption_refuses_plain_tcp(tls_cluster):
    with dask.config.set({"distributed.comm.require-encryption": True}):
        with pytest.raises(ClusterError, match="is plaintext but encryption is required"):
            connect(tls_cluster.scheduler_address.replace("tls://", "tcp://"))


@pytest.mark.parametrize("how", ["keyword", "config"])
def test_local_threads_cluster_with_temporary_certificates(how):
    ctx = dask.config.set({"engine.cluster.tls": True}) if how == "config" else dask.config.set({})
    with ctx, connect("threads", n_workers=1, tls=True if how == "keyword" else None) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert client.submit(sum, [3, 4]).result() == 7
        # a client without the cluster's certificates cannot join it
        with pytest.raises(ClusterError, match="no certificate"):
            connect(address)
        with pytest.raises(ClusterError, match="closed the connection"):
            connect(address.replace("tls://", "tcp://"))


@pytest.mark.timeout(120)
def test_local_process_cluster_with_temporary_certificates():
    """Worker processes get the in-memory certificates and join over TLS."""
    with connect("local", n_workers=1, threads_per_worker=1, tls=True) as client:
        client.wait_for_workers(1, timeout=60)
        info = cluster_summary(client)
        assert info["scheduler"].startswith("tls://127.0.0.1:") and info["n_workers"] == 1
        workers = client.scheduler_info()["workers"]
        assert all(w.startswith("tls://127.0.0.1:") for w in workers)
        assert client.submit(sum, [5, 6]).result() == 11


def test_local_cluster_with_given_certificate_files(certs):
    with connect("threads", n_workers=1, security=tls_security(*_files(certs["cluster"]))) as c:
        assert c.scheduler.address.startswith("tls://127.0.0.1:")
        assert c.submit(sum, [1, 1]).result() == 2


def test_local_cluster_needs_certificates_for_every_role(certs):
    with pytest.raises(SpecError, match="certificates for every role"):
        connect("threads", security=Security(tls_ca_file=str(certs["cluster"].ca_file),
                                              tls_client_cert=str(certs["cluster"].cert_file)))


def test_tls_true_for_an_existing_scheduler_is_refused():
    with pytest.raises(SpecError, match="tls=True starts a local TLS cluster"):
        connect("tls://127.0.0.1:8786", tls=True)


# -- certificate files are checked with the flag named --------------------------------------

def test_tls_files_are_checked(certs, tmp_path):
    ca, cert, key = _files(certs["cluster"])
    with pytest.raises(SpecError, match=r"^--tls-ca .*nope.pem: file not found"):
        tls_security(str(tmp_path / "nope.pem"), cert, key)
    (tmp_path / "text.pem").write_text("hello")
    with pytest.raises(SpecError, match="--tls-cert .*text.pem: not a PEM file"):
        tls_security(ca, str(tmp_path / "text.pem"), key)
    with pytest.raises(SpecError, match="the key does not belong to the certificate"):
        tls_security(ca, cert, str(certs["stranger"].key_file))
    with pytest.raises(SpecError, match="give the key with --tls-key"):
        tls_security(ca, cert)
    both = tmp_path / "cert-and-key.pem"
    both.write_bytes(Path(cert).read_bytes() + Path(key).read_bytes())
    assert tls_security(ca, str(both)).tls_client_key is None  # key inside the cert file


@pytest.mark.parametrize(("argv", "message"), [
    (["--tls-ca", "ca.pem"], "--tls-cert is missing"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "--tls-ca is missing"),
    (["--tls-ca", "/nonexistent/ca.pem", "--tls-cert", "c.pem"],
     "--tls-ca /nonexistent/ca.pem: file not found"),
])
def test_cli_tls_flags_are_checked(argv, message):
    parser = argparse.ArgumentParser()
    add_cluster_arguments(parser)
    with pytest.raises(SpecError, match=message):
        connect_kwargs(parser.parse_args(argv))


def test_partial_tls_config_is_one_line(certs):
    with dask.config.set({"distributed.comm.tls.ca-file": str(certs["cluster"].ca_file)}):
        with pytest.raises(SpecError, match="not distributed.comm.tls.client.cert"):
            connect("tls://127.0.0.1:8786")
    with dask.config.set({"distributed.comm.tls.ca-file": "/nonexistent/ca.pem",
                          "distributed.comm.tls.client.cert": str(certs["cluster"].cert_file)}):
        with pytest.raises(SpecError, match="distributed.comm.tls.ca-file /nonexistent/ca.pem: "
                                            "file not found"):
            connect("tls://127.0.0.1:8786")


# -- deploy recipes ---------------------------------------------------------------------------

def test_kubernetes_manifests_use_tls():
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/daskcluster.yaml").read_text()))
    docs = [d for d in docs if d]
    assert {d["kind"] for d in docs} >= {"DaskCluster", "DaskWorkerGroup"}
    pods = []
    for d in docs:
        spec = d["spec"]
        if d["kind"] == "DaskCluster":
            pods += [("scheduler", spec["scheduler"]["spec"]), ("worker", spec["worker"]["spec"])]
        elif d["kind"] == "DaskWorkerGroup":
            pods.append(("worker", spec["worker"]["spec"]))
    for role, pod in pods:
        secrets = [v for v in pod.get("volumes", []) if "secret" in v]
        assert secrets, f"{role} mounts no certificate Secret"
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for name in ("DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
                         f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__CERT",
                         f"DASK_DISTRIBUTED__COMM__TLS__{role.upper()}__KEY"):
                assert env.get(name, "").startswith("/"), (role, name)
            assert yaml.safe_load(env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"]) is True
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert any(env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"].startswith(m + "/")
                       for m in mounts), (role, mounts)
            args = [str(a) for a in container["args"]]
            if role == "scheduler":
                assert args[args.index("--protocol") + 1] == "tls"
            else:  # the operator's DASK_SCHEDULER_ADDRESS is tcp://: the argument must win
                assert args[0] == "tls://cube-engine-scheduler:8786"


def test_slurm_recipes_use_tls(certs, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurm_cluster",
                                                  ROOT / "deploy/slurm/cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importable without dask-jobqueue
    ca, cert, key = _files(certs["cluster"])
    args = module.parse_args(["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key])
    kwargs = module.cluster_kwargs(args)
    assert kwargs["protocol"] == "tls://"
    assert kwargs["security"].tls_ca_file == ca and kwargs["security"].require_encryption
    with pytest.raises(SystemExit):
        module.parse_args([])  # the certificates are required

    sbatch = (ROOT / "deploy/slurm/run.sbatch").read_text()
    assert subprocess.run(["bash", "-n"], input=sbatch, text=True).returncode == 0
    commands = [line.strip() for line in sbatch.splitlines()
                if line.strip().startswith(("dask ", "srun dask", "cube-engine"))]
    assert len(commands) >= 3
    for command in commands:
        flags = ("--tls-ca-file", "--tls-cert", "--tls-key") if "dask" in command.split()[:2] \
            else ("--tls-ca", "--tls-cert", "--tls-key")
        assert all(f in command for f in flags), command
    assert "--protocol tls" in sbatch


def test_deploy_readme_documents_tls():
    text = (ROOT / "deploy/README.md").read_text()
    assert "## TLS" in text and "--tls-ca" in text and "kubectl create secret" in text


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command")
def test_make_certs_script_gives_a_working_tls_cluster(tmp_path):
    """deploy/make-certs.sh: cluster certificate for scheduler and worker, client certificate
    for cube-engine; a certificate from elsewhere is refused."""
    out = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "deploy/make-certs.sh"), str(out), "scheduler.example"],
                   check=True, capture_output=True)
    for key in ("ca-key.pem", "cluster-key.pem", "client-key.pem"):
        assert (out / key).stat().st_mode & 0o077 == 0, f"{key} is readable by others"
    cluster = Security(require_encryption=True, tls_ca_file=str(out / "ca.pem"),
                       tls_scheduler_cert=str(out / "cluster.pem"),
                       tls_scheduler_key=str(out / "cluster-key.pem"),
                       tls_worker_cert=str(out / "cluster.pem"),
                       tls_worker_key=str(out / "cluster-key.pem"),
                       tls_client_cert=str(out / "cluster.pem"),
                       tls_client_key=str(out / "cluster-key.pem"))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
                      host="127.0.0.1", security=cluster, dashboard_address="127.0.0.1:0") as lc:
        client_files = (str(out / "ca.pem"), str(out / "client.pem"), str(out / "client-key.pem"))
        with connect(lc.scheduler_address, security=tls_security(*client_files)) as client:
            assert client.submit(sum, [40, 2]).result() == 42
        other = write_tls_files(tmp_path / "other", "other")
        with dask.config.set({"engine.cluster.connect-timeout": "2s"}):
            with pytest.raises(ClusterError, match="did not accept this client's certificate"):
                connect(lc.scheduler_address,
                        security=tls_security(str(out / "ca.pem"), str(other.cert_file),
                                              str(other.key_file)))
