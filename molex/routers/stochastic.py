"""AdaMix's stochastic router: a random expert per token (or sequence) while training, one merged LoRA at inference.

AdaMix (Wang et al., EMNLP 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model
Tuning") trains several adaptation modules per layer with *random routing*: no router
parameters, each forward sends every token (or every sequence) through one expert drawn
uniformly. At inference the modules are merged by averaging their weights, ``A = mean_e A_e`` and
``B = mean_e B_e``, so serving costs exactly one LoRA (and the merged LoRA exports as a plain
PEFT adapter, :func:`molex.hub.export_merged_adapter`).

AdaMix also regularises the two outputs of two stochastic passes towards each other (symmetric
KL). That needs the whole model run twice, so it lives in the training objective
(:func:`molex.training.objective.mole_objective`, ``rerun=``) and is switched on here by
``consistency_coef > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from molex.layer.context import RoutingContext
from molex.routers.base import Router, RouterConfig, RoutingDecision, register_router

LEVELS = ("token", "sequence")


@dataclass
class StochasticConfig(RouterConfig):
    """Options of the ``stochastic`` router.

    Attributes:
        level: ``"token"`` draws an expert for every token, ``"sequence"`` one per sequence (all its
            tokens use it).
        consistency_coef: weight of the symmetric KL between the next-token distributions of two
            stochastic forward passes over the same batch (0 disables it). Each training step then
            runs the model forward and backward twice: twice the compute and activation memory.
    """

    level: str = "token"
    consistency_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"stochastic router level must be one of {list(LEVELS)}, got {self.level!r}")
        if self.consistency_coef < 0:
            raise ValueError(f"consistency_coef must be >= 0, got {self.consistency_coef}")


def check_mergeable(experts: nn.Module) -> None:
    """Every expert must have the same scaling (true of every pool molex trains); averaging the factors
    of experts with different scalings has no single-LoRA meaning. Reads the scaling on the host."""
    scaling = experts.scaling
    if not torch.equal(scaling, scaling[:1].expand_as(scaling)):
        raise ValueError(
            f"cannot merge experts with different scalings {scaling.tolist()} into one LoRA; "
            "AdaMix's merge needs a pool trained with one alpha and rank"
        )


def average_experts(experts: nn.Module, *, check: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The pool averaged into one LoRA: ``A [1, r, in]`` (mean of the A's), ``B [1, r, out]`` (mean of
    the B's) and ``scaling [1]``. ``check``: run :func:`check_mergeable` first (the router does it once,
    when it is bound to its pool, so evaluation forwards need no host sync).
    """
    if check:
        check_mergeable(experts)
    return experts.lora_A.mean(0, keepdim=True), experts.lora_B.mean(0, keepdim=True), experts.scaling[:1]


@register_router
class StochasticRouter(Router):
    """Training: one expert per token (``[T, 1]``) or per sequence (``[B, 1]``), uniform over the ``E``
    experts, drawn from torch's default generator of the input's device (``torch.manual_seed`` makes
    runs reproducible; Lightning checkpoints carry that generator's state). Evaluation: the merged
    LoRA (see :func:`average_experts`). No parameters.
    """

    name = "stochastic"
    config_class = StochasticConfig

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        tokens = x.shape[0]
        mask = context.token_mask(tokens) if context is not None else None
        if not self.training:  # the merged module: every expert with an equal share (for statistics)
            indices = torch.arange(self.num_experts, device=x.device).expand(tokens, -1)
            weights = torch.full((tokens, self.num_experts), 1.0 / self.num_experts, device=x.device)
            return RoutingDecision(indices, weights, token_mask=mask)
        if self.config.level == "token":
            indices = torch.randint(self.num_experts, (tokens, 1), device=x.device)
            return RoutingDecision(indices, torch.ones(tokens, 1, device=x.device), token_mask=mask)
        if context is None or not context.matches(tokens):
            raise ValueError(
                "stochastic router with level='sequence' needs the batch layout [B, S]: use it inside a model "
                "injected with molex.inject, or set level='token'"
            )
        rows = context.batch_size
        indices = torch.randint(self.num_experts, (rows, 1), device=x.device)
        weights = torch.ones(rows, 1, device=x.device)
        return RoutingDecision(indices, weights, tokens_per_sequence=context.seq_len, token_mask=mask)

    def decides_per_sequence(self) -> bool:
        return not self.training  # at inference every token uses the averaged LoRA

    def bind_pool(self, experts: nn.Module) -> None:
        check_mergeable(experts)

    def kernel_inputs(
        self, experts: nn.Module, decision: RoutingDecision, context: RoutingContext | None = None
    ) -> tuple[Tensor, Tensor, Tensor, RoutingDecision]:
        """Training: the pool and the random decision. Evaluation: the merged LoRA, every token on it."""
        if self.training:
            return experts.lora_A, experts.lora_B, experts.scaling, decision
        A, B, scaling = average_experts(experts, check=False)
        tokens = decision.num_tokens
        single = RoutingDecision(
            torch.zeros(tokens, 1, dtype=torch.long, device=A.device), torch.ones(tokens, 1, device=A.device)
        )
        return A, B, scaling, single
