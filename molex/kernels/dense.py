"""Dense-stacked backend: two GEMMs over all experts, gates applied in between.

``h = x @ A_flat^T`` (``[T, E*r]``), multiply by the gate expanded over each expert's ``r``
columns, then ``h @ B_flat``. No sort, no host sync, a fixed graph (``torch.compile`` friendly).
Cost grows with ``E * r`` rather than ``k * r``: the right choice while ``E * r`` is small,
which is the common MoLE case (a few experts of rank 4-16).
"""

from __future__ import annotations

from torch import Tensor

from molex.decision import RoutingDecision
from molex.kernels.cost import Workload
from molex.kernels.registry import Backend, register_backend


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


def dense_cost(w: Workload) -> float:
    """``2 T E r d`` FLOPs; ``T d + 2 T E r + E r d`` elements; 5 ops, no sync."""
    flops = 2.0 * w.tokens * w.num_experts * w.rank * w.d
    elems = w.tokens * w.d + 2 * w.tokens * w.num_experts * w.rank + w.weights
    return w.hardware.seconds(flops, elems, 5, 0)


register_backend(
    Backend("dense", dense_delta, "two dense GEMMs over all experts, gate in between", cost=dense_cost)
)
