"""Arrow: training-free token routing over a library of LoRAs (Ostapenko et al. 2024; PEFT's ``ArrowConfig``).

Per layer, each expert's prototype is the top right singular vector of its ``Delta W_e = B_e A_e``
(computed from the factors, never from the dense ``[out, in]`` product). A token ``x`` scores
``|<x, v_e>|`` against the unit prototypes (sign-free, since a singular vector has no sign; the
token is not normalised, exactly as PEFT 0.21 does, so the ranking is that of the absolute cosine),
keeps the ``top_k`` best and weighs them with ``softmax(score / temperature)`` over the kept.
GenKnowSub (subtracting the mean of "general" adapters) happens when the hub is fused:
``molex.fuse_adapters(..., router="arrow", general_adapters={...})``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from molex.core.refs import set_unregistered
from molex.layer.context import RoutingContext
from molex.routers.base import Router, RouterConfig, RoutingDecision, register_router
from molex.routers.topk import check_top_k

__all__ = ["ArrowConfig", "ArrowRouter", "arrow_prototypes"]


@dataclass
class ArrowConfig(RouterConfig):
    """Options of the ``arrow`` router.

    Attributes:
        top_k: experts per token (PEFT's default 3; at most the layer's experts).
        temperature: softmax temperature ``> 0`` over the kept scores.
        power_iterations: ``None`` (default) gives the exact top singular vector (a QR of ``A^T`` and an
            ``[out, r]`` SVD, float64); an int runs PEFT's power iteration for that many steps instead
            (PEFT uses 15), which reproduces PEFT's prototypes when ``rng_seed`` is PEFT's too.
        rng_seed: seed of the power iteration's start vector (only with ``power_iterations``).
    """

    top_k: int = 3
    temperature: float = 1.0
    power_iterations: int | None = None
    rng_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise ValueError(f"arrow top_k must be >= 1, got {self.top_k}")
        if not self.temperature > 0:
            raise ValueError(f"arrow temperature must be > 0, got {self.temperature}")
        if self.power_iterations is not None and self.power_iterations < 1:
            raise ValueError(f"arrow power_iterations must be >= 1 or None (exact SVD), got {self.power_iterations}")


@torch.no_grad()
def arrow_prototypes(
    lora_A: Tensor, lora_B: Tensor, *, power_iterations: int | None = None, rng_seed: int = 0
) -> Tensor:
    """Unit top right singular vectors ``[E, in]`` of ``Delta W_e = B_e^T A_e`` (molex layout).

    ``lora_A [E, r, in]`` (or ``[1, r, in]`` shared), ``lora_B [E, r, out]``. Exact (float64) by
    default; with ``power_iterations`` the same power iteration as PEFT's Arrow (float32, start vector
    from a generator seeded with ``rng_seed``). Sign is arbitrary: routing uses ``|score|``.
    """
    num_experts = lora_B.shape[0]
    A = lora_A.expand(num_experts, -1, -1) if lora_A.shape[0] == 1 else lora_A
    protos = []
    for e in range(num_experts):
        if power_iterations is None:
            a, b = A[e].double(), lora_B[e].double()  # a [r, in], b [r, out]
            q, r = torch.linalg.qr(a.T)  # a = r^T q^T, q [in, r]
            _, _, vh = torch.linalg.svd(b.T @ r.T, full_matrices=False)  # Delta W = (b^T r^T) q^T
            v = q @ vh[0]
            protos.append((v / v.norm().clamp_min(1e-300)).float())
        else:
            a, b = A[e].float(), lora_B[e].float()
            gram = b @ b.T  # PEFT's C = B^T B with B [out, r] is b b^T here
            gen = torch.Generator(device=a.device.type)
            gen.manual_seed(int(rng_seed))
            v = torch.randn(a.shape[1], dtype=torch.float32, device=a.device, generator=gen)
            v = v / (v.norm() + 1e-8)
            for _ in range(power_iterations):
                w = a.T @ (gram @ (a @ v))
                v = w / (w.norm() + 1e-8)
            protos.append(v)
    return torch.stack(protos)


@register_router
class ArrowRouter(Router):
    """Training-free: scores ``|x v_e|`` ``[T, E]`` against the pool's prototypes ``v [E, in]``; indices and
    weights ``[T, top_k]`` (softmax of the kept scores over ``temperature``). No parameters, no losses.

    The prototypes are computed from the pool bound by :meth:`bind_pool` on first use and again
    whenever the pool's factors change (tracked by their in-place version counters).
    """

    name = "arrow"
    config_class = ArrowConfig
    #: masked experts score -inf before the top-k (``molex.mask_experts`` sets ``expert_mask``)
    applies_expert_mask = True

    def __init__(self, *, in_features: int, num_experts: int, config: ArrowConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        check_top_k(config.top_k, num_experts, self.name)
        set_unregistered(self, "_pool", None)
        self._cache_key: tuple | None = None
        self._prototypes: Tensor | None = None
        self.expert_mask: Tensor | None = None

    def bind_pool(self, experts: nn.Module) -> None:
        set_unregistered(self, "_pool", experts)

    def prototypes(self) -> Tensor:
        """The current prototypes ``[E, in]`` (float32)."""
        pool = self._pool
        if pool is None:
            raise ValueError("the arrow router reads its experts' factors: use it inside a MoLE layer (molex.inject)")
        A, B = pool.lora_A, pool.lora_B
        key = (A.data_ptr(), A._version, B.data_ptr(), B._version, A.device, A.dtype)
        if key != self._cache_key or self._prototypes is None:
            cfg = self.config
            self._prototypes = arrow_prototypes(
                A.detach(), B.detach(), power_iterations=cfg.power_iterations, rng_seed=cfg.rng_seed
            )
            self._cache_key = key
        return self._prototypes

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        cfg = self.config
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = (x.float() @ self.prototypes().to(x.device).T).abs()  # [T, E]
        scores = self.mask_scores(scores)
        top, indices = scores.topk(cfg.top_k, dim=-1)
        weights = (top / cfg.temperature).softmax(dim=-1)
        probs = torch.zeros_like(scores).scatter_(-1, indices, weights)
        mask = context.token_mask(x.shape[0]) if context is not None else None
        return RoutingDecision(indices, weights, {}, probs=probs, token_mask=mask)

    def mask_scores(self, scores: Tensor) -> Tensor:
        """Masked experts (:func:`molex.mask_experts`) score ``-inf``: never chosen while another is left."""
        masked = self.expert_mask
        if masked is None:
            return scores
        return scores.masked_fill(masked.to(scores.device), float("-inf"))
