"""Dependencies point one way: import engine works without torch; only engine/ml imports it."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "engine"


def test_import_engine_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['cupy'] = None\n"
        "import engine, engine.ops.splits, engine.ops.stats, engine.io.catalog, engine.cluster\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _top_imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0], node


def test_only_ml_imports_torch_at_module_level():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("ml/"):
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; lazy imports inside functions are fine
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] == "torch" for n in names):
                offenders.append(rel)
    assert not offenders, offenders


def test_kernels_import_no_dask_xarray_torch():
    for path in (ROOT / "kernels").rglob("*.py"):
        for mod, _ in _top_imports(path):
            assert mod not in {"dask", "xarray", "torch", "distributed"}, (path, mod)
