"""Reference backend: loop over experts with index_select / index_add (the MoLA / MoE-PEFT way).

Plain and obviously right; it syncs with the host once per expert (``nonzero``), which is why
the fast backends exist.
"""

from __future__ import annotations

import torch
from torch import Tensor

from molex.core.decision import RoutingDecision
from molex.kernels.common import expert_scaled_weights
from molex.kernels.cost import Workload
from molex.kernels.registry import Backend, register_backend


def reference_delta(x: Tensor, A: Tensor, B: Tensor, decision: RoutingDecision, scaling: float | Tensor) -> Tensor:
    """``delta[t] = sum_j w[t, j] * s_e * B_e^T A_e x[t]`` with ``e = indices[t, j]``.

    Shapes: ``x [T, in]``, ``A [E, r, in]``, ``B [E, r, out]`` -> ``[T, out]``.
    """
    indices, weights = expert_scaled_weights(decision, scaling)
    out = x.new_zeros(x.shape[0], B.shape[-1])
    for expert in range(A.shape[0]):
        token, slot = torch.nonzero(indices == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        contribution = (x.index_select(0, token) @ A[expert].t()) @ B[expert]
        contribution = contribution * weights[token, slot].unsqueeze(-1).to(contribution.dtype)
        out = out.index_add(0, token, contribution)
    return out


def reference_cost(w: Workload) -> float:
    """Active FLOPs; ``3 N d c + E r d`` elements; ``2 + 6 E`` ops and one sync per expert."""
    flops, elems = w.active_flops, 3 * w.slots * w.d * w.spill + w.weights
    return w.hardware.seconds(flops, elems, 2 + 6 * w.num_experts, w.num_experts)


register_backend(
    Backend(
        "reference",
        reference_delta,
        "loop over experts (index_select / index_add)",
        cost=reference_cost,
        auto=False,  # the correctness baseline, never an automatic choice
    )
)
