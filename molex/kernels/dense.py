"""Dense-stacked backend: two GEMMs over all experts, gates applied in between.

``h = x @ A_flat^T`` (``[T, E*r]``), multiply by the gate expanded over each expert's ``r``
columns, then ``h @ B_flat``. No sort, no host sync, a fixed graph (``torch.compile`` friendly).
Cost grows with ``E * r`` rather than ``k * r``: the right choice while ``E * r`` is small,
which is the common MoLE case (a few experts of rank 4-16).
"""

from __future__ import annotations

from torch import Tensor

from molex.routers.base import RoutingDecision


def dense_gate(decision: RoutingDecision, num_experts: int, scaling: float | Tensor) -> Tensor:
    """``[T, E]`` gate with per-expert scaling folded in."""
    gate = decision.to_dense(num_experts)
    if isinstance(scaling, Tensor):
        return gate * scaling.to(gate.dtype)
    return gate * scaling


def dense_delta(x: Tensor, A: Tensor, B: Tensor, decision: RoutingDecision, scaling: float | Tensor) -> Tensor:
    """Shapes: ``x [T, in]``, ``A [E, r, in]``, ``B [E, r, out]`` -> ``[T, out]``."""
    num_experts, rank, in_features = A.shape
    gate = dense_gate(decision, num_experts, scaling).to(x.dtype)
    hidden = x @ A.reshape(num_experts * rank, in_features).t()
    hidden = (hidden.view(-1, num_experts, rank) * gate.unsqueeze(-1)).view(-1, num_experts * rank)
    return hidden @ B.reshape(num_experts * rank, B.shape[-1])
