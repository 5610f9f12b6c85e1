"""MiLoRA: prompt-aware routing among the LoRA *modules* of a decoder block.

Each MoLE layer of a block (q, k, v, o, gate, up, down, ...) is one expert. A router per block
scores the modules from the mean of the block input over the prompt tokens (attention mask, and
``prompt_mask`` when given), keeps the ``top_k`` modules and gates each module's LoRA with its
weight; the others are off for that sequence. The decision is made once per sequence at prefill
and reused for every generated token (see :mod:`molex.routers.sequence`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from molex.core.losses import load_balance_loss, slot_fractions
from molex.layer.context import RoutingContext
from molex.routers.base import RouterConfig, RoutingDecision, Scope, float32_logits, register_router
from molex.routers.sequence import SharedRouter, pool_sequences, sequence_layout


@dataclass
class MiLoRAConfig(RouterConfig):
    """Options of the ``milora`` router.

    Attributes:
        top_k: modules kept per sequence (``<=`` the number of MoLE modules in a block).
        normalize: renormalise the kept probabilities to sum to 1 (default: the kept softmax values).
        load_balance_coef: weight of ``M * sum_m f_m P_m`` over the batch's sequences (0 disables it).
    """

    top_k: int = 2
    normalize: bool = False
    load_balance_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.load_balance_coef < 0:
            raise ValueError(f"load_balance_coef must be >= 0, got {self.load_balance_coef}")


@register_router
class MiLoRARouter(SharedRouter):
    """Block-level router over ``num_experts`` = the block's MoLE modules.

    ``forward(x [T, d], context)`` pools ``x`` (the block input) per sequence and returns
    indices/weights ``[B, top_k]`` of modules with ``tokens_per_sequence = S``. ``gate`` is
    ``nn.Linear(d, M)``.
    """

    name = "milora"
    config_class = MiLoRAConfig
    scope = Scope.BLOCK
    emits = ("load_balance",)

    def __init__(self, *, in_features: int, num_experts: int, config: MiLoRAConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        if config.top_k > num_experts:
            raise ValueError(
                f"router 'milora': top_k={config.top_k} exceeds the {num_experts} MoLE modules of the block; "
                "lower top_k or target more modules per block"
            )
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def routing_inputs_read(self) -> frozenset[str]:
        return frozenset({"prompt_mask"})

    def score(self, pooled: Tensor) -> Tensor:
        """Module logits ``[B, M]`` from pooled prompt representations ``[B, d]``."""
        return float32_logits(self.gate, pooled)

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        cfg = self.config
        _, seq = sequence_layout(x.shape[0], context)
        probs = self.score(pool_sequences(x, context)).softmax(dim=-1)
        weights, indices = probs.topk(cfg.top_k, dim=-1)
        if cfg.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        losses = {}
        if cfg.load_balance_coef > 0:
            fractions = slot_fractions(indices, self.num_experts)
            losses["load_balance"] = cfg.load_balance_coef * load_balance_loss(probs, fractions)
        return RoutingDecision(indices, weights, losses, tokens_per_sequence=seq, probs=probs)

    def observe(self, hidden: Tensor | None) -> None:
        """Block pre-hook: decide from the block input ``[B, S, d]`` at the prefill of a generation."""
        context = self.context
        if context is None or not self.is_stale(context) or not context.is_prefill:
            return
        if hidden is None or hidden.dim() != 3 or hidden.shape[-1] != self.in_features:
            shape = None if hidden is None else tuple(hidden.shape)
            raise ValueError(
                f"router 'milora' expected its block's input hidden states [batch, seq, {self.in_features}] as the "
                f"first argument (or hidden_states=), got {shape}"
            )
        self.store(context, self(hidden.reshape(-1, hidden.shape[-1]), context))
