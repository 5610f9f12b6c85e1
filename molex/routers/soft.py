"""Soft (dense) router (LoRAMoE / X-LoRA style): every expert, weights ``softmax(W_g x / T)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from molex.core.losses import load_balance_loss, masked_mean
from molex.layer.context import RoutingContext
from molex.routers.base import Router, RouterConfig, RoutingDecision, float32_logits, register_router


@dataclass
class SoftConfig(RouterConfig):
    """Options of the ``soft`` router.

    Attributes:
        temperature: softmax temperature ``T > 0`` (lower is sharper).
        load_balance_coef: weight of ``E * sum_e f_e P_e`` with ``f_e`` the mean weight (0 disables).
    """

    temperature: float = 1.0
    load_balance_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.load_balance_coef < 0:
            raise ValueError("load_balance_coef must be >= 0")


@register_router
class SoftRouter(Router):
    """All ``E`` experts per token. Output indices/weights ``[T, E]``."""

    name = "soft"
    config_class = SoftConfig
    emits = ("load_balance",)

    def __init__(self, *, in_features: int, num_experts: int, config: SoftConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        logits = float32_logits(self.gate, x)
        probs = (logits / self.config.temperature).softmax(dim=-1)
        indices = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        mask = context.token_mask(x.shape[0]) if context is not None else None
        losses: dict[str, Tensor] = {}
        if self.config.load_balance_coef > 0:
            fractions = masked_mean(probs, mask)
            losses["load_balance"] = self.config.load_balance_coef * load_balance_loss(probs, fractions, mask)
        return RoutingDecision(indices, probs, losses, probs=probs, token_mask=mask)
