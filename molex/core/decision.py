"""``RoutingDecision``: the contract between routers (which make it) and kernels (which apply it).

It sits below both: routers build decisions, the expert op (:mod:`molex.kernels`) reads only
their index and weight tensors, and neither side imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["RoutingDecision", "repeat_rows"]


@dataclass
class RoutingDecision:
    """Which experts each token uses, and with what weight.

    Token-level decisions hold ``indices [T, k]`` (int64) and ``weights [T, k]`` (float). A
    per-sequence decision (prompt- or sentence-level routers) holds ``indices [B, k]`` and
    ``weights [B, k]`` with ``tokens_per_sequence = S``; its tokens are laid out ``[B, S]``.
    :meth:`token_indices` / :meth:`token_weights` always give the per-token view ``[T, k]``.

    ``aux_losses`` are already multiplied by their coefficients: the training loss adds their sum.
    A weight of zero means "no contribution" (e.g. a token dropped by a capacity limit).
    Repeated expert ids within a row are allowed: their contributions add up.
    """

    indices: Tensor
    weights: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    tokens_per_sequence: int | None = None
    #: full router distribution ``[rows, E]`` (float32) when the router has one; for statistics
    probs: Tensor | None = None
    #: bool ``[T]`` mask of real tokens this decision was computed with; for statistics
    token_mask: Tensor | None = None
    _dense: tuple[int, Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.indices.shape != self.weights.shape or self.indices.dim() != 2:
            raise ValueError(
                f"RoutingDecision needs indices and weights of one shape [rows, k]; got "
                f"{tuple(self.indices.shape)} and {tuple(self.weights.shape)}"
            )

    @property
    def is_per_sequence(self) -> bool:
        return self.tokens_per_sequence is not None

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]

    @property
    def num_tokens(self) -> int:
        rows = self.indices.shape[0]
        return rows * self.tokens_per_sequence if self.is_per_sequence else rows

    def token_indices(self) -> Tensor:
        """``[T, k]`` expert ids per token."""
        if not self.is_per_sequence:
            return self.indices
        return repeat_rows(self.indices, self.tokens_per_sequence)

    def token_weights(self) -> Tensor:
        """``[T, k]`` routing weights per token."""
        if not self.is_per_sequence:
            return self.weights
        return repeat_rows(self.weights, self.tokens_per_sequence)

    def to_dense(self, num_experts: int) -> Tensor:
        """``[T, E]`` gate matrix (repeated ids add up); differentiable in the weights.

        Without autograd the result is kept: a decision reused for many decode steps (sequence-level
        routers) then builds its gate once.
        """
        cached = self._dense
        if cached is not None and cached[0] == num_experts:
            return cached[1]
        idx, w = self.indices, self.weights
        dense = w.new_zeros(idx.shape[0], num_experts).scatter_add(1, idx, w)
        if self.is_per_sequence:
            dense = repeat_rows(dense, self.tokens_per_sequence)
        if not (torch.is_grad_enabled() and w.requires_grad):
            self._dense = (num_experts, dense)
        return dense


def repeat_rows(values: Tensor, times: int) -> Tensor:
    """Each row ``times`` times in a row (``repeat_interleave`` on dim 0, without its cost at ``times = 1``)."""
    if times == 1:
        return values
    rows = values.shape[0]
    return values.unsqueeze(1).expand(rows, times, *values.shape[1:]).reshape(rows * times, *values.shape[1:])
