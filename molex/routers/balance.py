"""Expert balancing for token-choice routers: the auxiliary loss, a loss-free bias, or nothing.

``balance`` (an option of ``topk``, ``switch`` and ``dynmole``):

* ``"aux"`` (the default): the router's load-balance loss, weighted by its ``load_balance_coef``;
* ``"bias"``: the auxiliary-loss-free scheme of DeepSeek-V3 (Wang et al., 2024, "Auxiliary-Loss-Free
  Load Balancing Strategy for Mixture-of-Experts"): a per-expert bias ``b [E]`` is added to the router's
  probabilities **to choose** the experts only (the mixing weights still come from the unbiased
  probabilities), and after each optimiser step :func:`update_balance_biases` moves it by
  ``b_e += gamma * sign(mean_e' n_e' - n_e)``, where ``n_e`` counts the (real token, slot) choices of
  expert ``e`` since the last update. No gradient reaches ``b``; it is a buffer saved with the adapter,
  and it stays fixed at inference (choices are counted only in training mode);
* ``"none"``: no load-balance loss and no bias.

The load-balance coefficient counts only with ``"aux"`` and ``balance_gamma`` only with ``"bias"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from molex.core.model_argument import takes_model
from molex.routers.base import Router, RouterConfig

__all__ = ["BALANCE_MODES", "BalanceOptions", "BiasBalancedRouter", "update_balance_biases"]

#: the values of the ``balance`` option
BALANCE_MODES = ("aux", "bias", "none")
_BIAS = "balance_bias"
_COUNTS = "_balance_counts"


@dataclass
class BalanceOptions(RouterConfig):
    """Mixin for token-choice routers: how the experts' load is balanced.

    Attributes:
        balance: ``"aux"`` (load-balance loss), ``"bias"`` (DeepSeek-V3's loss-free bias) or ``"none"``.
        balance_gamma: bias update step ``gamma >= 0`` per optimiser step (``"bias"`` only; DeepSeek-V3
            uses 1e-3). The bias is added to probabilities in ``[0, 1]``, so a router that gives one
            expert probability ``p`` more than another needs about ``p / (2 gamma)`` steps to even them.
    """

    balance: str = "aux"
    balance_gamma: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.balance not in BALANCE_MODES:
            raise ValueError(
                f"balance={self.balance!r} is not a balancing mode; use one of {', '.join(BALANCE_MODES)} "
                "(aux: load-balance loss, bias: loss-free bias, none: neither)"
            )
        gamma = self.balance_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < math.inf:
            raise ValueError(
                f"balance_gamma must be a finite number >= 0 (the bias step per optimiser step, e.g. 1e-3), "
                f"got {self.balance_gamma!r}"
            )

    @property
    def uses_aux_loss(self) -> bool:
        """Whether the router's load-balance loss is on (``balance="aux"``)."""
        return self.balance == "aux"


class BiasBalancedRouter(Router):
    """Base class of the token-choice routers that take :class:`BalanceOptions`.

    With ``balance="bias"`` the router holds ``balance_bias [E]`` (a float32 buffer, in ``state_dict``
    and so in saved adapters) and ``_balance_counts [E]`` (a non-persistent buffer: choices counted
    since the last update). Other modes register neither, so adapters saved before the option existed
    load unchanged.
    """

    config: BalanceOptions

    def __init__(self, *, in_features: int, num_experts: int, config: BalanceOptions) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        if config.balance == "bias":
            self.register_buffer(_BIAS, torch.zeros(num_experts))
            self.register_buffer(_COUNTS, torch.zeros(num_experts), persistent=False)

    @property
    def uses_bias(self) -> bool:
        return self.config.balance == "bias"

    def choice_scores(self, probs: Tensor) -> Tensor:
        """``probs [T, E]`` plus the balance bias, for choosing experts (never for the weights)."""
        if not self.uses_bias:
            return probs
        return probs + getattr(self, _BIAS).to(probs.dtype)

    @torch.no_grad()
    def record_choices(self, indices: Tensor, token_mask: Tensor | None, kept: Tensor | None = None) -> None:
        """Count the experts chosen for real tokens (training only; on the device, no host sync).

        ``indices [T, k]`` are the chosen expert ids; ``kept [T, k]`` (bool) marks the slots actually
        used where a decision pads its rows (DynMoLE's dropped experts); ``token_mask [T]`` the real tokens.
        """
        if not (self.uses_bias and self.training):
            return
        counted = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
        if kept is not None:
            counted = counted * kept
        if token_mask is not None:
            counted = counted * token_mask.to(counted.dtype).unsqueeze(-1)
        counts = getattr(self, _COUNTS)
        counts.scatter_add_(0, indices.reshape(-1), counted.reshape(-1))

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """``b_e += gamma * sign(mean(n) - n_e)`` from the choices counted since the last call, then reset
        the counts. Without counted choices (no training forward since) nothing moves. Under
        ``torch.distributed`` the counts of every rank are added first, so all ranks keep one bias."""
        if not self.uses_bias:
            return
        counts = getattr(self, _COUNTS)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        step = torch.sign(counts.mean() - counts) * self.config.balance_gamma
        getattr(self, _BIAS).add_(step)  # all counts zero: sign(0) = 0, the bias stays
        counts.zero_()


@takes_model
def update_balance_biases(model: nn.Module) -> int:
    """Apply the loss-free balance update to every router of ``model`` with ``balance="bias"``; call it
    after each optimiser step (``MoLEModule`` and :func:`molex.training.train_steps` do). Returns how many
    routers were updated. Routers in eval mode are left alone: the bias is frozen at inference."""
    updated = 0
    for module in model.modules():
        if isinstance(module, BiasBalancedRouter) and module.uses_bias and module.training:
            module.update_balance_bias()
            updated += 1
    return updated
