"""Three numbers that say whether a trained mixture routes: dead experts, collapsed layers, router entropy.

A mixture is healthy when its routers use their experts (few dead experts), no layer with several
experts sends nearly everything to one of them (no collapse), and the routers still decide per token
(mean normalised entropy well below 1, the value of a router that spreads every token evenly). The
definitions are :func:`molex.routing_health`'s, applied to a :class:`RoutingReport` collected over
held-out data (``molex-train`` uses its validation split and writes the result to ``metrics.json``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from molex.evaluation.analysis import RoutingReport
from molex.layer.health import expert_shares

__all__ = ["COLLAPSE_MIN_EXPERTS", "COLLAPSE_SHARE", "MixtureHealth", "mixture_health"]

#: a layer whose largest expert share is above this has collapsed onto that expert
COLLAPSE_SHARE = 0.9
#: collapse is counted among layers with at least this many experts (with 2 experts a 0.9 share is a
#: strong preference, not a pool reduced to one)
COLLAPSE_MIN_EXPERTS = 4


@dataclass(frozen=True)
class MixtureHealth:
    """Routing health of a whole model over one dataset.

    Attributes:
        experts: experts over the layers that route (layers with 2 or more experts).
        dead_experts: those with a share of the routed weight below ``1 / (10 E)``.
        dead_fraction: ``dead_experts / experts``.
        collapsed_layers: names of the layers with ``COLLAPSE_MIN_EXPERTS`` or more experts whose largest
            share is above ``COLLAPSE_SHARE``.
        router_entropy: mean over those layers of the mean per-token router entropy / ``log E``
            (``None`` for routers without probabilities).
        specialisation: mean normalised ``I(task; expert)`` (``None`` without task labels).
    """

    experts: int
    dead_experts: int
    dead_fraction: float
    collapsed_layers: tuple[str, ...]
    router_entropy: float | None
    specialisation: float | None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "collapsed_layers": list(self.collapsed_layers)}

    def line(self) -> str:
        """One line for a log: ``12 of 444 experts dead (2.7%), 0 collapsed layers, router entropy 0.48``."""
        entropy = "n/a" if self.router_entropy is None else f"{self.router_entropy:.2f}"
        return (
            f"{self.dead_experts} of {self.experts} experts dead ({100 * self.dead_fraction:.1f}%), "
            f"{len(self.collapsed_layers)} collapsed layers, router entropy {entropy}"
        )


def mixture_health(report: RoutingReport) -> MixtureHealth:
    """Summarise ``report`` (see :class:`MixtureHealth`); layers with a single expert do not count."""
    experts = dead = 0
    collapsed: list[str] = []
    entropies: list[float] = []
    spec = report.specialisation()
    spec_routed: list[float] = []
    for i, (name, load) in enumerate(zip(report.layers, report.load, strict=True)):
        if load.numel() < 2:
            continue
        _, largest, layer_dead = expert_shares(load)
        experts += load.numel()
        dead += layer_dead
        if load.numel() >= COLLAPSE_MIN_EXPERTS and largest > COLLAPSE_SHARE:
            collapsed.append(name)
        if not math.isnan(report.entropy[i]):
            entropies.append(report.entropy[i])
        if spec:
            spec_routed.append(spec[i])
    return MixtureHealth(
        experts=experts,
        dead_experts=dead,
        dead_fraction=round(dead / experts, 5) if experts else 0.0,
        collapsed_layers=tuple(collapsed),
        router_entropy=round(sum(entropies) / len(entropies), 5) if entropies else None,
        specialisation=round(sum(spec_routed) / len(spec_routed), 5) if spec_routed else None,
    )
