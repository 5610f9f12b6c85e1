"""Helpers shared by the expert-op backends: folding each expert's scaling into the routing weights."""

from __future__ import annotations

from torch import Tensor

from molex.core.decision import RoutingDecision

__all__ = ["expert_scaled_weights", "scaled_weights"]


def scaled_weights(indices: Tensor, weights: Tensor, scaling: float | Tensor) -> Tensor:
    """``weights [rows, k]`` times the scaling of each chosen expert (``scaling`` float or ``[E]``)."""
    if isinstance(scaling, Tensor):
        return weights * scaling.to(weights.dtype)[indices]
    return weights * scaling


def expert_scaled_weights(decision: RoutingDecision, scaling: float | Tensor) -> tuple[Tensor, Tensor]:
    """Per-token ``indices [T, k]`` and ``weights [T, k]`` with each expert's scaling folded in."""
    indices = decision.token_indices()
    return indices, scaled_weights(indices, decision.token_weights(), scaling)
