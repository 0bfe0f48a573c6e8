"""engine.yaml and its schema stay in sync; values are overridable the dask way."""

import os
import subprocess
import sys

import dask.config
import yaml

import engine  # noqa: F401
from engine import config

HERE = os.path.dirname(engine.__file__)


def _keys(d, schema=False, prefix=""):
    out = set()
    items = d.get("properties", {}).items() if schema else d.items()
    for k, v in items:
        key = prefix + k
        if schema and v.get("type") == "object" or (not schema and isinstance(v, dict)):
            out |= _keys(v, schema, key + ".")
        else:
            out.add(key)
    return out


def test_defaults_match_schema():
    defaults = yaml.safe_load(open(os.path.join(HERE, "engine.yaml")))
    schema = yaml.safe_load(open(os.path.join(HERE, "engine-schema.yaml")))
    assert _keys(defaults) == _keys(schema, schema=True)


def test_keyword_wins_and_dask_config_overrides():
    assert config.get("cluster.n-workers") == dask.config.get("engine.cluster.n-workers")
    assert config.get("cluster.n-workers", 7) == 7
    with dask.config.set({"engine.cluster.n-workers": 5}):
        assert config.get("cluster.n-workers") == 5


def test_environment_variable_override():
    env = dict(os.environ, DASK_ENGINE__CLUSTER__N_WORKERS="3")
    code = "import engine.config as c; print(c.get('cluster.n-workers'))"
    out = subprocess.run([sys.executable, "-c", code],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "3"
