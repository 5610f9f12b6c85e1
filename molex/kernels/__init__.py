"""The expert op: ``mole_delta(x, A, B, decision, scaling)``, one function with several backends.

``delta[t] = sum_j w[t, j] * s_e * B_e^T (A_e x[t])`` with ``e = decision.indices[t, j]``,
``x [T, in]``, ``A [E, r, in]``, ``B [E, r, out]``, ``s`` a float or a ``[E]`` tensor of
per-expert scalings. Every backend computes this same function (tests hold them to a float64
loop); they differ only in speed:

* ``reference``: loop over experts (the baseline; never auto-selected);
* ``dense``: two GEMMs over all experts (best while ``E * r`` is small);
* ``per_seq``: per-sequence decisions, two ``bmm`` over each sequence's gathered experts;
* ``grouped``: sort slots by expert, grouped GEMMs (``grouped_mm`` on CUDA, a group loop elsewhere);
* ``triton``: the grouped algorithm with Triton kernels (CUDA; ``TRITON_INTERPRET=1`` on CPU);
* ``megablocks``: megablocks / grouped_gemm kernels (CUDA with ``pip install molex[gpu]``).
"""

from __future__ import annotations

from torch import Tensor

from molex.kernels import megablocks as _megablocks
from molex.kernels import triton_grouped as _triton
from molex.kernels.dense import dense_delta
from molex.kernels.grouped import grouped_delta
from molex.kernels.per_seq import per_seq_delta
from molex.kernels.reference import reference_delta
from molex.kernels.registry import (
    Backend,
    available_backends,
    get_backend,
    register_backend,
    registered_backends,
)
from molex.kernels.select import ENV_VAR, estimate_cost, resolve_backend
from molex.routers.base import RoutingDecision

register_backend(Backend("reference", reference_delta, "loop over experts (index_select / index_add)"))
register_backend(Backend("dense", dense_delta, "two dense GEMMs over all experts, gate in between"))
register_backend(Backend("per_seq", per_seq_delta, "per-sequence routing: gather each sequence's experts, two bmm"))
register_backend(Backend("grouped", grouped_delta, "sort slots by expert once, grouped GEMM shrink and expand"))
register_backend(
    Backend(
        "triton",
        _triton.triton_delta,
        "Triton grouped shrink/expand kernels reading token rows in place, with backward kernels",
        is_available=_triton.is_available,
        unavailable_reason=_triton.unavailable_reason(),
    )
)
register_backend(
    Backend(
        "megablocks",
        _megablocks.megablocks_delta,
        "megablocks gather/scatter + grouped_gemm gmm (CUDA, the gpu extra)",
        is_available=_megablocks.is_available,
        unavailable_reason=_megablocks.unavailable_reason(),
    )
)

__all__ = [
    "mole_delta",
    "Backend",
    "available_backends",
    "registered_backends",
    "register_backend",
    "get_backend",
    "resolve_backend",
    "estimate_cost",
    "ENV_VAR",
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
    if A.shape[:2] != B.shape[:2] or A.shape[-1] != x.shape[-1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    if decision.num_tokens != x.shape[0]:
        raise ValueError(f"routing decision covers {decision.num_tokens} tokens but x has {x.shape[0]}")
    name = resolve_backend(backend, x, A, B, decision)
    return get_backend(name).fn(x, A, B, decision, scaling)
