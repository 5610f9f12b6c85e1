"""MTL-LoRA: a shared down-projection, a task-specific ``r x r`` transform, task-weighted up-projections.

MTL-LoRA (Yang et al., AAAI 2025, "MTL-LoRA: Low-Rank Adaptation for Multi-Task Learning") computes,
for an input ``x`` of task ``t``::

    h = s * sum_i softmax(w_t / tau)_i B_i^T Lambda_t A x

with one ``A [r, in]`` shared by the layer's experts (the pool is built with ``share_A``), one
``Lambda_t [r, r]`` and one mixing vector ``w_t [E]`` per task, and the experts' up-projections
``B_i [r, out]``. The task comes from ``task_ids [B]`` (one per sequence).

Since the mixing depends on the task only, each task's update is one LoRA, ``A_t = Lambda_t A`` and
``B_t = sum_i softmax(w_t / tau)_i s_i B_i``: the expert op runs over those ``num_tasks`` derived
factors with one per-sequence choice, which costs one LoRA per token whatever ``E``. The decision
this router returns (statistics, logs) is the mixture over the ``B_i``, ``[B, E]`` per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from molex.layer.context import RoutingContext
from molex.routers.base import Router, RouterConfig, RoutingDecision, register_router


@dataclass
class MTLConfig(RouterConfig):
    """Options of the ``mtl`` router.

    Attributes:
        num_tasks: number of tasks; ``task_ids`` must lie in ``[0, num_tasks)``.
        temperature: ``tau > 0`` of the mixing softmax (lower is sharper).
    """

    num_tasks: int = 8
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.num_tasks < 1:
            raise ValueError(f"mtl router num_tasks must be >= 1, got {self.num_tasks}")
        if self.temperature <= 0:
            raise ValueError(f"mtl router temperature must be > 0, got {self.temperature}")


@register_router
class MTLRouter(Router):
    """Per-task transforms ``task_transform [num_tasks, r, r]`` (identity at start) and mixing logits
    ``task_logits [num_tasks, E]`` (zeros: an even mixture at start). Needs ``task_ids [B]``.
    """

    name = "mtl"
    config_class = MTLConfig
    needs_shared_a = True

    def __init__(self, *, in_features: int, num_experts: int, config: MTLConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        self.task_logits = nn.Parameter(torch.zeros(config.num_tasks, num_experts))
        self.register_parameter("task_transform", None)  # [num_tasks, r, r], made when the pool is known

    def bind_pool(self, experts: nn.Module) -> None:
        if experts.lora_A.shape[0] != 1:
            raise ValueError(
                "router 'mtl' needs a pool with one shared down-projection (lora_A [1, r, in]); "
                "build the pool with share_A=True"
            )
        eye = torch.eye(experts.rank, device=self.task_logits.device, dtype=self.task_logits.dtype)
        self.task_transform = nn.Parameter(eye.expand(self.config.num_tasks, -1, -1).clone())

    def _tasks(self, tokens: int, context: RoutingContext | None, *, check: bool = True) -> Tensor:
        if context is None:
            raise ValueError("router 'mtl' needs `task_ids`: use it inside a model injected with molex.inject")
        task_ids = context.require("task_ids", self.name).reshape(-1)
        if task_ids.numel() == 0 or tokens % task_ids.numel():
            raise ValueError(f"router 'mtl': {task_ids.numel()} task_ids do not divide the {tokens} tokens of the step")
        if not check:  # checked by forward() for this very call
            return task_ids.long()
        low, high = int(task_ids.min()), int(task_ids.max())
        if low < 0 or high >= self.config.num_tasks:
            raise ValueError(
                f"router 'mtl': task_ids must lie in [0, {self.config.num_tasks}), got values from {low} to {high}; "
                f"raise num_tasks to at least {high + 1}"
            )
        return task_ids.long()

    def decides_per_sequence(self) -> bool:
        return True  # one task per sequence

    def mixing(self) -> Tensor:
        """``softmax(w_t / tau)`` for every task: ``[num_tasks, E]``."""
        return (self.task_logits / self.config.temperature).softmax(dim=-1)

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        tokens = x.shape[0]
        tasks = self._tasks(tokens, context).to(x.device)
        weights = self.mixing()[tasks]  # [B, E]
        indices = torch.arange(self.num_experts, device=x.device).expand(tasks.shape[0], -1)
        mask = context.token_mask(tokens) if context is not None else None
        per_seq = tokens // tasks.shape[0]
        return RoutingDecision(indices, weights, tokens_per_sequence=per_seq, probs=weights, token_mask=mask)

    def kernel_inputs(
        self, experts: nn.Module, decision: RoutingDecision, context: RoutingContext | None = None
    ) -> tuple[Tensor, Tensor, Tensor, RoutingDecision]:
        """Per-task factors ``A_t = Lambda_t A [num_tasks, r, in]``, ``B_t = sum_i pi_ti s_i B_i
        [num_tasks, r, out]`` (scaling folded in) and each sequence on its task's factors."""
        if self.task_transform is None:
            raise ValueError("router 'mtl' is not bound to an expert pool; it works inside a MoLE layer")
        A, B = experts.lora_A, experts.lora_B
        task_A = torch.einsum("tij,jk->tik", self.task_transform.to(A.dtype), A[0])
        mix = self.mixing() * experts.scaling.to(self.task_logits.dtype)  # [num_tasks, E]
        task_B = torch.einsum("te,ero->tro", mix.to(B.dtype), B)
        tasks = self._tasks(decision.num_tokens, context, check=False).to(A.device)
        applied = RoutingDecision(
            tasks.unsqueeze(1),
            torch.ones(tasks.shape[0], 1, device=A.device),
            tokens_per_sequence=decision.tokens_per_sequence,
        )
        return task_A, task_B, torch.ones(self.config.num_tasks, device=A.device), applied
