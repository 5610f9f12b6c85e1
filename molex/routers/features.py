"""FLix's feature router: each value of each dataset feature owns one expert; an example uses the sum of its own.

FLix (Sun et al., 2024, "Featurized Low-Rank Mixtures for Efficient Multi-task Adaptation of Large
Language Models") gives every dataset feature value (task = "summarise", language = "de", ...)
its own low-rank update and composes, for an example, the updates of the feature values it has::

    h = sum_f c_f * s * B_{f, v_f}^T A_{f, v_f} x

Combinations never seen together in training (a task in a new language) still compose. There is
no learned gate: the experts of a layer are the feature values, laid out feature after feature in
the order of ``features`` (feature ``f``'s value ``v`` is expert ``offset_f + v``), so the router
fixes the pool size to the total number of values.

The ids come in the routing input ``features={"task": ids, "lang": ids}`` with ``ids [B]`` (one
value per sequence) or ``[B, S]`` (per token); a feature named ``task`` falls back to
``task_ids`` when ``features`` does not hold it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from molex.layer.context import RoutingContext
from molex.routers.base import Router, RouterConfig, RoutingDecision, register_router


@dataclass
class FeaturesConfig(RouterConfig):
    """Options of the ``features`` router.

    Attributes:
        features: ``{feature name: number of values}``, in expert order, e.g. ``{"task": 8, "lang": 3}``.
        weights: ``{feature name: c_f}``, the weight of each feature's expert in the sum (1 for a
            feature left out; ``None``: 1 for every feature).
    """

    features: Mapping[str, int] | None = None
    weights: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("router 'features' needs features={name: number of values}, e.g. {'task': 8, 'lang': 3}")
        self.features = {str(name): int(size) for name, size in self.features.items()}
        bad = {name: size for name, size in self.features.items() if size < 1}
        if bad:
            raise ValueError(f"router 'features': every feature needs at least one value, got {bad}")
        if self.weights is not None:
            self.weights = {str(name): float(w) for name, w in self.weights.items()}
            unknown = sorted(set(self.weights) - set(self.features))
            if unknown:
                raise ValueError(
                    f"router 'features': weights name unknown feature(s) {unknown}; features: {list(self.features)}"
                )

    @property
    def num_values(self) -> int:
        return sum(self.features.values())


@register_router
class FeaturesRouter(Router):
    """Indices ``offset_f + id_f`` and weights ``c_f``, one column per feature: ``[B, F]`` per sequence
    (every feature's ids ``[B]``) or ``[T, F]`` per token (some ``[B, S]``). No parameters."""

    name = "features"
    config_class = FeaturesConfig

    @classmethod
    def fixed_num_experts(cls, config: FeaturesConfig) -> int:
        return config.num_values

    def __init__(self, *, in_features: int, num_experts: int, config: FeaturesConfig) -> None:
        super().__init__(in_features=in_features, num_experts=num_experts, config=config)
        if num_experts != config.num_values:
            sizes = " + ".join(f"{n} ({name})" for name, n in config.features.items())
            raise ValueError(
                f"router 'features' needs one expert per feature value, {sizes} = {config.num_values}, but the "
                f"layer has {num_experts}; set num_experts={config.num_values}"
            )
        sizes = torch.tensor(list(config.features.values()))
        weights = [(config.weights or {}).get(name, 1.0) for name in config.features]
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("feature_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def _inputs(self, context: RoutingContext | None) -> dict[str, Any]:
        given = dict(context.get("features") or {}) if context is not None else {}
        unknown = sorted(set(given) - set(self.config.features))
        if unknown:
            raise ValueError(
                f"features holds {unknown}, which router 'features' does not know; its features: "
                f"{list(self.config.features)}"
            )
        if "task" in self.config.features and "task" not in given and context is not None:
            task_ids = context.get("task_ids")
            if task_ids is not None:
                given["task"] = task_ids
        missing = [name for name in self.config.features if given.get(name) is None]
        if missing:
            raise ValueError(
                f"router 'features' is missing the ids of feature(s) {missing}: pass "
                f"features={{{', '.join(repr(n) + ': ids [B] or [B, S]' for n in missing)}}} to the model call "
                "(or to molex.routing_inputs for generate)"
            )
        return given

    def _ids(self, name: str, ids: Any, device: torch.device) -> Tensor:
        ids = torch.as_tensor(ids, device=device)
        size = self.config.features[name]
        if ids.dim() not in (1, 2) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"feature {name!r}: ids must be integer tensors [B] or [B, S], got {ids.dtype} {tuple(ids.shape)}"
            )
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= size:
                raise ValueError(
                    f"feature {name!r} has {size} values (ids 0..{size - 1}) but got ids from {low} to {high}; "
                    f"raise features[{name!r}] to at least {high + 1}"
                )
        return ids.long()

    def decides_per_sequence(self) -> bool:
        # with ids [B]; ids [B, S] vary within a sequence, which an exact route export detects and refuses
        return True

    def forward(self, x: Tensor, context: RoutingContext | None = None) -> RoutingDecision:
        tokens = x.shape[0]
        given = self._inputs(context)
        ids = [self._ids(name, given[name], x.device) for name in self.config.features]
        rows = ids[0].shape[0]
        if any(t.shape[0] != rows for t in ids) or rows == 0 or tokens % rows:
            shapes = {name: tuple(t.shape) for name, t in zip(self.config.features, ids, strict=True)}
            raise ValueError(f"feature ids must share one batch size that divides the {tokens} tokens; got {shapes}")
        seq_len = tokens // rows
        mask = context.token_mask(tokens) if context is not None else None
        offsets = self.offsets.to(x.device)
        if all(t.dim() == 1 for t in ids):
            indices = torch.stack(ids, dim=-1) + offsets
            weights = self.feature_weights.to(x.device).expand(rows, -1)
            return RoutingDecision(indices, weights, tokens_per_sequence=seq_len, token_mask=mask)
        per_token = [t.unsqueeze(1).expand(rows, seq_len) if t.dim() == 1 else t[:, -seq_len:] for t in ids]
        if any(t.shape[1] != seq_len for t in per_token):
            raise ValueError(f"per-token feature ids need at least {seq_len} positions per sequence")
        indices = torch.stack([t.reshape(-1) for t in per_token], dim=-1) + offsets
        weights = self.feature_weights.to(x.device).expand(tokens, -1)
        return RoutingDecision(indices, weights, token_mask=mask)
