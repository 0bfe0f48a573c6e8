"""Kubernetes manifests (``cube-engine deploy k8s``) and the images they name.

Every generated manifest and every file under deploy/kubernetes/ is validated against the
CRD schemas that ship in the dask-kubernetes wheel (``.../helm/.../crds/*.yaml``, pinned in
the test extra), strictly: an unknown field fails, as ``kubectl apply`` (server-side field
validation) refuses it. ConfigMaps get a structural check and their job file is parsed by
the engine's spec parser. The operator's own pod builders (from the same wheel) check the
wiring: every ``$(VAR)`` a container uses is set, the Service selects the scheduler.
Nothing here needs a cluster or the network.

Golden files: tests/golden/k8s/*.yaml. After an intended change of the output, rewrite
them with ``ENGINE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_deploy_k8s.py``
and review the diff.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import pathlib
import re
import socket
import subprocess
import threading
import tomllib

import dask
import jsonschema
import pytest
import yaml

from engine.deploy import k8s
from engine.deploy.wait import main as wait_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "k8s"
SHIPPED = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
UPDATE = os.environ.get("ENGINE_UPDATE_GOLDEN") == "1"

# a job whose data and store an operator's pods can reach: catalog in the image, store on S3
JOB = {
    "name": "gapfill-coads-mlp",
    "kind": "gapfill",
    "input": {"catalog": "../catalogs/demo.yaml", "entry": "coads_climatology"},
    "target": "SST",
    "features": ["AIRT", "SPEH", "WSPD", "SLP"],
    "mask": "ocean_mask",
    "model": {"kind": "mlp", "hidden": [64, 64]},
    "train": {"epochs": 60, "batch_size": 512},
    "output": {"url": "s3://climate/gapfill-coads-mlp/filled.zarr",
               "storage_options": {"endpoint_url": "https://s3.example.org"}},
    "seed": 0,
}
# flags of each generated case; the golden file of a case is GOLDEN/<case>.yaml
CASES = {
    "cpu": [],
    "gpu": ["--workers", "1", "--gpus", "2"],
    "secret": ["--secret", "s3-credentials"],
    "namespace": ["--namespace", "climate", "--workers", "4"],
    "all": ["--gpus", "3", "--job-gpu", "--secret", "s3-credentials", "--namespace", "climate",
            "--image", "registry.example.org:5000/acme/cube-engine:0.1.0",
            "--gpu-image", "registry.example.org:5000/acme/cube-engine:0.1.0-cuda12"],
}
NAME = "gapfill-coads-mlp"


# --- schemas ----------------------------------------------------------------------------

_META_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": _META_NAME},
        "namespace": {"type": "string", "maxLength": 63,
                      "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _closed(schema):
    """``schema`` with every object that lists its properties closed to others (what
    strict field validation does), and apiVersion/kind/metadata at the top."""
    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and \
                    not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                close(v)
        elif isinstance(node, list):
            for v in node:
                close(v)

    out = copy.deepcopy(schema)
    close(out)
    out["properties"] = {**out["properties"], "apiVersion": {"type": "string"},
                         "kind": {"type": "string"}, "metadata": METADATA}
    out["required"] = sorted({*out.get("required", []), "apiVersion", "kind", "metadata"})
    return out


@pytest.fixture(scope="module")
def crds():
    """``{(apiVersion, kind): validator}`` from the CRDs inside the dask-kubernetes wheel."""
    try:
        files = importlib.metadata.files("dask-kubernetes") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("dask-kubernetes is not installed: pip install -e '.[test]' (it pins the "
                    "wheel whose CRDs these tests read)")
    out = {}
    for f in files:
        if re.search(r"/helm/.*/crds/[^/]+\.yaml$", str(f)):
            crd = yaml.safe_load(f.read_text())
            for v in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])
                schema = _closed(v["schema"]["openAPIV3Schema"])
                jsonschema.Draft7Validator.check_schema(schema)
                out[key] = jsonschema.Draft7Validator(schema)
    return out


def _obj(properties, required=()):
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = _obj({"matchLabels": _STR_MAP})
# the parts of the core API's own schema (Kubernetes OpenAPI) that the manifests use
CORE = {
    ("v1", "ConfigMap"): _obj({
        "apiVersion": {"const": "v1"}, "kind": {"const": "ConfigMap"}, "metadata": METADATA,
        "data": {"type": "object", "additionalProperties": {"type": "string"},
                 "propertyNames": {"pattern": r"^[-._a-zA-Z0-9]+$"}},
    }, ["apiVersion", "kind", "metadata"]),
    ("networking.k8s.io/v1", "NetworkPolicy"): _obj({
        "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"},
        "metadata": METADATA,
        "spec": _obj({
            "podSelector": _SELECTOR,
            "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": _obj({
                "from": {"type": "array", "items": _obj(
                    {"podSelector": _SELECTOR, "namespaceSelector": _SELECTOR})},
                "ports": {"type": "array", "items": _obj(
                    {"protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                     "port": {"type": ["integer", "string"]}})},
            })},
        }, ["podSelector"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
}


def validation_errors(doc, crds):
    """Every way ``doc`` fails its schema, as ``path: message`` lines."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    validator = crds.get(key) or (jsonschema.Draft7Validator(CORE[key]) if key in CORE
                                  else None)
    assert validator is not None, f"no CRD for {doc.get('apiVersion')} {doc.get('kind')}"
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


