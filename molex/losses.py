"""Auxiliary router losses. Every function ignores padding through ``token_mask`` (bool ``[T]``)."""

from __future__ import annotations

import torch
from torch import Tensor

from molex.routers.base import masked_mean

__all__ = ["load_balance_loss", "z_loss", "slot_fractions"]


def slot_fractions(indices: Tensor, num_experts: int, token_mask: Tensor | None = None) -> Tensor:
    """``f_e``: share of the routed (token, slot) pairs that went to expert ``e``; ``[E]``, sums to 1."""
    one_hot = torch.zeros(indices.shape[0], num_experts, device=indices.device, dtype=torch.float32)
    one_hot.scatter_add_(1, indices, torch.ones_like(indices, dtype=torch.float32))
    return masked_mean(one_hot, token_mask) / max(indices.shape[1], 1)


def load_balance_loss(probs: Tensor, fractions: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Switch / Mixtral load-balance loss ``E * sum_e f_e * P_e``.

    Args:
        probs: ``[T, E]`` router probabilities (differentiable).
        fractions: ``[E]`` share of routing mass per expert ``f_e`` (treated as a constant).
        token_mask: bool ``[T]``; padding tokens do not count in ``P_e``.

    Equals 1 when routing is perfectly uniform.
    """
    mean_prob = masked_mean(probs, token_mask)
    return probs.shape[-1] * torch.sum(fractions.detach() * mean_prob)


def z_loss(logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``; keeps logits small."""
    return masked_mean(torch.logsumexp(logits.float(), dim=-1).square(), token_mask)
