"""The expert op: ``mole_delta(x, A, B, decision, scaling)``, one function with several backends.

``delta[t] = sum_j w[t, j] * s_e * B_e^T (A_e x[t])`` with ``e = decision.indices[t, j]``,
``x [T, in]``, ``A [E, r, in]``, ``B [E, r, out]``, ``s`` a float or a ``[E]`` tensor of
per-expert scalings. A pool whose experts share one down-projection passes ``A [1, r, in]``
(``A_e = A_0`` for every ``e``): backends registered with ``shared_a=True`` exploit it (``dense``
runs one ``r``-wide shrink instead of an ``E r``-wide one), the others get ``A`` expanded to
``[E, r, in]`` (a view, no copy). Every backend computes this same function (tests hold them to a float64
loop); they differ only in speed:

* ``reference``: loop over experts (the baseline; never auto-selected);
* ``dense``: two GEMMs over all experts (best while ``E * r`` is small);
* ``per_seq``: per-sequence decisions, two ``bmm`` over each sequence's gathered experts;
* ``grouped``: sort slots by expert, grouped GEMMs (``grouped_mm`` on CUDA, a group loop elsewhere);
* ``triton``: the grouped algorithm with Triton kernels (CUDA; ``TRITON_INTERPRET=1`` on CPU);
* ``megablocks``: megablocks / grouped_gemm kernels (CUDA with ``pip install molex-lora[gpu]``).

Each backend is one module of ``molex/kernels/backends/`` that registers its function, cost
(:mod:`molex.kernels.cost`) and availability with :func:`register_backend`; :mod:`molex.kernels.select` only
compares costs.
"""

from __future__ import annotations

from torch import Tensor

from molex.core.decision import RoutingDecision

# every module of molex/kernels/backends/ registers one backend (function, cost and availability) on import
from molex.kernels import backends  # noqa: F401
from molex.kernels.registry import (
    Backend,
    available_backends,
    get_backend,
    register_backend,
    registered_backends,
)
from molex.kernels.select import ENV_VAR, estimate_cost, resolve_backend

__all__ = [
    "ENV_VAR",
    "Backend",
    "available_backends",
    "estimate_cost",
    "get_backend",
    "mole_delta",
    "register_backend",
    "registered_backends",
    "resolve_backend",
]


def mole_delta(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    decision: RoutingDecision,
    scaling: float | Tensor = 1.0,
    backend: str | None = "auto",
) -> Tensor:
    """The experts' contribution ``[T, out]`` for ``x [T, in]`` (see the module docstring).

    ``backend``: a name from :func:`available_backends`, or ``"auto"`` (then the environment
    variable ``MOLEX_KERNEL_BACKEND``, then the cost model in :mod:`molex.kernels.select`).
    """
    if x.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            f"mole_delta expects x [T, in], A [E, r, in], B [E, r, out]; got {tuple(x.shape)}, "
            f"{tuple(A.shape)}, {tuple(B.shape)}"
        )
    if A.shape[1] != B.shape[1] or A.shape[0] not in (1, B.shape[0]) or A.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} (A holds one factor per "
            "expert, or one shared by all)"
        )
    if decision.num_tokens != x.shape[0]:
        raise ValueError(f"routing decision covers {decision.num_tokens} tokens but x has {x.shape[0]}")
    name = resolve_backend(backend, x, A, B, decision)
    found = get_backend(name)
    if A.shape[0] != B.shape[0] and not found.shared_a:
        A = A.expand(B.shape[0], -1, -1)
    return found.fn(x, A, B, decision, scaling)
