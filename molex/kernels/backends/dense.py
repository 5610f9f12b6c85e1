"""Dense-stacked backend: two GEMMs over all experts, gates applied in between.

``h = x @ A_flat^T`` (``[T, E*r]``), multiply by the gate expanded over each expert's ``r``
columns, then ``h @ B_flat``. No sort, no host sync, a fixed graph (``torch.compile`` friendly).
Cost grows with ``E * r`` rather than ``k * r``: the right choice while ``E * r`` is small,
which is the common MoLE case (a few experts of rank 4-16). With a shared down-projection
(``A [1, r, in]``) the shrink is ``r`` wide and only the expansion is ``E r`` wide.
"""

from __future__ import annotations

from torch import Tensor

from molex.core.decision import RoutingDecision
from molex.kernels.cost import Workload
from molex.kernels.registry import Backend, register_backend


def dense_gate(decision: RoutingDecision, num_experts: int, scaling: float | Tensor) -> Tensor:
    """``[T, E]`` gate with per-expert scaling folded in."""
    gate = decision.to_dense(num_experts)
    if isinstance(scaling, Tensor):
        return gate * scaling.to(gate.dtype)
    return gate * scaling


def dense_delta(x: Tensor, A: Tensor, B: Tensor, decision: RoutingDecision, scaling: float | Tensor) -> Tensor:
    """Shapes: ``x [T, in]``, ``A [E, r, in]`` or shared ``[1, r, in]``, ``B [E, r, out]`` -> ``[T, out]``."""
    num_experts, rank, out_features = B.shape
    gate = dense_gate(decision, num_experts, scaling).to(x.dtype)
    if A.shape[0] == 1 and num_experts > 1:  # shared A: one r-wide shrink, gated copies for the E expansions
        hidden = (x @ A[0].t()).unsqueeze(1) * gate.unsqueeze(-1)  # [T, E, r]
    else:
        hidden = (x @ A.reshape(num_experts * rank, A.shape[-1]).t()).view(-1, num_experts, rank) * gate.unsqueeze(-1)
    return hidden.reshape(-1, num_experts * rank) @ B.reshape(num_experts * rank, out_features)


def dense_cost(w: Workload) -> float:
    """``2 T E r d`` FLOPs (``2 T r (in + E out)`` with a shared ``A``); ``T d + 2 T E r + E r d``
    elements; 5 ops, no sync."""
    if w.shared_a:
        flops = 2.0 * w.tokens * w.rank * (w.in_features + w.num_experts * w.out_features)
    else:
        flops = 2.0 * w.tokens * w.num_experts * w.rank * w.d
    elems = w.tokens * w.d + 2 * w.tokens * w.num_experts * w.rank + w.weights
    return w.hardware.seconds(flops, elems, 5, 0)


register_backend(
    Backend("dense", dense_delta, "two dense GEMMs over all experts, gate in between", cost=dense_cost, shared_a=True)
)
