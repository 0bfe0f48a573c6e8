"""Architecture registry: rebuild a model from ``(name, kwargs)`` plus a ``state_dict``.

Checkpoints saved as ``state_dict`` files hold weights only; the registry holds the code
that builds the module. :func:`engine.ml.predict.predict` ships the *factory* (by
reference when it is importable) with the weights, so a worker process can rebuild any
architecture that was registered in the client process.

Built-in architectures (:mod:`engine.ml.archs`) are registered on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from engine.errors import SpecError

__all__ = [
    "register_architecture",
    "build_architecture",
    "get_architecture",
    "list_architectures",
]

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}
_LOCK = threading.Lock()
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        import engine.ml.archs  # noqa: F401  (registers its architectures on import)


def register_architecture(name: str, factory: F | None = None, *,
                          overwrite: bool = False) -> Any:
    """Register ``factory(**kwargs) -> nn.Module`` under ``name``; usable as a decorator.

    Examples
    --------
    >>> from torch import nn
    >>> @register_architecture("doc_linear", overwrite=True)
    ... def doc_linear(n_in: int, n_out: int = 1) -> nn.Module:
    ...     return nn.Linear(n_in, n_out)
    >>> build_architecture("doc_linear", n_in=3).out_features
    1
    """
    def _register(f: F) -> F:
        if not callable(f):
            raise SpecError(f"architecture {name!r}: the factory must be callable")
        with _LOCK:
            if name in _REGISTRY and _REGISTRY[name] is not f and not overwrite:
                raise SpecError(f"architecture {name!r} is already registered: choose another "
                                "name or pass overwrite=True")
            _REGISTRY[name] = f
        return f

    return _register if factory is None else _register(factory)


def get_architecture(name: str) -> Factory:
    """The factory registered under ``name``."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown architecture {name!r}: use one of {list_architectures()} "
                        "or register it with engine.ml.registry.register_architecture") from None


def list_architectures() -> list[str]:
    """Registered architecture names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def build_architecture(name: str, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name`` with ``kwargs``.

    The module remembers ``(name, kwargs)`` in ``_engine_architecture`` so that
    :func:`engine.ml.predict.predict` can ship it as weights plus architecture.
    """
    module = get_architecture(name)(**kwargs)
    # object.__setattr__: plain metadata, not a submodule/parameter for nn.Module to track
    object.__setattr__(module, "_engine_architecture", (name, dict(kwargs)))
    return module
