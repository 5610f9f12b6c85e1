"""AdaMix's consistency regularisation: two stochastic passes over one batch should predict alike.

With stochastic routing (:mod:`molex.routers.stochastic`) two forward passes over the same batch
take different experts. AdaMix adds the symmetric KL divergence between their output distributions
to the loss, weighted by the router's ``consistency_coef``; here the distributions are the
next-token distributions at every real (non-padding) position. The second pass makes each training
step cost two forward and two backward passes through the whole model (and twice the activation
memory). Needs :mod:`molex.inject`; not re-exported by :mod:`molex.training`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from molex.core.losses import masked_mean
from molex.layer.context import find_context
from molex.layer.inject import routers_of

__all__ = ["consistency_coef", "consistency_loss", "symmetric_kl"]


def symmetric_kl(logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean_t [KL(p_t || q_t) + KL(q_t || p_t)]`` over the positions where ``mask`` is true.

    ``logits_p``, ``logits_q``: ``[..., V]`` (computed in float32); ``mask``: bool ``[...]`` or
    ``None`` (every position). ``KL(p || q) + KL(q || p) = sum_v (p_v - q_v)(log p_v - log q_v)``.
    """
    log_p = logits_p.float().log_softmax(-1)
    log_q = logits_q.float().log_softmax(-1)
    per_position = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).reshape(-1)
    return masked_mean(per_position, None if mask is None else mask.reshape(-1).bool())


def consistency_coef(model: nn.Module) -> float:
    """The largest ``consistency_coef`` among the routers of ``model`` (0 when none asks for it)."""
    return max((float(getattr(r.config, "consistency_coef", 0.0)) for r in routers_of(model).values()), default=0.0)


def consistency_loss(model: nn.Module, outputs: Any, rerun: Callable[[], Any]) -> Tensor | None:
    """``coef * symmetric_kl`` between ``outputs.logits`` and the logits of ``rerun()`` (the same
    forward run again), over the real tokens of the batch; ``None`` when no router asks for it or
    the model is not training (inference uses merged experts: both passes would agree)."""
    coef = consistency_coef(model)
    if coef <= 0 or not model.training:
        return None
    context = find_context(model)
    mask = context.attention_mask if context is not None else None
    logits = outputs.logits
    second = rerun().logits
    if mask is not None and mask.shape != logits.shape[:-1]:
        mask = None  # packed rows carry no attention mask: every position is real
    return coef * symmetric_kl(logits, second, mask)
