"""MeteoRA gate: per-linear ``softmax(topk(W_g x) / T)``, optionally supervised by the task id.

MeteoRA fuses task-specific LoRA adapters under one gate per linear layer and trains the gate
with a cross-entropy to the token's task (coefficient ~50 when supervised). Pass the task ids as
``task_ids=`` (``[B]`` one task per sequence, or ``[B, S]`` per token; ``-100`` = ignore) to the
model call, or through ``molex.routing_inputs`` for ``generate()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from molex.core.losses import gate_cross_entropy
from molex.layer.context import RoutingContext
from molex.routers.base import ContrastiveOptions, Router, RoutingDecision, float32_logits, register_router
from molex.routers.topk import check_top_k


@dataclass
class GateConfig(ContrastiveOptions):
    """Options of the ``gate`` router.

    Attributes:
        top_k: experts per token (``<= num_experts``).
        temperature: ``T > 0`` of the softmax over the kept logits.
        task_loss_coef: weight of the cross-entropy of the gate logits to ``task_ids`` (0 disables it;
            MeteoRA uses ~50). When > 0, training forwards must receive ``task_ids``.
    """

    top_k: int = 2
    temperature: float = 1.0
    task_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.task_loss_coef < 0:
            raise ValueError(f"task_loss_coef must be >= 0, got {self.task_loss_coef}")


def token_task_ids(task_ids: Tensor, context: RoutingContext, num_tokens: int) -> Tensor | None:
    """Per-token task ids ``[T]`` for this step from ``task_ids`` ``[B]`` or ``[B, S]``; ``None`` if they
    do not describe this step's tokens (e.g. a ``[B, S_prompt]`` tensor during a decode step)."""
    if not context.matches(num_tokens):
        return None
    batch, seq = context.batch_size, context.seq_len
    task_ids = task_ids.long()
    if task_ids.dim() == 1 and task_ids.shape[0] == batch:
        return task_ids.repeat_interleave(seq)
    if task_ids.dim() == 2 and task_ids.shape == (batch, seq):
        return task_ids.reshape(-1)
    if task_ids.dim() in (1, 2) and task_ids.shape[0] == batch:
        return None
    raise ValueError(
        f"task_ids must be [batch] or [batch, seq] = [{batch}] / [{batch}, {seq}]; got {tuple(task_ids.shape)}"
    )


@register_router
class GateRouter(Router):
    """``w = softmax(topk(W_g x) / T)``. Input ``x [T, d]``; indices/weights ``[T, top_k]``."""

    name = "gate"
    config_class = GateConfig
    emits = ("task_ce", "contrastive")

    def __init__(self, *, in_features: int, num_experts: int, config: GateConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        check_top_k(config.top_k, num_experts, self.name)
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def routing_inputs_read(self) -> frozenset[str]:
        return frozenset({"task_ids"}) if self.config.task_loss_coef > 0 else frozenset()

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        cfg = self.config
        logits = float32_logits(self.gate, x)
        kept, indices = logits.topk(cfg.top_k, dim=-1)
        weights = (kept / cfg.temperature).softmax(dim=-1)
        mask = context.token_mask(x.shape[0]) if context is not None else None
        losses: dict[str, Tensor] = {}
        if cfg.task_loss_coef > 0 and context is not None:
            task_ids = context.require("task_ids", self.name) if self.training else context.get("task_ids")
            targets = None if task_ids is None else token_task_ids(task_ids.to(x.device), context, x.shape[0])
            if targets is not None:
                losses["task_ce"] = cfg.task_loss_coef * gate_cross_entropy(logits, targets, mask)
        return RoutingDecision(indices, weights, losses, probs=logits.softmax(dim=-1), token_mask=mask)
