"""``MoLELinear``: a frozen linear layer plus a routed pool of LoRA experts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from molex.core.decision import RoutingDecision
from molex.core.refs import set_unregistered
from molex.kernels import mole_delta
from molex.layer.expert_mask import apply_expert_mask
from molex.layer.experts import LoRAExperts
from molex.routers.base import Router

if TYPE_CHECKING:
    from molex.layer.context import RoutingContext

__all__ = ["MoLELinear", "is_supported_linear", "linear_dims"]


def is_supported_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a GPT-2 style ``Conv1D`` (``weight [in, out]``)."""
    if isinstance(module, nn.Linear):
        return True
    return (
        type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2
    )


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported linear module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_supported_linear(module):
        rows, cols = module.weight.shape  # Conv1D stores weight as [in, out]
        return rows, cols
    raise TypeError(
        f"{type(module).__name__} cannot host LoRA experts: molex wraps nn.Linear and GPT-2 style Conv1D layers; "
        "target the linear layers inside it instead"
    )


class MoLELinear(nn.Module):
    """``y = base(x) + sum_{e in S(x)} w_e(x) * s_e * B_e A_e dropout(x)``.

    Args:
        base_layer: the frozen ``nn.Linear`` / ``Conv1D`` being wrapped (kept as ``base_layer``).
        experts: the LoRA expert pool (``A [E, r, in]``, ``B [E, r, out]``, ``scaling [E]``).
        router: chooses experts per token (or per sequence). A router shared with other layers
            (block-level routing) is passed through ``router_view`` instead, so that its weights
            are stored once, on the block.
        dropout: LoRA dropout probability on the experts' input.
        kernel_backend: expert op backend name or ``"auto"``.

    Input ``x [..., in]``, output ``[..., out]``; the router runs in float32 and the experts in
    their own dtype, the result is cast back to the base output's dtype.

    A quantized base (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, a torchao weight-only ``nn.Linear``,
    see :mod:`molex.quant`) is called as it is; its packed weight is never read or changed here.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        experts: LoRAExperts,
        router: Router | None,
        dropout: float = 0.0,
        kernel_backend: str = "auto",
        router_view: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (router is None) == (router_view is None):
            raise ValueError("MoLELinear needs exactly one of `router` (its own) or `router_view` (a shared one)")
        in_features, out_features = linear_dims(base_layer)
        if experts.lora_A.shape[-1] != in_features or experts.lora_B.shape[-1] != out_features:
            raise ValueError(
                f"expert pool is {experts.lora_A.shape[-1]} -> {experts.lora_B.shape[-1]} but the base layer is "
                f"{in_features} -> {out_features}"
            )
        self.base_layer = base_layer
        self.experts = experts
        self.router = router
        if router is not None:
            router.bind_pool(experts)
        # a shared router is not a submodule here: its parameters belong to the block that owns it
        # (an unregistered reference, see molex.core.refs)
        set_unregistered(self, "_router_view", router_view)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.kernel_backend = kernel_backend
        self.in_features, self.out_features = in_features, out_features
        self.context: RoutingContext | None = None  # set by molex.inject
        self.last_decision: RoutingDecision | None = None
        self.expert_mask: Tensor | None = None  # bool [E], set by molex.mask_experts

    @property
    def active_router(self) -> nn.Module:
        return self.router if self.router is not None else self._router_view

    def route(self, x: Tensor) -> RoutingDecision:
        """Routing decision for flattened inputs ``x [T, in]`` (without the experts of :func:`molex.mask_experts`)."""
        router = self.active_router
        decision = router(x, self.context)
        if self.expert_mask is not None and not getattr(router, "applies_expert_mask", False):
            decision = apply_expert_mask(decision, self.expert_mask, router.name)
        return decision

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        decision = self.route(flat)
        self.last_decision = decision
        experts = self.experts
        hidden = self.lora_dropout(flat).to(experts.lora_A.dtype)
        expert_losses = getattr(self.active_router, "expert_losses", None)
        if expert_losses is not None:
            extra = expert_losses(hidden, experts, decision)
            if extra:  # a new dict: a shared (block / model) decision's losses must not grow per layer
                decision.aux_losses = {**decision.aux_losses, **extra}
        kernel_inputs = getattr(self.active_router, "kernel_inputs", None)
        if kernel_inputs is None:  # a shared (block / model) router's view: the pool's own factors
            A, B, scaling, applied = experts.lora_A, experts.lora_B, experts.scaling, decision
        else:
            A, B, scaling, applied = kernel_inputs(experts, decision, self.context)
        delta = mole_delta(hidden, A, B, applied, scaling, self.kernel_backend)
        return result + delta.view(*x.shape[:-1], self.out_features).to(result.dtype)

    @torch.no_grad()
    def routing_stats(self) -> dict[str, Tensor]:
        """Statistics of the last forward: ``load [E]`` (mean gate per expert over real tokens),
        ``entropy`` (mean router entropy normalised by ``log E``, when the router has probabilities),
        ``active`` (mean number of experts with a non-zero gate per real token) and ``dropped`` (share
        of real tokens whose total weight is zero)."""
        decision = self.last_decision
        if decision is None:
            return {}
        num_experts = self.experts.num_experts
        gate = decision.to_dense(num_experts).float()
        mask = decision.token_mask
        if mask is not None and mask.shape[0] == gate.shape[0]:
            gate = gate[mask]
        stats = {
            "load": gate.mean(0) if gate.shape[0] else gate.sum(0),
            "active": (gate != 0).sum(-1).float().mean() if gate.shape[0] else gate.new_zeros(()),
            "dropped": (gate.sum(-1) == 0).float().mean(),
        }
        if decision.probs is not None and num_experts > 1:
            probs = decision.probs.float()
            if decision.is_per_sequence:
                probs = probs.repeat_interleave(decision.tokens_per_sequence, dim=0)
            if mask is not None and mask.shape[0] == probs.shape[0]:
                probs = probs[mask]
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(num_experts)))
            stats["entropy"] = entropy.mean() if entropy.numel() else entropy.sum()
        return stats

    def extra_repr(self) -> str:
        return f"kernel_backend={self.kernel_backend!r}"
