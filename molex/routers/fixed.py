"""Fixed router: every expert, with constant weights (static mixing of adapters, LoraHub search)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from molex.layer.context import RoutingContext
from molex.routers.base import Router, RouterConfig, RoutingDecision, register_router


@dataclass
class FixedConfig(RouterConfig):
    """Options of the ``fixed`` router.

    Attributes:
        weights: one constant weight per expert; ``None`` gives every expert ``1 / E``. Weights
            may be negative or sum to anything (task arithmetic). They live in the buffer
            ``mix [E]``, so a model's weights can be changed after construction (e.g. per layer
            by :func:`molex.fuse_adapters`) and are saved with the adapter.
    """

    weights: list[float] | None = None

    def __post_init__(self) -> None:
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if not self.weights:
                raise ValueError("fixed router weights must not be empty (or leave weights=None)")


@register_router
class FixedRouter(Router):
    """Every token uses all ``E`` experts with the weights ``mix [E]``. Output ``[T, E]``; no parameters."""

    name = "fixed"
    config_class = FixedConfig

    def __init__(self, *, in_features: int, num_experts: int, config: FixedConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        if config.weights is not None and len(config.weights) != num_experts:
            raise ValueError(f"fixed router: {len(config.weights)} weights given for {num_experts} experts")
        weights = config.weights if config.weights is not None else [1.0 / num_experts] * num_experts
        self.register_buffer("mix", torch.tensor(weights, dtype=torch.float32))

    def decides_per_sequence(self) -> bool:
        return True  # one constant mixture for every token

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        tokens = x.shape[0]
        indices = torch.arange(self.num_experts, device=x.device).expand(tokens, -1)
        weights = self.mix.to(x.device).expand(tokens, -1)
        mask = context.token_mask(tokens) if context is not None else None
        return RoutingDecision(indices, weights, token_mask=mask)
