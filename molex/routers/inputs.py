"""What a router's gate sees: the raw input, its direction, or the direction of its log-compressed channels.

``log_direction`` is the default ``topk`` router's input. Written with autograd's elementwise ops its
backward makes about thirty passes over the ``[T, d]`` input (each division by the per-token scale and norm
broadcasts and reduces again), more than the frozen base layer's matmuls cost on a CPU. The fused
:class:`_LogDirection` saves ``x`` and the result and makes the backward in a few passes;
:func:`log_direction_reference` is the plain autograd form it is tested against
(``tests/test_router_input_backward.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["INPUT_NORMS", "log_direction", "log_direction_reference", "router_input"]

#: how a router may prepare its input before the gate (``input_norm``), see :func:`router_input`
INPUT_NORMS = ("log", "l2", "none")

#: the per-token scale and the norm are clamped here (an all-zero padding row stays zero, gradient zero)
SCALE_EPS, NORM_EPS = 1e-12, 1e-6


def log_direction_reference(x: Tensor) -> Tensor:
    """``normalize(sign(x) log(1 + |x| / mean|x|))`` over the last dim, with autograd's own backward."""
    scale = x.abs().mean(dim=-1, keepdim=True).clamp_min(SCALE_EPS)
    z = torch.sign(x) * torch.log1p(x.abs() / scale)
    return nn.functional.normalize(z, dim=-1, eps=NORM_EPS)


def _log_direction_forward(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(u, mean|x|, ||z||)``, the scale and norm before clamping; in-place steps on fresh tensors only."""
    magnitude = x.abs()
    raw_scale = magnitude.mean(dim=-1, keepdim=True)
    z = torch.sign(x).mul_(magnitude.div_(raw_scale.clamp_min(SCALE_EPS)).log1p_())
    raw_norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    return z.div_(raw_norm.clamp_min(NORM_EPS)), raw_scale, raw_norm


class _LogDirection(torch.autograd.Function):
    """The same function as :func:`log_direction_reference`, with the backward derived by hand.

    With ``m = mean|x|``, ``z = sign(x) log1p(|x| / m)``, ``n = ||z||`` and ``u = z / n`` (per token):
    ``dL/dz = (g - u <g, u>) / n``; ``dz_i/dx_i = 1 / (m + |x_i|)`` for ``x_i != 0`` (0 at 0, as autograd's
    ``sign`` gives), and through ``m``: ``dz_i/dm = -x_i / (m (m + |x_i|))``, ``dm/dx_j = sign(x_j) / d``.
    A clamped scale or norm passes no gradient through itself, as ``clamp_min`` does.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        u, raw_scale, raw_norm = _log_direction_forward(x)
        scale, norm = raw_scale.clamp_min(SCALE_EPS), raw_norm.clamp_min(NORM_EPS)
        ctx.save_for_backward(x, u, scale, norm, raw_scale >= SCALE_EPS, raw_norm >= NORM_EPS)
        return u

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, u, scale, norm, scale_free, norm_free = ctx.saved_tensors
        along = torch.linalg.vecdot(grad, u).unsqueeze(-1) * norm_free  # the clamped norm is a constant
        q = torch.addcmul(grad, u, along, value=-1).div_(norm)  # dL/dz
        q.div_(x.abs().add_(scale)).masked_fill_(x == 0, 0.0)  # dL/dz * dz/dx, directly
        through_scale = torch.linalg.vecdot(q, x).unsqueeze(-1).mul_(scale_free / (-scale * x.shape[-1]))
        return q.addcmul_(torch.sign(x), through_scale)


def log_direction(x: Tensor) -> Tensor:
    """``normalize(sign(x) log(1 + |x| / mean|x|))`` over the last dim of ``x [..., d]`` (fused backward)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _LogDirection.apply(x)
    return _log_direction_forward(x)[0]  # decoding: no autograd bookkeeping per layer and step


def router_input(x: Tensor, norm: str) -> Tensor:
    """The gate's view of ``x [T, d]`` (float32): ``"none"``: ``x``; ``"l2"``: ``x / ||x||``, each token's
    direction; ``"log"``: the direction of ``sign(x) log(1 + |x| / mean|x|)``, each channel compressed
    relative to the token's mean magnitude first.

    Why: a router's logits, and the size of its optimiser steps, grow with its input. In SmolLM2-135M the
    inputs of the last layers' ``down_proj`` reach 2,370 where attention inputs stay near 10, so one
    router learning rate cannot suit every layer (``"l2"`` fixes that). And a few "massive" channels carry
    up to 99% of a hidden state's energy in every token alike, so raw directions of different tokens are
    close (mean cosine 0.42-0.68 between tokens of the deeper layers' attention inputs) and a router
    cannot tell them apart; compressing each channel first brings that to 0.18-0.26 (``"log"``;
    ``python -m benchmarks.router_inputs``).
    """
    x = x.float()
    if norm == "log":
        return log_direction(x)
    if norm == "l2":
        return nn.functional.normalize(x, dim=-1, eps=NORM_EPS)
    return x