# --- helpers ----------------------------------------------------------------------------

def _job_file(tmp_path, data=None, name="job.yaml"):
    jobs = tmp_path / "jobs"
    jobs.mkdir(exist_ok=True)
    path = jobs / name
    path.write_text(yaml.safe_dump(data if data is not None else JOB, sort_keys=False))
    return path


def _deploy(run_cli, tmp_path, flags, data=None):
    out = tmp_path / "k8s"
    code, stdout, err = run_cli(["deploy", "k8s", str(_job_file(tmp_path, data)),
                                 "--output", str(out), *flags])
    assert code == 0, err
    path = out / f"{NAME}.yaml"
    return path.read_text(), stdout, err


def _docs(text):
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _by_kind(docs):
    return {d["kind"]: d for d in docs}


# --- manifests validate -----------------------------------------------------------------

def test_the_wheel_ships_the_operator_crds(crds):
    assert {k for _, k in crds} >= {"DaskJob", "DaskCluster", "DaskWorkerGroup"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_manifests_validate(case, crds, run_cli, tmp_path):
    text, _, _ = _deploy(run_cli, tmp_path, CASES[case])
    docs = _docs(text)
    kinds = [d["kind"] for d in docs]
    gpus = "--gpus" in CASES[case]
    assert kinds == ["ConfigMap", "NetworkPolicy", "DaskJob"] + (
        ["DaskWorkerGroup"] if gpus else [])
    for doc in docs:
        assert validation_errors(doc, crds) == [], doc["kind"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_manifests_validate(path, crds):
    docs = _docs(path.read_text())
    assert docs
    for doc in docs:
        assert validation_errors(doc, crds) == [], doc["kind"]


def test_validation_catches_what_kubectl_refuses(crds):
    """The validator is not vacuous: the bug the shipped file had (an integer quantity)
    and a misspelt field both fail."""
    docs, _ = k8s.job_manifests(str(ROOT / "jobs" / "gapfill.yaml"),
                                ["output.url=s3://b/x.zarr"], gpus=1)
    by = _by_kind(docs)
    wg = copy.deepcopy(by["DaskWorkerGroup"])
    wg["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1
    assert validation_errors(wg, crds) == [
        "spec.worker.spec.containers.0.resources.limits.nvidia.com/gpu: "
        "1 is not of type 'string'"]
    job = copy.deepcopy(by["DaskJob"])
    job["spec"]["cluster"]["spec"]["worker"]["replica"] = 2
    assert any("'replica' was unexpected" in e for e in validation_errors(job, crds))
    job = copy.deepcopy(by["DaskJob"])
    del job["spec"]["job"]
    assert any("'job' is a required property" in e for e in validation_errors(job, crds))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case, run_cli, tmp_path):
    text, _, _ = _deploy(run_cli, tmp_path, CASES[case])
    golden = GOLDEN / f"{case}.yaml"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: ENGINE_UPDATE_GOLDEN=1 writes it"
    assert text == golden.read_text(), (
        f"output differs from {golden}; if intended, regenerate with ENGINE_UPDATE_GOLDEN=1")


# --- what the manifests do --------------------------------------------------------------

def _expand(text, env):
    """Kubernetes' $(VAR) expansion; an unset variable stays as it is."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


def _container_env(container, namespace):
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = _expand(e["value"], env)
        elif e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace":
            env[e["name"]] = namespace
    return env


def test_what_the_operator_derives_validates(crds, run_cli, tmp_path):
    """The DaskCluster and default DaskWorkerGroup that the operator makes of the DaskJob
    (with its own builders) validate against their CRDs too."""
    from dask_kubernetes.operator.controller.controller import (
        build_cluster_spec,
        build_default_worker_group_spec,
    )

    text, _, _ = _deploy(run_cli, tmp_path, CASES["all"])
    cluster = _by_kind(_docs(text))["DaskJob"]["spec"]["cluster"]["spec"]
    derived = [build_cluster_spec(NAME, cluster["worker"], cluster["scheduler"], {}, {}),
               build_default_worker_group_spec(NAME, cluster["worker"], {}, {})]
    assert [d["kind"] for d in derived] == ["DaskCluster", "DaskWorkerGroup"]
    for doc in derived:
        assert validation_errors(doc, crds) == [], doc["kind"]


def test_operator_wiring(run_cli, tmp_path):
    """Built into pods by the operator's own code: the job pod runs cube-engine run on the
    mounted job file against the scheduler address the operator sets; the init container
    waits for that same address; workers get it too; the Service selects the scheduler."""
    from dask_kubernetes.operator.controller.controller import (
        build_job_pod_spec,
        build_scheduler_deployment_spec,
        build_worker_deployment_spec,
    )

    text, _, _ = _deploy(run_cli, tmp_path, CASES["all"])
    by = _by_kind(_docs(text))
    job, wg = by["DaskJob"], by["DaskWorkerGroup"]
    ns = job["metadata"]["namespace"]
    pod = build_job_pod_spec(NAME, NAME, ns, job["spec"]["job"]["spec"], {}, {})["spec"]
    (runner,) = pod["containers"]
    env = _container_env(runner, ns)
    address = env["DASK_SCHEDULER_ADDRESS"]
    assert address == f"tcp://{NAME}-scheduler.{ns}.svc.cluster.local:8786"
    mount = runner["volumeMounts"][0]["mountPath"]
    assert [_expand(a, env) for a in runner["args"]] == ["run", mount, "--cluster", address]
    assert runner["command"] == ["cube-engine"]
    assert mount == f"{k8s.WORKDIR}/jobs/{NAME}.yaml"
    assert pod["volumes"][0]["configMap"]["name"] == by["ConfigMap"]["metadata"]["name"]
    assert runner["volumeMounts"][0]["subPath"] in by["ConfigMap"]["data"]
    (init,) = pod["initContainers"]
    assert _container_env(init, ns)["DASK_SCHEDULER_ADDRESS"] == address
    assert init["command"][:3] == ["python", "-m", "engine.deploy.wait"]

    for group, spec in ((f"{NAME}-default", job["spec"]["cluster"]["spec"]["worker"]),
                        (wg["metadata"]["name"], wg["spec"]["worker"])):
        dep = build_worker_deployment_spec(group, ns, NAME, "0123456789", spec["spec"], {}, {})
        for c in dep["spec"]["template"]["spec"]["containers"]:
            wenv = _container_env(c, ns)
            args = [_expand(a, wenv) for a in c["args"]]
            assert args[:3] == [address, "--name", f"{group}-worker-0123456789"], args
    sched = build_scheduler_deployment_spec(NAME, job["spec"]["cluster"]["spec"]["scheduler"]
                                            ["spec"], {}, {})
    labels = sched["spec"]["template"]["metadata"]["labels"]
    selector = job["spec"]["cluster"]["spec"]["scheduler"]["service"]["selector"]
    assert selector.items() <= labels.items()
    assert wg["spec"]["cluster"] == NAME  # the DaskJob's cluster is named after the job

    # the NetworkPolicy selects every pod of this cluster and admits them and the operator
    policy = by["NetworkPolicy"]["spec"]
    pods = [labels,
            build_job_pod_spec(NAME, NAME, ns, job["spec"]["job"]["spec"], {}, {})["metadata"]
            ["labels"],
            *(build_worker_deployment_spec(g, ns, NAME, "0123456789", {"containers": []}, {},
                                           {})["spec"]["template"]["metadata"]["labels"]
              for g in (f"{NAME}-default", wg["metadata"]["name"]))]
    for pod_labels in pods:
        assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
        assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items() \
            <= pod_labels.items()
    assert policy["ingress"][0]["from"][1] == {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "dask-operator"}}}
    assert build_job_pod_spec(NAME, "other", ns, {"containers": []}, {}, {})["metadata"][
        "labels"]["dask.org/cluster-name"] not in policy["podSelector"]["matchLabels"].values()


def test_gpu_workers(run_cli, tmp_path):
    with dask.config.set({"engine.cluster.gpu-threads-per-worker": 3}):
        text, _, _ = _deploy(run_cli, tmp_path, ["--workers", "5", "--gpus", "2"])
    by = _by_kind(_docs(text))
    assert by["DaskJob"]["spec"]["cluster"]["spec"]["worker"]["replicas"] == 5
    worker = by["DaskWorkerGroup"]["spec"]["worker"]
    assert worker["replicas"] == 2
    (c,) = worker["spec"]["containers"]
    assert c["command"] == ["dask", "cuda", "worker"]
    assert c["image"] == k8s.GPU_IMAGE
    args = " ".join(c["args"])
    assert "--nthreads 3 " in args and "--resources GPU=1 " in args
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cpu = by["DaskJob"]["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]
    assert cpu["command"] == ["dask", "worker"] and "--resources" not in cpu["args"]
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    pod = by["DaskJob"]["spec"]["job"]["spec"]
    assert "nvidia.com/gpu" not in str(pod) and pod["containers"][0]["image"] == k8s.CPU_IMAGE


def test_job_gpu_trains_on_a_gpu(run_cli, tmp_path):
    """Training runs in the job pod: --job-gpu gives it one GPU and the GPU image."""
    text, _, _ = _deploy(run_cli, tmp_path, ["--job-gpu"])
    assert "&id" not in text and "*id" not in text  # no YAML aliases for shared objects
    pod = _by_kind(_docs(text))["DaskJob"]["spec"]["job"]["spec"]
    (job,) = pod["containers"]
    assert job["image"] == pod["initContainers"][0]["image"] == k8s.GPU_IMAGE
    assert job["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]


def test_configmap_holds_the_job_as_checked(run_cli, tmp_path):
    from engine.pipelines.spec import parse_spec

    text, _, _ = _deploy(run_cli, tmp_path, ["--set", "train.epochs=7"])
    cm = _by_kind(_docs(text))["ConfigMap"]
    shipped = yaml.safe_load(cm["data"]["job.yaml"])
    assert shipped == {**JOB, "train": {**JOB["train"], "epochs": 7}}
    assert parse_spec(shipped).train.epochs == 7


def test_images_are_the_dockerfiles(run_cli, tmp_path):
    text, _, _ = _deploy(run_cli, tmp_path, ["--gpus", "1"])
    images = set(re.findall(r"^\s*image: (\S+)$", text, re.M))
    assert images == {k8s.CPU_IMAGE, k8s.GPU_IMAGE} == set(k8s.DOCKERFILES)
    assert k8s.CPU_IMAGE == f"cube-engine:{importlib.metadata.version('cube-engine')}"
    shipped = {m for p in SHIPPED for m in re.findall(r"image: (\S+)", p.read_text())}
    assert shipped == set(k8s.DOCKERFILES)
    # deploy/README.md builds exactly these tags from these Dockerfiles
    readme = (ROOT / "deploy" / "README.md").read_text()
    built = set(re.findall(r"docker build -f (deploy/Dockerfile(?:\.gpu)?) -t (\S+) \.", readme))
    assert {(f, t) for t, f in k8s.DOCKERFILES.items()} <= built


# --- credentials ------------------------------------------------------------------------

SECRETS = ("AKIAEXAMPLEKEY12345", "wJalrXUtnFEMIexampleSECRETvalue", "Bearer tok-98765")


def _with_credentials():
    job = copy.deepcopy(JOB)
    job["input"]["storage_options"] = {"key": SECRETS[0], "secret": SECRETS[1], "anon": False}
    job["output"]["storage_options"] = {
        "endpoint_url": "https://s3.example.org",
        "client_kwargs": {"region_name": "eu-west-1", "headers": {"Authorization": SECRETS[2]}}}
    return job


def test_credentials_never_inline(run_cli, tmp_path):
    text, out, err = _deploy(run_cli, tmp_path, ["--secret", "s3-credentials", "--gpus", "1"],
                             data=_with_credentials())
    for s in SECRETS:
        assert s not in text + out + err
    by = _by_kind(_docs(text))
    shipped = yaml.safe_load(by["ConfigMap"]["data"]["job.yaml"])
    assert shipped["input"]["storage_options"] == {"anon": False}
    assert shipped["output"]["storage_options"] == {
        "endpoint_url": "https://s3.example.org", "client_kwargs": {"region_name": "eu-west-1"}}
    assert "input.storage_options.key" in err and "input.storage_options.secret" in err
    # every pod that reads or writes data gets the Secret; the scheduler does not
    spec = by["DaskJob"]["spec"]
    pods = [spec["job"]["spec"]["containers"][0],
            spec["cluster"]["spec"]["worker"]["spec"]["containers"][0],
            by["DaskWorkerGroup"]["spec"]["worker"]["spec"]["containers"][0]]
    for c in pods:
        assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert "envFrom" not in spec["cluster"]["spec"]["scheduler"]["spec"]["containers"][0]


def test_credentials_without_secret_are_refused(run_cli, tmp_path):
    job = _job_file(tmp_path, _with_credentials())
    out = tmp_path / "k8s"
    code, stdout, err = run_cli(["deploy", "k8s", str(job), "--output", str(out)])
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "--secret" in err and "input.storage_options.key" in err
    assert not any(s in stdout + err for s in SECRETS)


def test_token_in_a_url_is_refused(run_cli, tmp_path):
    job = copy.deepcopy(JOB)
    job["output"]["url"] = "s3://climate/out.zarr?X-Amz-Signature=feedbeef0123"
    path = _job_file(tmp_path, job)
    out = tmp_path / "k8s"
    code, stdout, err = run_cli(["deploy", "k8s", str(path), "--output", str(out),
                                 "--secret", "s3-credentials"])
    assert code == 2 and not out.exists()
    assert "output.url" in err and "feedbeef0123" not in stdout + err


# --- bad input: one line, exit 2, nothing written ----------------------------------------

BAD = {
    "negative workers": (["--workers", "-1"], "--workers must be a whole number in [0,"),
    "workers not a number": (["--workers", "two"], "--workers must be a whole number, got"),
    "negative gpus": (["--gpus", "-2"], "--gpus must be a whole number in [0,"),
    "no workers at all": (["--workers", "0"], "leave the cluster without workers"),
    "image with spaces": (["--image", "cube engine:1"], "--image 'cube engine:1' is not an"),
    "gpu image uppercase": (["--gpu-image", "Cube-Engine:1"], "--gpu-image 'Cube-Engine:1'"),
    "bad namespace": (["--namespace", "Climate_NS"], "--namespace 'Climate_NS' is not a"),
    "bad secret": (["--secret", "s3 creds"], "--secret 's3 creds' is not a"),
    "bad operator namespace": (["--operator-namespace", "Dask_Operator"],
                               "--operator-namespace 'Dask_Operator' is not a"),
    "bad override": (["--set", "train.epochs=ten"], "train.epochs must be an integer"),
    "local store": (["--set", "output.url=runs/x.zarr"], "output.url runs/x.zarr is a path"),
    "catalog not in image": (["--set", "input.catalog=../../demo.yaml"],
                             "outside the image's catalogs/ folder"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case, run_cli, tmp_path):
    flags, message = BAD[case]
    job = _job_file(tmp_path)
    out = tmp_path / "k8s"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, stdout, err = run_cli(["deploy", "k8s", str(job), "--output", str(out), *flags])
    assert code == 2, err
    assert err.startswith("cube-engine: error: ") and err.count("\n") == 1, err
    assert message in err
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_bad_job_file_is_one_line(run_cli, tmp_path):
    job = copy.deepcopy(JOB)
    job["train"]["epocs"] = 3
    path = _job_file(tmp_path, job)
    code, _, err = run_cli(["deploy", "k8s", str(path), "--output", str(tmp_path / "k8s")])
    assert code == 2 and err.count("\n") == 1
    assert "unknown key train.epocs (did you mean 'epochs'?)" in err
    assert not (tmp_path / "k8s").exists()
    code, _, err = run_cli(["deploy", "k8s", str(tmp_path / "nope.yaml")])
    assert code == 2 and "job file not found" in err and err.count("\n") == 1


def test_output_that_is_a_file(run_cli, tmp_path):
    target = tmp_path / "manifests"
    target.write_text("keep me\n")
    code, _, err = run_cli(["deploy", "k8s", str(_job_file(tmp_path)), "--output", str(target)])
    assert code == 2 and "is a file, not a folder" in err and err.count("\n") == 1
    assert target.read_text() == "keep me\n"


def test_only_own_files_are_replaced(run_cli, tmp_path):
    out = tmp_path / "k8s"
    first, _, _ = _deploy(run_cli, tmp_path, [])
    second, _, _ = _deploy(run_cli, tmp_path, ["--gpus", "1"])  # regenerating replaces it
    assert first != second and (out / f"{NAME}.yaml").read_text() == second
    (out / f"{NAME}.yaml").write_text("apiVersion: v1\nkind: Secret\n")
    code, _, err = run_cli(["deploy", "k8s", str(_job_file(tmp_path)), "--output", str(out)])
    assert code == 2 and "was not written by cube-engine deploy k8s" in err
    assert (out / f"{NAME}.yaml").read_text() == "apiVersion: v1\nkind: Secret\n"
    assert sorted(p.name for p in out.iterdir()) == [f"{NAME}.yaml"]  # no temporary left


@pytest.mark.parametrize("job_name", ["gapfill-coads-mlp", "ERA5_t850.v2", "2019-runs",
                                      "x" * 128, "a.b_c-d" * 20])
def test_object_names_are_what_the_operator_accepts(job_name):
    from dask_kubernetes.constants import VALID_CLUSTER_NAME

    name = k8s.k8s_name(job_name)
    assert VALID_CLUSTER_NAME.match(name) and name[0].isalpha()
    assert len(f"{name}-default") <= 63  # the operator's default worker group, a label


# --- the init container -------------------------------------------------------------------

def test_wait_returns_when_the_scheduler_listens(capsys):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        # listen only after the first refused try: the wait must retry, not give up
        timer = threading.Timer(0.3, srv.listen)
        timer.start()
        try:
            code = wait_main(["--address", f"tcp://127.0.0.1:{port}", "--timeout", "10",
                              "--interval", "0.1"])
        finally:
            timer.join()
    assert code == 0 and "answers" in capsys.readouterr().out


def test_wait_gives_up_with_one_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        code = wait_main(["--address", f"tcp://127.0.0.1:{port}", "--timeout", "0.3",
                          "--interval", "0.1"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and f"no scheduler at tcp://127.0.0.1:{port}" in err


# --- the images -------------------------------------------------------------------------

def _dockerfile(name):
    """(instructions as (KEYWORD, text) with continuation lines joined, ARG defaults)."""
    text = (ROOT / "deploy" / name).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instr = [tuple(ln.strip().split(None, 1)) for ln in joined.splitlines() if ln.strip()]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", joined, re.M))
    return instr, args


def _pins():
    """What the project pins, each from its one place."""
    makefile = (ROOT / "Makefile").read_text()
    constraints = (ROOT / "constraints.txt").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch,) = re.findall(r"^torch==(\S+)$", constraints, re.M)
    make = dict(re.findall(r"^(TORCH_\w+) [:?]?= (\S+)$", makefile, re.M))
    return torch, make, pyproject


def _pip_calls(run, env=None):
    """The ``pip`` command lines a Dockerfile RUN executes, with its shell variables
    expanded by a real shell in the repository (pip replaced by an echo)."""
    script = "pip() { printf 'PIP'; printf ' %s' \"$@\"; printf '\\n'; }\n" + run
    out = subprocess.run(["sh", "-ec", script], cwd=ROOT, env={"PATH": os.environ["PATH"],
                         **(env or {})}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [ln.split()[1:] for ln in out.stdout.splitlines() if ln.startswith("PIP ")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_installs_the_pins(name):
    torch, make, pyproject = _pins()
    assert make["TORCH_VERSION"] == torch  # the Makefile and constraints.txt agree
    instr, args = _dockerfile(name)
    runs = [text for kw, text in instr if kw == "RUN" and "pip install" in text]
    # no version literal in a RUN: every version comes from constraints.txt or the Makefile
    for run in (text for kw, text in instr if kw == "RUN"):
        assert not re.search(r"\d+\.\d+", run), run
    copied = " ".join(text for kw, text in instr if kw == "COPY")
    for f in ("constraints.txt", "Makefile", "pyproject.toml", "engine", "catalogs", "jobs"):
        assert f in copied.split(), f
    assert ("WORKDIR", k8s.WORKDIR) in instr
    assert instr[-1] == ("ENTRYPOINT", '["cube-engine"]')
    assert "cube-engine" in pyproject["project"]["scripts"]
    extras = set(pyproject["project"]["optional-dependencies"])
    majors = ["12", "13"] if name.endswith(".gpu") else [None]
    for cuda in majors:
        calls = [c for run in runs for c in _pip_calls(run, {"CUDA": cuda} if cuda else None)]
        torch_call, pkg_call = calls
        if cuda is None:
            want_torch = f"torch=={torch}+cpu"
            index = make["TORCH_CPU_INDEX"]
        else:
            want_torch = f"torch=={torch}+{make[f'TORCH_CUDA{cuda}']}"
            index = make["TORCH_CUDA_INDEX"].replace("$(TORCH_CUDA$(CUDA))",
                                                     make[f"TORCH_CUDA{cuda}"])
        assert torch_call == ["install", "--index-url", index, want_torch]
        assert pkg_call[:3] == ["install", "--constraint", "constraints.txt"]
        (target,) = pkg_call[3:]
        m = re.fullmatch(r"\.\[([\w,-]+)\]", target)
        assert m, target
        wanted = set(m[1].split(","))
        assert wanted <= extras
        if cuda:
            assert f"gpu-cuda{cuda}" in wanted


def test_base_images_match_the_pins():
    _, _, pyproject = _pins()
    instr, _ = _dockerfile("Dockerfile")
    (base,) = [t for kw, t in instr if kw == "FROM"]
    m = re.fullmatch(r"python:(\d+)\.(\d+)-slim", base)
    assert m, base
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", pyproject["project"]["requires-python"])
    assert (m[1], m[2]) == (minimum[1], minimum[2])  # the oldest Python the project supports
    instr, args = _dockerfile("Dockerfile.gpu")
    assert ("FROM", "${CUDA_IMAGE}") in instr
    assert args["CUDA"] == str(k8s.GPU_CUDA)
    assert re.fullmatch(rf"nvidia/cuda:{k8s.GPU_CUDA}\.\d+\.\d+-(cudnn-)?runtime-\S+",
                        args["CUDA_IMAGE"])
    assert k8s.GPU_IMAGE.endswith(f"-cuda{k8s.GPU_CUDA}")
