"""Shared helpers for the kernel tests: a float64 per-token reference and random problems."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from molex.routers.base import RoutingDecision
from tests.helpers.models import assert_close


def per_token_delta(x: Tensor, A: Tensor, B: Tensor, indices: Tensor, weights: Tensor, scaling) -> Tensor:
    """``delta[t] = sum_j w[t, j] s_e B_e^T A_e x[t]`` token by token (no sort, no grouping)."""
    scale = scaling[indices] if isinstance(scaling, Tensor) else torch.full_like(weights, scaling)
    hidden = torch.einsum("ti,tjri->tjr", x, A[indices])  # [T, k, r]
    hidden = hidden * (weights * scale.to(weights.dtype)).unsqueeze(-1)
    return torch.einsum("tjr,tjro->to", hidden, B[indices])


@dataclass
class Problem:
    x: Tensor
    A: Tensor
    B: Tensor
    indices: Tensor
    weights: Tensor
    scaling: float | Tensor
    tokens_per_sequence: int | None = None

    def decision(self, weights: Tensor | None = None) -> RoutingDecision:
        w = self.weights if weights is None else weights
        return RoutingDecision(self.indices, w, tokens_per_sequence=self.tokens_per_sequence)

    def token_indices(self) -> Tensor:
        return self.decision().token_indices()


def make_problem(
    *,
    tokens: int,
    in_features: int,
    out_features: int,
    num_experts: int,
    rank: int,
    top_k: int,
    seed: int = 0,
    skew: bool = False,
    per_expert_scaling: bool = False,
    tokens_per_sequence: int | None = None,
) -> Problem:
    """Random float64 problem. ``skew``: every slot routes to expert 0 (all others empty).
    Weights are unnormalised (uniform in [0.1, 2)); ids may repeat within a row."""
    g = torch.Generator().manual_seed(seed)
    rows = tokens if tokens_per_sequence is None else tokens // tokens_per_sequence
    x = torch.randn(tokens, in_features, generator=g, dtype=torch.float64)
    A = torch.randn(num_experts, rank, in_features, generator=g, dtype=torch.float64) / in_features**0.5
    B = torch.randn(num_experts, rank, out_features, generator=g, dtype=torch.float64) / rank**0.5
    if skew:
        indices = torch.zeros(rows, top_k, dtype=torch.long)
    else:
        indices = torch.randint(0, num_experts, (rows, top_k), generator=g)
    weights = 0.1 + 1.9 * torch.rand(rows, top_k, generator=g, dtype=torch.float64)
    scaling: float | Tensor = 0.5
    if per_expert_scaling:
        scaling = 0.25 + torch.rand(num_experts, generator=g, dtype=torch.float64)
    return Problem(x, A, B, indices, weights, scaling, tokens_per_sequence)


def run_with_grads(
    fn, problem: Problem, dtype: torch.dtype, grad_out: Tensor, device: str | torch.device = "cpu"
) -> list[Tensor]:
    """``[out, grad_x, grad_A, grad_B, grad_weights]`` (on CPU) of ``fn(x, A, B, decision, scaling)`` run
    on ``device`` in ``dtype`` (routing weights stay float64/float32 as routers produce them)."""
    x, A, B = (t.detach().to(device, dtype).requires_grad_() for t in (problem.x, problem.A, problem.B))
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = problem.weights.detach().to(device, wdtype).requires_grad_()
    scaling = problem.scaling
    if isinstance(scaling, Tensor):
        scaling = scaling.to(device, wdtype)
    decision = RoutingDecision(problem.indices.to(device), weights, tokens_per_sequence=problem.tokens_per_sequence)
    out = fn(x, A, B, decision, scaling)
    leaves = (x, A, B, weights)
    if not out.requires_grad:  # only acceptable when there is nothing to differentiate
        assert out.numel() == 0, "backend output lost its autograd graph"
        return [out.cpu(), *(torch.zeros_like(t).cpu() for t in leaves)]
    grads = torch.autograd.grad((out * grad_out.to(out)).sum(), list(leaves), allow_unused=True)
    filled = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True)]
    return [t.cpu() for t in (out, *filled)]


def expected(problem: Problem, grad_out: Tensor) -> list[Tensor]:
    def fn(x, A, B, decision, scaling):
        return per_token_delta(x, A, B, decision.token_indices(), decision.token_weights(), scaling)

    return run_with_grads(fn, problem, torch.float64, grad_out)


def check_all(actual: list[torch.Tensor], reference: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Outputs and gradients, relative to each reference tensor's magnitude, within the dtype's tolerance."""
    for name, got, want in zip(("out", "grad_x", "grad_A", "grad_B", "grad_w"), actual, reference, strict=True):
        assert got.shape == want.shape, name
        scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
        assert_close(got / scale, want / scale, dtype)
