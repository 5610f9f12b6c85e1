"""Top-p (nucleus) expert selection over sorted router probabilities, shared by DynMoLE and DLP-LoRA.

The two papers differ on the expert whose cumulative probability crosses ``top_p``: DynMoLE
excludes it (:func:`top_p_keep`), DLP-LoRA includes it (:func:`top_p_inclusive`). Both compare
float32 cumulative sums against ``top_p`` with the same slack, :data:`CUMSUM_TOLERANCE`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["CUMSUM_TOLERANCE", "top_p_inclusive", "top_p_keep"]

#: slack on ``cumsum <= top_p`` so that float32 rounding of an exact boundary keeps the expert
CUMSUM_TOLERANCE = 1e-6


def top_p_keep(sorted_probs: Tensor, top_p: float, keep_top_k: int) -> Tensor:
    """Bool ``[T, E]``: which of the descending-sorted probabilities the DynMoLE top-p rule keeps.

    An expert is kept while the cumulative sum up to it is ``<= top_p``; the first ``keep_top_k``
    are always kept.
    """
    cumulative = sorted_probs.cumsum(dim=-1)
    rank = torch.arange(sorted_probs.shape[-1], device=sorted_probs.device)
    return (cumulative <= top_p + CUMSUM_TOLERANCE) | (rank < keep_top_k)


def top_p_inclusive(probs: Tensor, top_p: float) -> tuple[Tensor, Tensor, Tensor]:
    """DLP-LoRA top-p over ``probs [B, E]``: ``(indices [B, E], weights [B, E], keep [B, E])``.

    Experts sorted by probability; an expert is kept while the mass before it is below ``top_p``
    (so the one crossing ``top_p`` is kept); weights are the softmax of the kept probabilities,
    0 for the rest.
    """
    sorted_probs, indices = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = before < top_p - CUMSUM_TOLERANCE
    keep[:, 0] = True
    weights = sorted_probs.masked_fill(~keep, -math.inf).softmax(dim=-1)
    return indices, weights, keep
