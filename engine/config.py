"""Engine defaults live in ``engine.yaml`` under the ``engine:`` key of ``dask.config``.

Users override them the way they override dask itself: ``~/.config/dask/*.yaml``,
``DASK_ENGINE__CLUSTER__N_WORKERS=4`` environment variables, or ``dask.config.set``.
Values are read when a function runs; keyword arguments always win.
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

__all__ = ["get", "defaults"]

_fn = os.path.join(os.path.dirname(__file__), "engine.yaml")

with open(_fn) as f:
    defaults: dict[str, Any] = yaml.safe_load(f)

dask.config.update_defaults(defaults)


def get(key: str, override: Any = None) -> Any:
    """Return ``engine.<key>`` from dask.config unless ``override`` is given."""
    if override is not None:
        return override
    return dask.config.get(f"engine.{key}")
