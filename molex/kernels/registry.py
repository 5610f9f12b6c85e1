"""Backend registry for the expert op. Each backend computes the same function (see ``mole_delta``).

A backend is one module that calls :func:`register_backend` with everything about it: the
function, its cost on a :class:`~molex.kernels.cost.Workload` and whether it can run here. Adding
a backend is adding such a module (and importing it in :mod:`molex.kernels`); the selector has no
list of backends.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from molex.core.decision import RoutingDecision
from molex.core.registry import Registry
from molex.kernels.cost import Workload

__all__ = [
    "Backend",
    "BackendFn",
    "CostFn",
    "auto_candidates",
    "available_backends",
    "find_backend",
    "get_backend",
    "installed",
    "register_backend",
    "registered_backends",
]

#: ``fn(x [T, in], A [E, r, in], B [E, r, out], decision, scaling) -> [T, out]``
BackendFn = Callable[[Tensor, Tensor, Tensor, RoutingDecision, "float | Tensor"], Tensor]
#: estimated seconds of one forward on a workload (``inf``: never chosen for it)
CostFn = Callable[[Workload], float]


def _never(workload: Workload) -> float:
    return math.inf


@dataclass(frozen=True)
class Backend:
    """One implementation of the expert op.

    ``cost``: its estimated time on a workload (see :mod:`molex.kernels.cost`); a backend without one
    runs only when asked for by name. ``auto``: whether the cost model may choose it (the reference
    loop is the correctness baseline, never an automatic choice). ``env_vars``: environment
    variables its availability depends on (the automatic candidates are cached per their values).
    ``shared_a``: ``fn`` accepts ``A [1, r, in]`` for a pool whose experts share one down-projection
    (otherwise it receives ``A`` expanded to ``[E, r, in]``).
    """

    name: str
    fn: BackendFn
    description: str
    is_available: Callable[[], bool] = lambda: True
    #: why the backend cannot run on this machine (shown when it is forced but unavailable)
    unavailable_reason: str = ""
    cost: CostFn = _never
    auto: bool = True
    env_vars: tuple[str, ...] = ()
    shared_a: bool = False


#: every backend by name; installed packages add theirs through the ``molex.kernels`` entry-point group
BACKENDS: Registry[Backend] = Registry("kernel backend", entry_point_group="molex.kernels")
_ENV_VARS: list[str] = []  # every backend's env_vars: the key of the candidate cache


@functools.cache
def installed(module: str) -> bool:
    """Whether ``module`` can be imported (cached: availability is asked at every layer call)."""
    return importlib.util.find_spec(module) is not None


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Make ``backend`` available by its name (``replace=True`` to replace a registered one of that name)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend takes a molex.kernels.Backend, got {type(backend).__name__}")
    BACKENDS.register(backend.name, backend, replace=replace)
    return backend


def _backends_changed() -> None:
    # a new backend (registered here or by a plug-in) becomes an automatic candidate, keyed on its env vars
    _ENV_VARS.extend(v for b in BACKENDS._entries.values() for v in b.env_vars if v not in _ENV_VARS)
    _auto_candidates.cache_clear()


def find_backend(name: str) -> Backend | None:
    """The registered backend ``name``, available here or not (``None`` if unknown)."""
    return BACKENDS.get(name)


def get_backend(name: str) -> Backend:
    """The backend ``name``; a clear error if it is unknown or cannot run here."""
    try:
        backend = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown kernel backend {name!r}; known backends: {', '.join(BACKENDS.names())} (or 'auto')"
        ) from None
    if not backend.is_available():
        raise RuntimeError(f"kernel backend {name!r} is not available here: {backend.unavailable_reason}")
    return backend


def registered_backends() -> list[str]:
    return sorted(BACKENDS)


def available_backends() -> list[str]:
    """Backends that can run on this machine."""
    return sorted(name for name, b in BACKENDS.items() if b.is_available())


BACKENDS.on_change(_backends_changed)


def auto_candidates() -> tuple[str, ...]:
    """Available backends the cost model may choose, sorted (the reference loop if there are none)."""
    return _auto_candidates(tuple(map(os.environ.get, _ENV_VARS)))  # called at every layer call: keep it lean


@functools.lru_cache(maxsize=8)
def _auto_candidates(environment: tuple[str | None, ...]) -> tuple[str, ...]:
    # availability only changes with the declared environment variables (the key) within a process
    return tuple(b for b in available_backends() if BACKENDS[b].auto) or ("reference",)
