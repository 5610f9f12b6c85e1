"""Auxiliary router losses. Every function ignores padding through ``token_mask`` (bool ``[T]``).

Imports nothing of molex: routers, layers and analysis all build on :func:`masked_mean`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "contrastive_loss",
    "expert_outputs",
    "gate_cross_entropy",
    "load_balance_loss",
    "masked_mean",
    "slot_fractions",
    "tsallis_entropy",
    "weight_fractions",
    "z_loss",
]

#: ``|q - 1|`` below which the Tsallis entropy is computed as its limit, the Shannon entropy
SHANNON_LIMIT = 1e-6


def masked_mean(values: Tensor, mask: Tensor | None, dim: int = 0) -> Tensor:
    """Mean of ``values`` over ``dim`` counting only the positions where ``mask`` is true.

    ``mask`` (bool or 0/1) covers the leading dimensions of ``values``, ``dim`` among them: a
    token mask ``[T]`` for ``values [T, ...]`` (``dim = 0``), or an attention mask ``[B, S]`` for
    ``values [B, S, d]`` (``dim = 1``: one mean per sequence, ``[B, d]``). Positions that are all
    masked out give 0. Without a mask: the plain mean (0 over an empty dimension).
    """
    if mask is None:
        return values.mean(dim) if values.shape[dim] else values.sum(dim)
    weights = mask.to(values.dtype)
    weights = weights.view(*weights.shape, *([1] * (values.dim() - weights.dim())))
    return (values * weights).sum(dim) / weights.sum(dim).clamp_min(1.0)


def slot_fractions(indices: Tensor, num_experts: int, token_mask: Tensor | None = None) -> Tensor:
    """``f_e``: share of the routed (token, slot) pairs that went to expert ``e``; ``[E]``, sums to 1."""
    one_hot = torch.zeros(indices.shape[0], num_experts, device=indices.device, dtype=torch.float32)
    one_hot.scatter_add_(1, indices, torch.ones_like(indices, dtype=torch.float32))
    return masked_mean(one_hot, token_mask) / max(indices.shape[1], 1)


def weight_fractions(indices: Tensor, weights: Tensor, num_experts: int, token_mask: Tensor | None = None) -> Tensor:
    """``f_e``: expert ``e``'s share of the routed weight (the ``[T, k]`` ``weights`` scattered to their
    ``indices``, averaged over real tokens, divided by the total); ``[E]``, sums to 1 (all zero when no
    weight was routed). This is the load :func:`molex.routing_health` reports. Unlike
    :func:`slot_fractions` it still differs between experts when every token keeps every expert
    (``k = E``), so a load-balance loss built on it keeps pushing there."""
    gate = weights.new_zeros(indices.shape[0], num_experts, dtype=torch.float32)
    gate.scatter_add_(1, indices, weights.detach().float())
    load = masked_mean(gate, token_mask)
    return load / load.sum().clamp_min(torch.finfo(load.dtype).tiny)


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


def _safe_log(values: Tensor) -> tuple[Tensor, Tensor]:
    """``(log(values) where values > 0 else 0, values > 0)``, with finite gradients at 0."""
    positive = values > 0
    return torch.where(positive, values, torch.ones_like(values)).log(), positive


def tsallis_entropy(probs: Tensor, q: float, eps: float = 0.0, normalized: bool = True) -> Tensor:
    """Tsallis entropy of each row of ``probs [T, E]``; returns ``[T]`` (float32).

    ``S_q(p) = (1 - sum_i (p_i + eps)^q) / (q - 1)``; normalised by its maximum (uniform ``p``,
    ``eps = 0``) ``S_q,max = (1 - E^(1 - q)) / (q - 1)`` so that ``H`` lies in ``[0, 1]`` (up to
    ``eps``). For ``|q - 1| < SHANNON_LIMIT`` the limit is used: Shannon ``-sum p log(p + eps)``
    over ``log E``. ``1 - sum (p + eps)^q`` is evaluated as
    ``-E eps - sum (p + eps) expm1((q - 1) log(p + eps))`` (exact, since ``sum p = 1``), which
    does not cancel catastrophically as ``q`` approaches 1. ``E = 1`` gives 0.
    """
    if q <= 0:
        raise ValueError(f"Tsallis entropy needs q > 0, got {q}")
    p = probs.float()
    num_experts = p.shape[-1]
    shifted = p + eps
    log_shifted, positive = _safe_log(shifted)
    if abs(q - 1.0) < SHANNON_LIMIT:
        entropy = -(torch.where(positive, p * log_shifted, torch.zeros_like(p))).sum(-1)
        max_entropy = math.log(num_experts)
    else:
        # (p + eps)^q - (p + eps) = (p + eps) * expm1((q - 1) log(p + eps)); zero where p + eps = 0
        excess = torch.where(positive, shifted * torch.expm1((q - 1.0) * log_shifted), torch.zeros_like(p))
        entropy = (-num_experts * eps - excess.sum(-1)) / (q - 1.0)
        max_entropy = (1.0 - num_experts ** (1.0 - q)) / (q - 1.0)
    if not normalized:
        return entropy
    if num_experts == 1:
        return torch.zeros_like(entropy)
    return entropy / max_entropy


def gate_cross_entropy(logits: Tensor, targets: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of gate ``logits [T, E]`` against expert/task ids ``targets [T]``.

    Tokens with a negative target (``-100``) or outside ``token_mask`` do not count; a batch
    without any counted token gives 0 (with a gradient path, so it can be summed safely).
    """
    counted = targets >= 0
    if token_mask is not None:
        counted = counted & token_mask
    losses = torch.nn.functional.cross_entropy(
        logits.float(), torch.where(counted, targets, torch.zeros_like(targets)), reduction="none"
    )
    return masked_mean(losses, counted)


