"""Token-level top-k router (MoLA / MixLoRA): softmax over experts, keep the k largest, renormalise."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from molex.core.losses import token_choice_losses
from molex.layer.context import RoutingContext
from molex.routers.balance import BalanceOptions, BiasBalancedRouter
from molex.routers.base import ContrastiveOptions, RoutingDecision, float32_logits, register_router
from molex.routers.inputs import INPUT_NORMS

#: the values of ``TopKConfig.balance_share``
BALANCE_SHARES = ("weight", "slots")


@dataclass
class TopKConfig(BalanceOptions, ContrastiveOptions):
    """Options of the ``topk`` router.

    Attributes:
        top_k: experts per token (1 <= top_k <= num_experts).
        normalize: renormalise the kept probabilities to sum to 1 (MoLA, MixLoRA, Mixtral).
        jitter_noise: multiplicative input noise ``U(1 - eps, 1 + eps)`` while training (Switch).
        load_balance_coef: weight of ``E * sum_e f_e P_e`` (0 disables it; used with ``balance="aux"``).
            The training objective averages each loss kind over the layers, so this is the pressure on
            the whole model: each of ``L`` routers gets ``load_balance_coef / L``. The default, 20, is about
            0.22 per router on the 90 MoLE layers of the default recipe (MoLA and Switch use 0.01 per
            router over far longer runs; at that, a quarter of the default run's experts went dead).
        balance_share: what ``f_e`` counts: ``"weight"`` (the default), expert ``e``'s share of the routed
            weight, the load :func:`molex.routing_health` reports; or ``"slots"``, its share of the
            routed (token, slot) pairs (Switch, Mixtral). With ``top_k = E`` every expert fills every
            token's slots, so ``"slots"`` makes the loss a constant and lets one expert take all the
            weight; ``"weight"`` keeps balancing there. With ``"weight"`` the loss is reported minus 1 (its
            value at an even load), so the default coefficient adds no constant to the logged loss.
        input_norm: what the gate sees (:func:`molex.routers.inputs.router_input`): ``"log"`` (the default),
            the direction of the input with each channel log-compressed, so routers of layers whose inputs
            differ in size by 100x learn at one pace and tokens are not all alike through a few massive
            channels; ``"l2"``, the raw direction; ``"none"``, the raw input (adapters saved before the
            option existed load with it).
        temperature: the gate's logits are divided by it. A unit-length input keeps logits small, so
            0.1 (the default, as cosine routers use) lets routers decide at the usual router learning
            rate (``optim.router_lr_scale=10``); at 1.0 they stayed near uniform in 60 steps (router
            entropy 0.86-0.97 of its maximum). Adapters saved before the option existed load with 1.0.
        z_loss_coef: weight of the router z-loss (0 disables it).
        contrastive_coef, contrastive_temperature: MoELoRA contrastive loss (see ``ContrastiveOptions``).
        balance, balance_gamma: load-balance loss, loss-free bias or neither (see ``BalanceOptions``).
    """

    #: options added after adapter format 2, with the value an older adapter routed with
    SAVED_BEFORE: ClassVar[dict[str, tuple[int, Any]]] = {
        "input_norm": (3, "none"),
        "temperature": (3, 1.0),
        "balance_share": (3, "slots"),
        "load_balance_coef": (3, 0.01),
    }

    top_k: int = 2
    normalize: bool = True
    jitter_noise: float = 0.0
    load_balance_coef: float = 20.0
    z_loss_coef: float = 0.0
    balance_share: str = "weight"
    input_norm: str = "log"
    temperature: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(
                f"input_norm={self.input_norm!r} is not a router input normalisation; use one of "
                f"{', '.join(INPUT_NORMS)} (log: the direction of the channel-compressed input, l2: of the raw "
                "input, none: the raw input)"
            )
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not (0 < self.temperature < math.inf)
        ):
            raise ValueError(
                f"temperature must be a finite number > 0 (the gate's logits are divided by it; 0.1 with "
                f"input_norm=log or l2, 1.0 for the raw gate), got {self.temperature!r}"
            )
        if self.balance_share not in BALANCE_SHARES:
            raise ValueError(
                f"balance_share={self.balance_share!r} is not a load share; use one of {', '.join(BALANCE_SHARES)} "
                "(weight: share of the routed weight, slots: share of the routed token slots)"
            )
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ValueError(f"jitter_noise must be in [0, 1), got {self.jitter_noise}")
        if self.load_balance_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("loss coefficients must be >= 0")


def check_top_k(top_k: int, num_experts: int, router: str) -> None:
    if top_k > num_experts:
        raise ValueError(
            f"router {router!r}: top_k={top_k} exceeds num_experts={num_experts}; "
            f"lower top_k or give this layer at least {top_k} experts"
        )


@register_router
class TopKRouter(BiasBalancedRouter):
    """``p = softmax(W_g x)``; keep the ``top_k`` largest (of ``p + b`` with ``balance="bias"``); weights
    are the kept ``p``, renormalised over the kept.

    Input ``x [T, d]``; output indices/weights ``[T, top_k]``. ``gate`` is ``nn.Linear(d, E)``.
    """

    name = "topk"
    config_class = TopKConfig
    emits = ("load_balance", "z_loss", "contrastive")

    def __init__(self, *, in_features: int, num_experts: int, config: TopKConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        check_top_k(config.top_k, num_experts, self.name)
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        cfg = self.config
        if self.training and cfg.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - cfg.jitter_noise, 1.0 + cfg.jitter_noise)
        logits = float32_logits(self.gate, x, input_norm=cfg.input_norm, temperature=cfg.temperature)
        probs = logits.softmax(dim=-1)
        if self.uses_bias:  # the bias picks the experts; the weights stay the unbiased probabilities
            indices = self.choice_scores(probs).topk(cfg.top_k, dim=-1).indices
            weights = probs.gather(-1, indices)
        else:
            weights, indices = probs.topk(cfg.top_k, dim=-1)
        if cfg.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        mask = context.token_mask(x.shape[0]) if context is not None else None
        self.record_choices(indices, mask)
        lb_coef = cfg.load_balance_coef if cfg.uses_aux_loss else 0.0
        losses = token_choice_losses(
            logits,
            probs,
            indices,
            mask,
            load_balance_coef=lb_coef,
            z_loss_coef=cfg.z_loss_coef,
            weights=weights if cfg.balance_share == "weight" else None,
        )
        return RoutingDecision(indices, weights, losses, probs=probs, token_mask=mask)
