"""Backend registry for the expert op. Each backend computes the same function (see ``mole_delta``)."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from molex.routers.base import RoutingDecision

#: ``fn(x [T, in], A [E, r, in], B [E, r, out], decision, scaling) -> [T, out]``
BackendFn = Callable[[Tensor, Tensor, Tensor, RoutingDecision, "float | Tensor"], Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: BackendFn
    description: str
    is_available: Callable[[], bool] = lambda: True
    #: why the backend cannot run on this machine (shown when it is forced but unavailable)
    unavailable_reason: str = ""


_BACKENDS: dict[str, Backend] = {}


@functools.cache
def installed(module: str) -> bool:
    """Whether ``module`` can be imported (cached: availability is asked at every layer call)."""
    return importlib.util.find_spec(module) is not None


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    from molex.kernels.select import _auto_candidates  # select imports this module

    _auto_candidates.cache_clear()  # a new backend becomes an automatic candidate
    return backend


def get_backend(name: str) -> Backend:
    try:
        backend = _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown kernel backend {name!r}; known backends: {', '.join(sorted(_BACKENDS))} (or 'auto')"
        ) from None
    if not backend.is_available():
        raise RuntimeError(f"kernel backend {name!r} is not available here: {backend.unavailable_reason}")
    return backend


def registered_backends() -> list[str]:
    return sorted(_BACKENDS)


def available_backends() -> list[str]:
    """Backends that can run on this machine."""
    return sorted(name for name, b in _BACKENDS.items() if b.is_available())
