"""Reference backend: loop over experts with index_select / index_add (the MoLA / MoE-PEFT way).

Plain and obviously right; it syncs with the host once per expert (``nonzero``), which is why
the fast backends exist.
"""

from __future__ import annotations

import torch
from torch import Tensor

from molex.routers.base import RoutingDecision


def scaled_weights(indices: Tensor, weights: Tensor, scaling: float | Tensor) -> Tensor:
    """``weights [rows, k]`` times the scaling of each chosen expert (``scaling`` float or ``[E]``)."""
    if isinstance(scaling, Tensor):
        return weights * scaling.to(weights.dtype)[indices]
    return weights * scaling


def expert_scaled_weights(decision: RoutingDecision, scaling: float | Tensor) -> tuple[Tensor, Tensor]:
    """Per-token ``indices [T, k]`` and ``weights [T, k]`` with each expert's scaling folded in."""
    indices = decision.token_indices()
    return indices, scaled_weights(indices, decision.token_weights(), scaling)


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
