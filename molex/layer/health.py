"""Routing health: is every router still using its experts?

For each MoLE layer with its own router, and once for each block- or model-level router (MiLoRA,
DLP-LoRA: the unit that decides), :func:`routing_health` reports

* ``load``: each expert's share of the routed weight over real tokens (padding excluded through the
  attention mask): the mean gate per expert of :meth:`MoLELinear.routing_stats` /
  :class:`molex.evaluation.analysis.RoutingReport`, divided by its sum, so the shares add up to 1;
* ``largest_share``: the largest of them (1/E is perfectly even, 1 is a collapsed router);
* ``dead_experts``: experts whose share is below ``1 / (10 E)`` (:data:`DEAD_SHARE`);
* ``entropy``: the mean over real tokens of the router's entropy divided by ``log E``, as in
  ``routing_stats`` (``None`` for routers without probabilities);
* ``tiny_margin``: the share of real tokens whose two most probable experts are within
  :data:`TINY_MARGIN` of each other in log-probability (``log p_1 - log p_2 < 0.1``: the top expert is
  less than 1.105 times as likely as the runner-up, so the router cannot really decide between them;
  for a softmax router this is the gap between the two largest logits). ``None`` without probabilities
  or with one expert.

After :func:`enable_routing_health` every forward (in training mode, or every forward with
``training_only=False``) adds to a window of running sums kept on the model's device, with no host
synchronisation (no ``.item()``, no boolean indexing); :func:`routing_health` reads the window, with one
transfer to the host, and starts a new one. Without it, or for a layer that has not run since the last
read, the report covers the last forward. With the window the entropy and margin are means over all the
window's tokens (a mean of per-batch means when the batches have equal numbers of real tokens).
Disabled (the default), nothing is computed and nothing is hooked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from molex.core.decision import RoutingDecision, repeat_rows
from molex.core.model_argument import takes_model
from molex.core.refs import get_unregistered, pop_unregistered, set_unregistered
from molex.layer.inject import mole_layers

__all__ = [
    "DEAD_SHARE",
    "TINY_MARGIN",
    "LayerHealth",
    "RoutingHealth",
    "disable_routing_health",
    "enable_routing_health",
    "expert_shares",
    "has_routing_reads",
    "routing_health",
]

#: an expert whose share of the routed weight is below ``DEAD_SHARE / E`` is counted as dead
DEAD_SHARE = 0.1
#: log-probability gap between a token's two most probable experts under which the router is undecided
TINY_MARGIN = 0.1
_STATE_ATTR = "_molex_routing_health"


def expert_shares(load: Tensor) -> tuple[Tensor, float, int]:
    """``(share [E], largest share, dead experts)`` from a load ``[E]`` (any non-negative weights per
    expert): ``share = load / load.sum()`` (all zero when nothing was routed), dead = ``share < DEAD_SHARE / E``."""
    load = load.double()
    share = load / load.sum() if float(load.sum()) > 0 else torch.zeros_like(load)
    return share, float(share.max()), int((share < DEAD_SHARE / load.numel()).sum())


@dataclass(frozen=True)
class LayerHealth:
    """Routing health of one routing unit.

    Attributes:
        name: the MoLE layer's module name, or the shared router's (``...layers.3.mole_router``).
        scope: ``"linear"`` (a layer's own router), ``"block"`` or ``"model"`` (a shared router; its
            "experts" are the block's MoLE modules for ``"block"``).
        num_experts: ``E``.
        load: ``E`` shares of the routed weight over real tokens, summing to 1.
        largest_share: ``max(load)``.
        dead_experts: experts with ``load < DEAD_SHARE / E``.
        entropy: mean normalised router entropy in [0, 1], or ``None``.
        tiny_margin: share of real tokens with ``log p_1 - log p_2 < margin_threshold``, or ``None``.
        tokens: real tokens counted.
        forwards: forwards counted (1 for a last-forward report).
    """

    name: str
    scope: str
    num_experts: int
    load: tuple[float, ...]
    largest_share: float
    dead_experts: int
    entropy: float | None
    tiny_margin: float | None
    tokens: int
    forwards: int


@dataclass(frozen=True)
class RoutingHealth:
    """Health of every routing unit of a model, in module order; ``health[name]`` gives one.

    Attributes:
        layers: ``{name: LayerHealth}``.
        source: ``"window"`` (running sums since the last read) or ``"last_forward"``.
        margin_threshold: the log-probability gap ``tiny_margin`` was counted under.
    """

    layers: dict[str, LayerHealth]
    source: str
    margin_threshold: float = TINY_MARGIN

    def __getitem__(self, name: str) -> LayerHealth:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def collapsed(self, share: float = 0.95) -> list[str]:
        """Names of the units of 2 or more experts whose largest expert share exceeds ``share`` (a single
        expert takes everything by construction)."""
        return [h.name for h in self if h.num_experts > 1 and h.largest_share > share]

    def with_dead_experts(self) -> dict[str, int]:
        """``{name: dead experts}`` of the units that have any."""
        return {h.name: h.dead_experts for h in self if h.dead_experts}

    def to_dict(self) -> dict[str, Any]:
        layers = {name: {**asdict(h), "load": list(h.load)} for name, h in self.layers.items()}
        return {"source": self.source, "margin_threshold": self.margin_threshold, "layers": layers}


class _Window:
    """Running sums of one routing unit, as device tensors: ``[E]`` routed weight, then real tokens,
    entropy sum, tokens with probabilities, undecided tokens (one ``[E + 4]`` float32 tensor)."""

    def __init__(self, name: str, scope: str, num_experts: int, margin: float) -> None:
        self.name, self.scope, self.num_experts, self.margin = name, scope, num_experts, margin
        self.sums: Tensor | None = None
        self.forwards = 0
        self.has_probs = False

    def add(self, decision: RoutingDecision) -> None:
        """Add one forward's decision; device ops only (masks multiply, never index)."""
        E = self.num_experts
        weights = decision.weights.detach().float()
        gate = weights.new_zeros(decision.indices.shape[0], E).scatter_add(1, decision.indices, weights)
        if decision.is_per_sequence:
            gate = repeat_rows(gate, decision.tokens_per_sequence)
        mask = decision.token_mask
        real = mask.float() if mask is not None and mask.shape[0] == gate.shape[0] else gate.new_ones(gate.shape[0])
        zero = gate.new_zeros(())
        entropy_sum, prob_tokens, undecided = zero, zero, zero
        probs = decision.probs
        if probs is not None and E > 1:
            p = probs.detach().float()
            if decision.is_per_sequence:
                p = repeat_rows(p, decision.tokens_per_sequence)
            if p.shape[0] == gate.shape[0]:
                self.has_probs = True
                log_p = p.clamp_min(1e-12).log()
                entropy_sum = ((-(p * log_p).sum(-1) / math.log(E)) * real).sum()
                top2 = log_p.topk(2, dim=-1).values
                undecided = (((top2[:, 0] - top2[:, 1]) < self.margin).float() * real).sum()
                prob_tokens = real.sum()
        packed = torch.cat(
            [(gate * real[:, None]).sum(0), torch.stack([real.sum(), entropy_sum, prob_tokens, undecided])]
        )
        self.sums = packed if self.sums is None else self.sums + packed.to(self.sums.device)
        self.forwards += 1

    def report(self, values: list[float]) -> LayerHealth:
        E = self.num_experts
        load, (tokens, entropy_sum, prob_tokens, undecided) = values[:E], values[E:]
        share, largest, dead = expert_shares(torch.tensor(load))
        has = self.has_probs and prob_tokens > 0
        return LayerHealth(
            name=self.name,
            scope=self.scope,
            num_experts=E,
            load=tuple(share.tolist()),
            largest_share=largest,
            dead_experts=dead,
            entropy=entropy_sum / prob_tokens if has else None,
            tiny_margin=undecided / prob_tokens if has else None,
            tokens=round(tokens),
            forwards=self.forwards,
        )


def _units(model: nn.Module) -> list[tuple[str, str, int, nn.Module, Any]]:
    """``(name, scope, E, layer, read)`` per routing unit: ``read()`` gives the unit's decision of the
    layer's last forward. Shared routers are read through the one layer that reports their losses."""
    names = {id(m): n for n, m in model.named_modules()}
    units = []
    for name, layer in mole_layers(model).items():
        if layer.router is not None:
            units.append((name, "linear", layer.experts.num_experts, layer, lambda layer=layer: layer.last_decision))
            continue
        view = layer.active_router
        if getattr(view, "report_losses", False):
            router = view.router
            units.append(
                (
                    names.get(id(router), f"{name}.router"),
                    router.scope,
                    router.num_experts,
                    layer,
                    view.last_router_decision,
                )
            )
    return units


@takes_model
def enable_routing_health(
    model: nn.Module, *, training_only: bool = True, margin_threshold: float = TINY_MARGIN
) -> None:
    """Accumulate routing health over the following forwards (in training mode only, unless
    ``training_only=False``) until :func:`routing_health` reads it; calling it again starts over."""
    if not margin_threshold >= 0:
        raise ValueError(f"margin_threshold must be >= 0 (a log-probability gap, e.g. 0.1), got {margin_threshold}")
    disable_routing_health(model)
    units = _units(model)
    if not units:
        raise ValueError(
            "the model has no MoLE layers: call molex.inject(model, config) before enabling routing health"
        )
    windows, handles = [], []
    for name, scope, num_experts, layer, read in units:
        window = _Window(name, scope, num_experts, margin_threshold)

        def hook(module: nn.Module, args: Any, output: Any, window: _Window = window, read: Any = read) -> None:
            if module.training or not training_only:
                decision = read()
                if decision is not None:
                    window.add(decision)

        windows.append(window)
        handles.append(layer.register_forward_hook(hook))
    set_unregistered(
        model,
        _STATE_ATTR,
        {"windows": windows, "handles": handles, "margin": margin_threshold, "training_only": training_only},
    )


def routing_health_settings(model: nn.Module) -> dict[str, Any] | None:
    """The keyword arguments :func:`enable_routing_health` was called with, or None when collection is off;
    code that re-builds the pools (automatic allocation) uses it to turn collection back on."""
    state = get_unregistered(model, _STATE_ATTR)
    if state is None:
        return None
    return {"training_only": state["training_only"], "margin_threshold": state["margin"]}


@takes_model
def disable_routing_health(model: nn.Module) -> None:
    """Stop accumulating (removes the hooks); a no-op when health is not enabled."""
    state = pop_unregistered(model, _STATE_ATTR)
    for handle in (state or {}).get("handles", ()):
        handle.remove()


def has_routing_reads(model: nn.Module) -> bool:
    """Whether :func:`routing_health` has anything to read: some routing unit has a window with forwards
    in it, or a last forward. False right after the pools were re-built (``molex.reallocate``)."""
    windows = _filled_windows(model)
    return any(name in windows or read() is not None for name, _, _, _, read in _units(model))


def _filled_windows(model: nn.Module) -> dict[str, _Window]:
    """The accumulation windows (by unit name) that have seen at least one forward since their last read."""
    state = get_unregistered(model, _STATE_ATTR)
    return {w.name: w for w in state["windows"] if w.sums is not None} if state is not None else {}


@takes_model
def routing_health(model: nn.Module, *, reset: bool = True) -> RoutingHealth:
    """Routing health of every routing unit of ``model`` (see the module docstring for each number).

    With :func:`enable_routing_health` on, the window of forwards since the last read (``reset=False``
    keeps the window going); otherwise, or for a unit that has not run since, its last forward. Units that
    never ran are left out. The margin threshold is the one health was enabled with, else
    :data:`TINY_MARGIN`. Reading costs one device-to-host transfer.
    """
    state = get_unregistered(model, _STATE_ATTR)
    margin = state["margin"] if state is not None else TINY_MARGIN
    by_name = _filled_windows(model)
    chosen: list[_Window] = []
    from_window = False
    for name, scope, num_experts, _, read in _units(model):
        window = by_name.get(name)
        if window is not None:
            chosen.append(window)
            from_window = True
            continue
        decision = read()
        if decision is not None:
            last = _Window(name, scope, num_experts, margin)
            last.add(decision)
            chosen.append(last)
    if not chosen:
        raise ValueError("no MoLE layer has run a forward yet: run the model before reading its routing health")
    device = chosen[0].sums.device  # gather on one device, then a single transfer to the host
    flat = torch.cat([w.sums.to(device) for w in chosen]).tolist()
    layers, offset = {}, 0
    for w in chosen:
        size = w.num_experts + 4
        layers[w.name] = w.report(flat[offset : offset + size])
        offset += size
    if reset:
        for w in by_name.values():
            w.sums, w.forwards, w.has_probs = None, 0, False
    return RoutingHealth(layers, "window" if from_window else "last_forward", margin)