def expert_outputs(x: Tensor, A: Tensor, B: Tensor, scaling: float | Tensor = 1.0) -> Tensor:
    """Every expert's output for every token: ``[T, E, out]`` from ``x [T, in]``, ``A [E, r, in]``,
    ``B [E, r, out]`` and the per-expert ``scaling`` (a float or ``[E]``); ``A [1, r, in]`` is a
    down-projection shared by every expert."""
    A = A.expand(B.shape[0], -1, -1)
    out = torch.einsum("ter,ero->teo", torch.einsum("ti,eri->ter", x.to(A.dtype), A), B)
    if isinstance(scaling, Tensor):
        return out * scaling.to(out.dtype).view(1, -1, 1)
    return out * scaling


def contrastive_loss(outputs: Tensor, token_mask: Tensor | None = None, temperature: float = 0.1) -> Tensor:
    """MoELoRA-style contrastive loss between experts' outputs, experts as classes (InfoNCE).

    ``outputs [T, E, d]`` holds every expert's output per token. Each output ``z_{t,e}``
    (L2-normalised) is classified among the experts by cosine similarity to the experts'
    prototypes ``c_e`` (the normalised mean over real tokens of ``z_{:,e}``)::

        loss = mean_{t real, e} -log softmax_{e'}(z_{t,e} . c_{e'} / temperature)[e]

    so outputs of one expert are pulled together and pushed away from the other experts' (which
    keeps the experts distinct). Padding (``token_mask`` False) counts neither in the prototypes
    nor in the mean. Fewer than two experts: 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_experts = outputs.shape[1]
    if num_experts < 2:
        return outputs.float().sum() * 0.0
    z = torch.nn.functional.normalize(outputs.float(), dim=-1)
    prototypes = torch.nn.functional.normalize(masked_mean(z, token_mask), dim=-1)  # [E, d]
    logits = torch.einsum("ted,fd->tef", z, prototypes) / temperature
    targets = torch.arange(num_experts, device=z.device).expand(z.shape[0], -1)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(-1)
    return masked_mean(losses, token_mask)


def token_choice_losses(
    logits: Tensor,
    probs: Tensor,
    indices: Tensor,
    token_mask: Tensor | None,
    *,
    load_balance_coef: float,
    z_loss_coef: float,
    weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """Weighted load-balance and z-losses of a token-choice router. ``f_e`` of the load-balance loss is
    the share of routed slots (:func:`slot_fractions`), or with ``weights [T, k]`` given the share of the
    routed weight (:func:`weight_fractions`), reported minus 1, its value at an even load."""
    losses: dict[str, Tensor] = {}
    if load_balance_coef > 0:
        num_experts = probs.shape[-1]
        if weights is None:
            fractions = slot_fractions(indices, num_experts, token_mask)
            offset = 0.0
        else:
            fractions = weight_fractions(indices, weights, num_experts, token_mask)
            # both shares sum to 1, so the loss is 1 at an even load: report the excess over that, so that a
            # large coefficient does not add a constant to every logged loss (the gradient is the same)
            offset = 1.0
        losses["load_balance"] = load_balance_coef * (load_balance_loss(probs, fractions, token_mask) - offset)
    if z_loss_coef > 0:
        losses["z_loss"] = z_loss_coef * z_loss(logits, token_mask)
    return losses
