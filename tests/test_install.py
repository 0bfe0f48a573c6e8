"""Installation: a CPU machine never gets a CUDA build, a GPU site gets one CUDA major.

The resolver tests ask pip itself (``pip install --dry-run --report``, nothing installed)
with this machine's pip configuration, so they see what ``make test`` would install on
a fresh venv. They skip, saying so, when the package registry cannot be reached.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKEFILE = os.path.join(ROOT, "Makefile")
NETWORK_FAILURE = re.compile(
    r"NameResolutionError|Failed to establish a new connection|Temporary failure in name "
    r"resolution|Read timed out|ConnectTimeoutError|suitable TLS CA certificate bundle|"
    r"SSLError|ProxyError"
)
CUDA_PACKAGE = re.compile(r"^(nvidia-.*|.*cuda.*|cupy.*|triton|pytorch-triton.*)$", re.I)


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _make_var(name: str) -> str:
    found = re.search(rf"^{name}\s*\??:?=\s*(\S+)\s*$", _read("Makefile"), re.M)
    assert found, f"Makefile defines no {name}"
    return found.group(1)


def _recipe(target: str) -> str:
    text = _read("Makefile")
    found = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n|[ \t]*#.*\n)+)", text, re.M)
    assert found, f"Makefile has no target {target}"
    return found.group(1)


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _registry_reachable() -> str | None:
    """None when pip can reach its index, else why not (one line)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", "setuptools",
             "--timeout", "10", "--retries", "0"],
            capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired:
        return "pip index versions setuptools took over 60 s"
    if proc.returncode != 0 or "setuptools" not in proc.stdout:
        return (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None


def _dry_run(*requirements: str, extra_args: tuple[str, ...] = ()) -> list[dict]:
    """What a fresh venv would install for ``requirements`` with constraints.txt."""
    why = _registry_reachable()
    if why is not None:
        pytest.skip(f"package registry unreachable, cannot resolve: {why}")
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
           "--quiet", "--report", "-", "--constraint", "constraints.txt",
           "--timeout", "15", "--retries", "1", *extra_args, *requirements]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    if proc.returncode != 0 and NETWORK_FAILURE.search(proc.stderr):
        pytest.skip("package registry unreachable while resolving: "
                    + NETWORK_FAILURE.search(proc.stderr).group(0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["install"]


def _names(items: list[dict]) -> dict[str, str]:
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}


# ------------------------------------------------------------------ what the files say


def test_torch_pin_is_one_version_everywhere():
    version = _make_var("TORCH_VERSION")
    assert re.search(rf"^torch=={re.escape(version)}$", _read("constraints.txt"), re.M)
    dockerfile = _read(os.path.join("deploy", "Dockerfile"))
    for pinned in re.findall(r"torch==([0-9.]+)", dockerfile):
        assert pinned == version, "deploy/Dockerfile pins another torch"


def test_cpu_install_can_only_take_a_cpu_build():
    recipe = _recipe("install-torch-cpu")
    tries = re.findall(r"\$\(PIP\)[^\n;|]*", recipe)
    assert len(tries) == 2, recipe
    # PyTorch's CPU index first, quickly given up; then pip's own sources; both "+cpu"
    assert "--index-url $(TORCH_CPU_INDEX)" in tries[0]
    assert "--timeout 5" in tries[0] and "--retries 0" in tries[0]
    for attempt in tries:
        assert "'torch==$(TORCH_VERSION)+cpu'" in attempt
    assert _make_var("TORCH_CPU_INDEX") == "https://download.pytorch.org/whl/cpu"
    for target in ("install", "install-test"):
        assert "install-torch-cpu" in re.search(rf"^{target}:(.*)$", _read("Makefile"),
                                                re.M).group(1)


def test_gpu_install_matches_one_cuda_major():
    recipe = _recipe("install-gpu")
    assert "--index-url $(TORCH_CUDA_INDEX)" in recipe
    assert "'torch==$(TORCH_VERSION)+$(TORCH_CUDA$(CUDA))'" in recipe
    assert "'.[gpu-cuda$(CUDA)]'" in recipe
    assert "12|13" in recipe, "other CUDA values are refused"
    assert re.fullmatch(r"cu12\d", _make_var("TORCH_CUDA12"))
    assert re.fullmatch(r"cu13\d", _make_var("TORCH_CUDA13"))
    extras = _pyproject()["project"]["optional-dependencies"]
    assert "gpu" not in extras, "one gpu extra cannot be right for both CUDA majors"
    for major, other in (("12", "13"), ("13", "12")):
        deps = " ".join(extras[f"gpu-cuda{major}"])
        assert f"cupy-cuda{major}x" in deps and f"dask-cuda[cu{major}]" in deps
        assert f"cuda{other}" not in deps and f"cu{other}" not in deps


def test_no_cuda_package_in_the_cpu_dependencies():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    cpu = project["dependencies"] + [d for k, v in extras.items()
                                     if not k.startswith("gpu") for d in v]
    names = [re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0] for d in cpu]
    assert not [n for n in names if CUDA_PACKAGE.match(n)]


def test_license_is_an_spdx_string_and_setuptools_supports_it():
    data = _pyproject()
    assert data["project"]["license"] == "Apache-2.0"
    [setuptools] = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.search(r">=(\d+)", setuptools).group(1)) >= 77


# ------------------------------------------------------------------ what pip resolves


@pytest.mark.timeout(600)
def test_make_test_set_resolves_to_cpu_torch_and_no_cuda():
    """``.[test,bench]`` with constraints.txt, as make test installs it after torch."""
    names = _names(_dry_run(".[test,bench]"))
    assert names["torch"] == f"{_make_var('TORCH_VERSION')}+cpu"
    assert not sorted(n for n in names if CUDA_PACKAGE.match(n))
    assert {"pytest", "ruff", "mypy", "h5netcdf", "moto"} <= set(names)


@pytest.mark.timeout(300)
def test_the_makefile_torch_step_resolves_to_the_cpu_build():
    """The first try of ``make install-torch-cpu``, verbatim options, resolved by pip."""
    version = _make_var("TORCH_VERSION")
    items = _dry_run(f"torch=={version}+cpu", extra_args=(
        "--index-url", _make_var("TORCH_CPU_INDEX"), "--timeout", "5", "--retries", "0"))
    names = _names(items)
    assert names["torch"] == f"{version}+cpu"
    assert not sorted(n for n in names if CUDA_PACKAGE.match(n))
