"""DynMoLE hybrid router: top-p routing when the router is confident, all experts when it is not.

``p = softmax(W_g x)`` (float32). The normalised Tsallis entropy ``H = S_q(p) / S_q,max``
(:func:`molex.core.losses.tsallis_entropy`) measures the router's uncertainty per token:

* ``H > tau``: the token uses every expert with weight ``p``;
* otherwise top-p: sort ``p`` descending and keep the experts whose cumulative sum is ``<= top_p``,
  always including the first ``keep_top_k``; the expert whose cumulative sum crosses ``top_p`` is
  excluded unless it is among the first ``keep_top_k``.

Weights are the kept ``p``, not renormalised. With ``balance="bias"`` the experts are considered in the
order of ``p + b`` instead (the cumulative sum is still over ``p``), so the bias decides which experts the
budget reaches first. The decision has a fixed shape ``[T, E]``: all
experts sorted by probability, a weight of 0 for the dropped ones (no host sync, no ragged sets).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from molex.core.losses import load_balance_loss, masked_mean, tsallis_entropy
from molex.layer.context import RoutingContext
from molex.routers.balance import BalanceOptions, BiasBalancedRouter
from molex.routers.base import ContrastiveOptions, RoutingDecision, float32_logits, register_router
from molex.routers.top_p import top_p_keep

__all__ = ["DynMoLEConfig", "DynMoLERouter", "top_p_keep"]


@dataclass
class DynMoLEConfig(BalanceOptions, ContrastiveOptions):
    """Options of the ``dynmole`` router.

    Attributes:
        q: Tsallis entropic index ``> 0`` (``q -> 1`` is Shannon entropy).
        tau: entropy threshold in ``[0, 1]``; tokens with ``H > tau`` use all experts.
        top_p: cumulative-probability budget in ``(0, 1]`` of the top-p branch.
        keep_top_k: experts always kept by the top-p branch (``<= num_experts``).
        eps: added to ``p`` inside the Tsallis entropy (keeps ``p^q`` differentiable at 0).
        entropy_coef: ``beta``, weight of the mean normalised entropy loss (0 disables it).
        load_balance_coef: ``alpha``, weight of ``E * sum_e f_e P_e`` with ``f_e`` the mean kept weight
            (used with ``balance="aux"``).
        balance, balance_gamma: load-balance loss, loss-free bias or neither (see ``BalanceOptions``).
    """

    q: float = 1.1
    tau: float = 0.9
    top_p: float = 0.75
    keep_top_k: int = 2
    eps: float = 1e-5
    entropy_coef: float = 0.01
    load_balance_coef: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.q <= 0:
            raise ValueError(f"q must be > 0 (q -> 1 is Shannon entropy), got {self.q}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1] (a normalised entropy threshold), got {self.tau}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.keep_top_k < 1:
            raise ValueError(f"keep_top_k must be >= 1, got {self.keep_top_k}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.entropy_coef < 0 or self.load_balance_coef < 0:
            raise ValueError("loss coefficients must be >= 0")


@register_router
class DynMoLERouter(BiasBalancedRouter):
    """Hybrid Tsallis-entropy router. Input ``x [T, d]``; indices/weights ``[T, E]`` (dropped: weight 0)."""

    name = "dynmole"
    config_class = DynMoLEConfig
    emits = ("entropy", "load_balance", "contrastive")

    def __init__(self, *, in_features: int, num_experts: int, config: DynMoLEConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        if config.keep_top_k > num_experts:
            raise ValueError(
                f"router 'dynmole': keep_top_k={config.keep_top_k} exceeds num_experts={num_experts}; "
                f"lower keep_top_k or give this layer at least {config.keep_top_k} experts"
            )
        self.gate = nn.Linear(in_features, num_experts, bias=False)

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        cfg = self.config
        probs = float32_logits(self.gate, x).softmax(dim=-1)
        entropy = tsallis_entropy(probs, cfg.q, cfg.eps)  # [T]
        if self.uses_bias:  # the bias orders the experts; the budget and the weights stay the unbiased p
            indices = self.choice_scores(probs).argsort(dim=-1, descending=True)
            sorted_probs = probs.gather(-1, indices)
        else:
            sorted_probs, indices = probs.sort(dim=-1, descending=True)
        keep = top_p_keep(sorted_probs, cfg.top_p, cfg.keep_top_k) | (entropy > cfg.tau).unsqueeze(-1)
        weights = sorted_probs * keep
        mask = context.token_mask(x.shape[0]) if context is not None else None
        self.record_choices(indices, mask, keep)
        losses: dict[str, Tensor] = {}
        if cfg.entropy_coef > 0:
            losses["entropy"] = cfg.entropy_coef * masked_mean(entropy, mask)
        if cfg.load_balance_coef > 0 and cfg.uses_aux_loss:
            kept_weight = weights.new_zeros(weights.shape).scatter_add(1, indices, weights)  # [T, E] by expert id
            fractions = masked_mean(kept_weight, mask)  # f_e: mean kept weight, not a one-hot count
            losses["load_balance"] = cfg.load_balance_coef * load_balance_loss(probs, fractions, mask)
        return RoutingDecision(indices, weights, losses, probs=probs, token_mask=mask)
