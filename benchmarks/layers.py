"""Layers under test: a MoLE layer per backend, a PEFT LoRA layer, the frozen base linear."""

from __future__ import annotations

import torch
from torch import nn

from molex.layer.experts import LoRAExperts
from molex.layer.linear import MoLELinear
from molex.routers import build_router


def base_linear(d_in: int, d_out: int, *, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, device=device, dtype=dtype)
    base.requires_grad_(False)
    return base


def mole_layer(
    base: nn.Linear, *, num_experts: int, rank: int, top_k: int, backend: str, seed: int = 0, share_A: bool = False
) -> MoLELinear:
    """A top-k routed MoLE layer on ``base`` (B initialised non-zero so the work is real); ``share_A``:
    one A shared by the experts."""
    torch.manual_seed(seed)
    experts = LoRAExperts(
        in_features=base.in_features,
        out_features=base.out_features,
        num_experts=num_experts,
        rank=rank,
        scaling=2.0,
        dtype=base.weight.dtype,
        device=base.weight.device,
        share_A=share_A,
    )
    with torch.no_grad():
        experts.lora_B.normal_(std=0.02)
    router = build_router("topk", in_features=base.in_features, num_experts=num_experts, top_k=top_k)
    router.to(base.weight.device)
    return MoLELinear(base, experts=experts, router=router, kernel_backend=backend)


def peft_lora_layer(base: nn.Linear, *, rank: int) -> nn.Module:
    """PEFT's own ``lora.Linear`` of rank ``rank`` on ``base``."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["base"])
    layer = LoraLinear(base, "default", config=config, r=rank, lora_alpha=2 * rank)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.02)
    return layer


def trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]
