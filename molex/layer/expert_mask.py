"""Routing under an expert mask: the decision a router makes when some of its experts do not exist.

:func:`apply_expert_mask` is what :class:`~molex.layer.linear.MoLELinear` calls on each decision while a
mask is set (:func:`molex.mask_experts`); it sees only the decision and the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from molex.core.decision import RoutingDecision

__all__ = ["apply_expert_mask"]


def apply_expert_mask(decision: RoutingDecision, mask: Tensor, router_name: str) -> RoutingDecision:
    """The decision the router would make without the experts in ``mask [E]``.

    From the router's distribution ``probs [rows, E]``: masked experts get 0, the rest are
    renormalised, then the same number of experts is kept (top-k) and, when the router's kept
    weights summed to one, renormalised again: for a softmax-then-top-k router this equals
    masking its logits before the top-k.
    """
    probs = decision.probs
    if probs is None or probs.shape[-1] != mask.shape[0]:
        raise ValueError(
            f"router {router_name!r} gives no distribution over this layer's {mask.shape[0]} experts, so its "
            "experts cannot be masked; mask a fused model with a gate, soft, topk, dlp, milora or arrow router"
        )
    kept = probs.masked_fill(mask.to(probs.device), 0.0)
    kept = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
    weights, indices = kept.topk(decision.top_k, dim=-1)
    sums = decision.weights.float().sum(-1)
    if torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return RoutingDecision(
        indices,
        weights.to(decision.weights.dtype),
        decision.aux_losses,
        tokens_per_sequence=decision.tokens_per_sequence,
        probs=kept,
        token_mask=decision.token_mask,
    )
