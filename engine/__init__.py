"""cube-engine (skeleton being assembled; exports are added as modules land)."""

from __future__ import annotations

from engine import config as _config  # noqa: F401  (registers engine.yaml defaults)
from engine._version import code_version

__version__ = code_version()
