"""Switch router: top-1 expert per token with an optional capacity limit (Switch Transformer).

Each expert accepts at most ``capacity = ceil(capacity_factor * real_tokens / E)`` tokens of a
forward, in token order; overflow tokens get weight 0, i.e. only the base layer's output. The
share of real tokens dropped this way is ``MoLELinear.routing_stats()["dropped"]`` (and
:meth:`SwitchRouter.dropped_fraction` on a decision). The capacity is computed on the device:
no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from molex.core.losses import masked_mean, token_choice_losses
from molex.layer.context import RoutingContext
from molex.routers.balance import BalanceOptions, BiasBalancedRouter
from molex.routers.base import ContrastiveOptions, RoutingDecision, float32_logits, register_router


@dataclass
class SwitchConfig(BalanceOptions, ContrastiveOptions):
    """Options of the ``switch`` router.

    Attributes:
        capacity_factor: tokens per expert = ``ceil(capacity_factor * tokens / E)``; ``None`` = unlimited.
        load_balance_coef: weight of ``E * sum_e f_e P_e`` (``f_e`` = share of tokens routed to e; used with
            ``balance="aux"``).
        z_loss_coef: weight of the router z-loss (0 disables it).
        balance, balance_gamma: load-balance loss, loss-free bias or neither (see ``BalanceOptions``).
    """

    capacity_factor: float | None = None
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (unlimited), got {self.capacity_factor}")
        if self.load_balance_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("loss coefficients must be >= 0")


def within_capacity(indices: Tensor, num_experts: int, capacity_factor: float, token_mask: Tensor | None) -> Tensor:
    """Bool ``[T]``: whether each token fits in its expert's capacity (tokens served in order).

    ``indices [T]`` is each token's expert. Padding tokens take no capacity (and are reported as kept).
    """
    real = torch.ones_like(indices, dtype=torch.bool) if token_mask is None else token_mask
    one_hot = torch.nn.functional.one_hot(indices, num_experts) * real.unsqueeze(-1)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(-1)  # 1-based place in the expert's queue; 0 = padding
    capacity = torch.ceil(capacity_factor * real.sum() / num_experts)
    return position <= capacity


@register_router
class SwitchRouter(BiasBalancedRouter):
    """Top-1 routing (the largest ``p + b`` with ``balance="bias"``), weight = the chosen expert's probability.
    Input ``x [T, d]``; output ``[T, 1]``."""

    name = "switch"
    config_class = SwitchConfig
    emits = ("load_balance", "z_loss", "contrastive")

    def __init__(self, *, in_features: int, num_experts: int, config: SwitchConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        cfg = self.config
        logits = float32_logits(self.gate, x)
        probs = logits.softmax(dim=-1)
        if self.uses_bias:  # the bias picks the expert; the weight stays its unbiased probability
            indices = self.choice_scores(probs).argmax(dim=-1, keepdim=True)
            weights = probs.gather(-1, indices)
        else:
            weights, indices = probs.max(dim=-1, keepdim=True)
        mask = context.token_mask(x.shape[0]) if context is not None else None
        self.record_choices(indices, mask)  # the choice is what the bias steers, dropped by capacity or not
        if cfg.capacity_factor is not None:
            fits = within_capacity(indices.squeeze(-1), self.num_experts, cfg.capacity_factor, mask)
            weights = weights * fits.unsqueeze(-1)
        lb_coef = cfg.load_balance_coef if cfg.uses_aux_loss else 0.0
        losses = token_choice_losses(
            logits, probs, indices, mask, load_balance_coef=lb_coef, z_loss_coef=cfg.z_loss_coef
        )
        return RoutingDecision(indices, weights, losses, probs=probs, token_mask=mask)

    @staticmethod
    def dropped_fraction(decision: RoutingDecision) -> Tensor:
        """Share of the decision's real tokens that the capacity limit sent to the base layer only."""
        dropped = (decision.token_weights().sum(-1) == 0).float()
        return masked_mean(dropped, decision.token_mask)
