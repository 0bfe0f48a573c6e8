"""cube-engine: distributed machine learning on Earth-observation and climate data cubes.

Functions are the API. Everything here returns lazy xarray objects; the caller (or the
``cube-engine`` command line) decides when to compute. ``import engine`` never imports
torch: the torch-backed ``engine.predict`` loads it on first use.
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
from engine.io.verify import verify
from engine.io.writer import write
from engine.ops.patches import iter_patches
from engine.ops.splits import block_split, geo_kfold, random_split

__all__ = [
    # data access
    "open_cube",
    "list_entries",
    "describe_entry",
    # cluster
    "connect",
    # the scale-out core
    "iter_patches",
    "predict",
    "write",
    "verify",
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


def __getattr__(name: str):
    # torch-backed functions load torch on first use, never on ``import engine``
    if name == "predict":
        from engine.ml.predict import predict

        return predict
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
