"""A pool of LoRA experts for one linear layer, stored stacked for the expert op."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LoRAExperts"]


class LoRAExperts(nn.Module):
    """``E`` LoRA experts of rank ``r`` for an ``in_features -> out_features`` linear map.

    Parameters ``lora_A [E, r, in]`` (Kaiming-uniform, as LoRA) and ``lora_B [E, r, out]``
    (zeros, so a fresh pool adds nothing). ``scaling [E]`` is a buffer: ``alpha / r`` (or
    ``alpha / sqrt(r)`` with rsLoRA) for every expert, or each expert's own scaling when the
    pool holds imported adapters.

    With ``share_A=True`` the experts share one down-projection (HydraLoRA, MTL-LoRA):
    ``lora_A`` is ``[1, r, in]`` and only the ``E`` up-projections differ. The expert op computes
    the shrink ``x A^T`` once (``r`` wide instead of ``E r``) for such pools.
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        num_experts: int,
        rank: int,
        scaling: float | Tensor,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        share_A: bool = False,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        factory = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.empty(1 if share_A else num_experts, rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, out_features, **factory))
        scale = torch.as_tensor(scaling, dtype=torch.float32, device=device).expand(num_experts).clone()
        self.register_buffer("scaling", scale)
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.lora_B.shape[0]

    @property
    def shares_a(self) -> bool:
        """Whether the experts share one down-projection (``lora_A [1, r, in]``)."""
        return self.lora_A.shape[0] == 1 and self.lora_B.shape[0] > 1

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for expert in range(self.lora_A.shape[0]):
            # same init as nn.Linear / PEFT's LoRA A: kaiming_uniform_(a=sqrt(5)) on [r, in]
            nn.init.kaiming_uniform_(self.lora_A[expert], a=math.sqrt(5))
        self.lora_B.zero_()

    def extra_repr(self) -> str:
        shared = ", share_A=True" if self.shares_a else ""
        return (
            f"num_experts={self.num_experts}, rank={self.rank}, in_features={self.lora_A.shape[-1]}, "
            f"out_features={self.lora_B.shape[-1]}{shared}"
        )
