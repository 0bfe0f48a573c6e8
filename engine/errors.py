"""Errors are API: one root, specific errors also subclass the matching builtin.

Every message says what is wrong and what to do next. The CLI prints the message of an
:class:`EngineError` as one line and exits with code 2.
"""

from __future__ import annotations

__all__ = [
    "EngineError",
    "EngineWarning",
    "SpecError",
    "CatalogError",
    "CubeError",
    "ClusterError",
    "StoreError",
    "StoreExistsError",
    "ResumeError",
    "MissingExtraError",
    "RegionFailedError",
    "TrainingError",
]


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class EngineWarning(UserWarning):
    """Warnings the engine emits (turned into errors in the test suite)."""


class SpecError(EngineError, ValueError):
    """A job spec or a function argument is invalid (names the field)."""


class CatalogError(EngineError, LookupError):
    """A catalog file is missing or unreadable, or an entry does not exist."""


class CubeError(EngineError, KeyError):
    """A variable or dimension asked for is not in the cube."""

    def __str__(self) -> str:  # KeyError quotes its message; we want one plain line
        return str(self.args[0]) if self.args else ""


class ClusterError(EngineError, ConnectionError):
    """A cluster could not be started or reached."""


class StoreError(EngineError, OSError):
    """An output store cannot be written as asked."""


class StoreExistsError(StoreError, FileExistsError):
    """The output store exists with different content."""


class ResumeError(StoreError):
    """A store cannot be resumed (its fingerprint or layout differs)."""


class MissingExtraError(EngineError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class RegionFailedError(EngineError, RuntimeError):
    """A region of an output store failed to compute or write every time it was tried."""


class TrainingError(EngineError, FloatingPointError):
    """Training cannot go on: its loss is not a finite number (NaN inputs or targets, or
    a diverging run)."""


def require(module: str, extra: str):
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{module} is not installed: install it with pip install 'cube-engine[{extra}]'"
        ) from err
