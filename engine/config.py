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

# Worker resources (predict's ``GPU`` annotation) live on high-level graph layers, and
# dask's low-level task fusion turns the optimised array graph into a plain dict, so the
# distributed scheduler never sees them: inference tasks then run on workers without a
# GPU, and a GPU worker takes any number at once. Blockwise fusion (which keeps
# annotations) still runs. A user's own setting of this key wins.
dask.config.update_defaults({"optimization": {"fuse": {"active": False}}})


def get(key: str, override: Any = None) -> Any:
    """Return ``engine.<key>`` from dask.config unless ``override`` is given."""
    if override is not None:
        return override
    return dask.config.get(f"engine.{key}")
