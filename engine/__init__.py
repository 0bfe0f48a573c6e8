"""cube-engine: distributed machine learning on Earth-observation and climate data cubes.

Functions are the API. Everything here returns lazy xarray objects; the caller (or the
``cube-engine`` command line) decides when to compute. ``import engine`` never imports
torch: the torch-backed functions (``predict``, ``train_model``) load it on first use.
"""

from __future__ import annotations

from engine import config as _config  # noqa: F401  (registers engine.yaml defaults)
from engine._version import code_version
from engine.cluster import connect
from engine.errors import (
    CatalogError,
    ClusterError,
    CubeError,
    EngineError,
    SpecError,
    StoreError,
    StoreExistsError,
)
from engine.io.catalog import describe_entry, list_entries, open_cube
from engine.ops.splits import block_split, geo_kfold, random_split

__all__ = [
    # data access
    "open_cube",
    "list_entries",
    "describe_entry",
    # cluster
    "connect",
    # splits
    "block_split",
    "random_split",
    "geo_kfold",
    # errors
    "EngineError",
    "SpecError",
    "CatalogError",
    "CubeError",
    "ClusterError",
    "StoreError",
    "StoreExistsError",
    # misc
    "code_version",
]

__version__ = code_version()
