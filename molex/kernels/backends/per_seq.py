"""Per-sequence backend: routing constant over each sequence (MiLoRA, DLP, fused hubs at inference).

A per-sequence decision holds ``indices, weights [B, k]`` and ``tokens_per_sequence = S``; the
tokens of ``x [T, in]`` are laid out ``[B, S]``. Each sequence gathers its ``k`` experts' ``A``
and ``B`` into ``[B, k*r, in]`` / ``[B, k*r, out]`` and runs two ``bmm``:
``h = x_b @ A_b^T`` (``[B, S, k*r]``), scale each expert's ``r`` columns by its weight, then
``h @ B_b``. FLOPs ``2 T k r (in + out)`` like a grouped GEMM, but no sort and no host sync, and a
fixed graph (``torch.compile`` friendly).

A per-token decision has no sequence structure to exploit (a ``[T, k*r, in]`` weight gather would
cost far more than the matmuls), so it is computed by the ``grouped`` backend instead; the cost
model never selects ``per_seq`` for per-token decisions.
"""

from __future__ import annotations

import math

from torch import Tensor

from molex.core.decision import RoutingDecision
from molex.kernels.backends.grouped import grouped_delta
from molex.kernels.common import scaled_weights
from molex.kernels.cost import Workload
from molex.kernels.registry import Backend, register_backend


def per_seq_delta(x: Tensor, A: Tensor, B: Tensor, decision: RoutingDecision, scaling: float | Tensor) -> Tensor:
    """Shapes: ``x [T, in]``, ``A [E, r, in]``, ``B [E, r, out]`` -> ``[T, out]`` (``T = B * S``)."""
    if not decision.is_per_sequence:
        return grouped_delta(x, A, B, decision, scaling)
    indices = decision.indices
    weights = scaled_weights(indices, decision.weights, scaling)
    num_seq, top_k = indices.shape
    seq_len = decision.tokens_per_sequence
    _, rank, in_features = A.shape
    out_features = B.shape[-1]
    a = A[indices].reshape(num_seq, top_k * rank, in_features)  # [B, k*r, in]
    b = B[indices].reshape(num_seq, top_k * rank, out_features)  # [B, k*r, out]
    hidden = x.view(num_seq, seq_len, in_features).bmm(a.transpose(1, 2))  # [B, S, k*r]
    # weighting the k*r hidden columns is cheaper than weighting B (S < out) or x (S * in)
    gate = weights.to(x.dtype).repeat_interleave(rank, dim=1).unsqueeze(1)  # [B, 1, k*r]
    return (hidden * gate).bmm(b).view(num_seq * seq_len, out_features)


def per_seq_cost(w: Workload) -> float:
    """Active FLOPs; ``T d + 2 T k r + 2 B k r d`` elements (the weight gather); 6 ops, no sync.
    Never chosen for per-token decisions."""
    if w.num_sequences is None:
        return math.inf
    flops = w.active_flops
    elems = w.tokens * w.d + 2 * w.slots * w.rank + 2 * w.num_sequences * w.top_k * w.rank * w.d
    return w.hardware.seconds(flops, elems, 6, 0)


register_backend(
    Backend(
        "per_seq",
        per_seq_delta,
        "per-sequence routing: gather each sequence's experts, two bmm",
        cost=per_seq_cost,
    )
)
