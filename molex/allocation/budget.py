"""Split an integer budget across items in proportion to a signal, within per-item bounds, exactly.

Pure Python (exact rational arithmetic, no torch): the automatic layer-wise allocation
(``AllocationConfig(schedule="auto")``) uses it to turn per-layer signals into expert counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

__all__ = ["apportion"]


def _clipped_total(lam: Fraction, weights: list[Fraction], low: int, high: int) -> Fraction:
    return sum((min(max(lam * w, Fraction(low)), Fraction(high)) for w in weights), Fraction(0))


def _quotas(weights: list[Fraction], total: int, low: int, high: int) -> list[Fraction]:
    """Real shares ``clip(lam * w_i, low, high)`` summing to ``total`` exactly (``low * n <= total <= high * n``)."""
    if not weights:
        return []
    if not any(weights):
        weights = [Fraction(1)] * len(weights)
    positive = [w > 0 for w in weights]
    saturated = sum(high if p else low for p in positive)
    if total >= saturated:
        # the signalled items are all at the cap: the rest goes evenly to the ones without signal
        rest = _quotas([Fraction(0)] * positive.count(False), total - high * positive.count(True), low, high)
        spare = iter(rest)
        return [Fraction(high) if p else next(spare) for p in positive]
    # the clipped total is continuous, piecewise linear and non-decreasing in lam: find the segment holding
    # `total` among the breakpoints lam = low / w and high / w, then interpolate exactly within it
    points = sorted({Fraction(0)} | {Fraction(b) / w for w in weights if w > 0 for b in (low, high)})
    prev, start = points[0], _clipped_total(points[0], weights, low, high)
    for point in points:
        reached = _clipped_total(point, weights, low, high)
        if reached >= total:  # start < total here (else the previous point returned), so no division by zero
            if reached == total:
                return [min(max(point * w, Fraction(low)), Fraction(high)) for w in weights]
            lam = prev + (total - start) * (point - prev) / (reached - start)
            return [min(max(lam * w, Fraction(low)), Fraction(high)) for w in weights]
        prev, start = point, reached
    raise AssertionError("unreachable: the last breakpoint saturates every signalled item")


def apportion(signals: Sequence[float], total: int, *, low: int = 1, high: int | None = None) -> list[int]:
    """Integer counts ``n_i`` with ``sum(n) == total`` and ``low <= n_i <= high``, in proportion to ``signals``.

    The real shares are ``q_i = clip(lam * s_i, low, high)`` with ``lam`` chosen so they sum to ``total``
    (items the bounds clip give their excess to, or take their shortfall from, the others in proportion);
    each item gets ``floor(q_i)``, and the units left go one each to the largest fractional parts
    (largest remainder; ties to the lower index), so ``|n_i - q_i| < 1`` and ``s_i > s_j`` implies
    ``n_i >= n_j``. Items with a zero signal get ``low`` unless the others are all at ``high``; when every
    signal is zero the split is even. Exact rational arithmetic: no rounding can break the sum.

    Args:
        signals: one finite value ``>= 0`` per item.
        total: the integer budget, ``low * len(signals) <= total <= high * len(signals)``.
        low: the fewest units per item (``>= 0``).
        high: the most units per item (``None``: ``total``).
    """
    count = len(signals)
    if count == 0:
        raise ValueError("apportion needs at least one signal")
    high = total if high is None else high
    if low < 0 or high < low:
        raise ValueError(f"apportion needs 0 <= low <= high, got low={low}, high={high}")
    if not low * count <= total <= high * count:
        raise ValueError(
            f"cannot split {total} among {count} items with {low} to {high} each: the total must be between "
            f"{low * count} and {high * count}"
        )
    bad = [s for s in signals if not math.isfinite(s) or s < 0]
    if bad:
        raise ValueError(f"apportion signals must be finite and >= 0, got {bad[:3]}")
    quotas = _quotas([Fraction(s) for s in signals], total, low, high)
    counts = [math.floor(q) for q in quotas]
    left = total - sum(counts)
    # an item whose quota has a fractional part is below `high` (quotas never exceed it), so +1 stays in bounds
    order = sorted(range(count), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts
