"""House rules that a tool can check: import boundaries, README examples, shared fixtures.

* ``engine/`` never imports the checkout's ``benchmarks`` package (an installed engine
  has no such package).
* torch is imported only under ``engine/ml/``: every module, module-level and
  function-level imports, ``importlib.import_module`` and ``__import__`` with a literal.
* Every ```python block of README.md runs as written, as a script in a copy of the
  repository (under ``if __name__ == "__main__":``, as scripts that start worker
  processes need).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
#: README blocks that start a process cluster or train: seconds to a minute each
LONG_BLOCK = re.compile(r"connect\(|predict\(|write\(|cube-engine run|train")


def _modules() -> list[Path]:
    return sorted(p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, wherever it is in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield node.lineno, ".".join([*base, node.module or ""]).rstrip(".")
            else:
                yield node.lineno, node.module or ""
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                yield node.lineno, first.value


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def test_the_import_scan_sees_every_kind_of_import(tmp_path):
    source = textwrap.dedent("""
        import os, torch.nn as nn
        from benchmarks import _common
        def f():
            import torch
            from . import demo
            return __import__("torchvision"), importlib.import_module("benchmarks.x")
    """)
    fake = tmp_path / "engine" / "io" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    found = {m for _, m in _imports(fake, tmp_path)}
    assert found == {"os", "torch.nn", "benchmarks", "torch", "engine.io",
                     "torchvision", "benchmarks.x"}


def test_engine_never_imports_the_benchmarks_package():
    offenders = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in _modules()
                 for line, mod in _imports(p) if _top(mod) == "benchmarks"]
    assert not offenders, "engine/ imports benchmarks/:\n" + "\n".join(offenders)


def test_torch_is_imported_only_under_engine_ml():
    ml = ENGINE / "ml"
    offenders = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in _modules()
                 if ml not in p.parents for line, mod in _imports(p)
                 if _top(mod) in ("torch", "torchvision")]
    assert not offenders, "torch imported outside engine/ml/:\n" + "\n".join(offenders)


def test_import_engine_loads_no_torch():
    code = "import sys, engine; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ README examples


def _readme_blocks() -> list[tuple[int, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
        blocks.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


def _readme_params() -> list:
    params = []
    for line, code in _readme_blocks():
        # long ones (process clusters, training) get a longer pytest-timeout of their own
        marks = [pytest.mark.timeout(300)] if LONG_BLOCK.search(code) else []
        params.append(pytest.param(line, code, id=f"README.md:{line}", marks=marks))
    return params


def test_readme_has_python_examples():
    assert len(_readme_blocks()) >= 1


def _copy_checkout(dest: Path) -> Path:
    skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "runs",
                                  "*.egg-info", ".mypy_cache", ".ruff_cache", "results")
    shutil.copytree(ROOT, dest, ignore=skip)
    return dest


@pytest.mark.parametrize(("line", "code"), _readme_params())
def test_readme_python_block_runs(line, code, tmp_path):
    repo = _copy_checkout(tmp_path / "repo")
    script = repo / f"readme_block_{line}.py"
    script.write_text('if __name__ == "__main__":\n' + textwrap.indent(code, "    ")
                      + "    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run([sys.executable, script.name], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (
        f"README.md block at line {line} fails as written:\n{proc.stderr[-2500:]}"
    )


def test_no_compute_fixture_fails_a_compute(no_compute):
    import dask.array as da

    x = da.ones(4, chunks=2).sum()
    with no_compute(), pytest.raises(AssertionError, match="computed"):
        x.compute()
    assert int(x.compute()) == 4


def test_shared_cluster_fixtures_listen_on_loopback_only(request):
    for name in ("thread_client", "client"):
        client = request.getfixturevalue(name)
        info = client.scheduler_info()
        addresses = [info["address"], *info["workers"]]
        assert all(a.startswith(("tcp://127.0.0.1:", "inproc://")) for a in addresses), (
            name, addresses)
        assert len(info["workers"]) == 2


def _distributed_log_level() -> int:
    import logging

    return logging.getLogger("distributed.worker").getEffectiveLevel()


def test_distributed_logs_warnings_only_in_tests_and_workers(client):
    """No INFO lines from clusters, also not those closing after pytest's summary."""
    import logging

    assert _distributed_log_level() == logging.WARNING
    assert set(client.run(_distributed_log_level).values()) == {logging.WARNING}
