"""Routes from what a user gives: example prompts (the router decides) or explicit per-expert weights.

A *route* is one fixed weighted set of experts per layer, the same for every token of a sequence.
With a router that decides once per sequence (``dlp``, ``milora``, ``fixed``, ``mtl``, AdaMix at
inference, ``features`` with per-sequence ids; see ``Router.decides_per_sequence``) every prompt
takes one route; prompts that reach the same decision share it. Per-expert weights name a route
directly, whatever the router. :func:`resolve_routes` turns specs into :class:`Route` objects, which
:mod:`molex.export.routes` writes as PEFT adapters and :mod:`molex.export.merge_route` merges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from molex.export.capture import (
    LayerFactors,
    capture_gates,
    eval_mode,
    layer_router,
    lora_of_gate,
    pool_factors,
)
from molex.layer.inject import mole_layers

__all__ = ["SAME_DECISION_ATOL", "Route", "RoutePrompts", "RouteSpec", "check_per_sequence", "resolve_routes"]

#: two prompts reach the same decision when every gate agrees within this (batching moves the last bits)
SAME_DECISION_ATOL = 1e-6


@dataclass
class RoutePrompts:
    """Prompts whose routes the router decides: ``texts`` (tokenised with the tokenizer) or ``token_ids``
    (one list per prompt, ``texts`` then only label them), and ``task_ids`` (one per prompt, or one for
    all) for routers that read them (``mtl``, ``features``)."""

    texts: Sequence[str] | None = None
    token_ids: Sequence[Sequence[int]] | None = None
    task_ids: int | Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.texts is None and self.token_ids is None:
            raise ValueError("RoutePrompts needs texts=[...] or token_ids=[[...], ...]")
        count = len(self.token_ids if self.token_ids is not None else self.texts)
        if count == 0:
            raise ValueError("RoutePrompts holds no prompts")
        if self.texts is not None and len(self.texts) != count:
            raise ValueError(f"RoutePrompts: {len(self.texts)} texts for {count} token id lists")
        if isinstance(self.task_ids, int):
            self.task_ids = [self.task_ids] * count
        if self.task_ids is not None and len(self.task_ids) != count:
            raise ValueError(f"RoutePrompts: {len(self.task_ids)} task ids for {count} prompts")


#: a route as given: prompts (a list of strings, ``{"prompts": [...], "task_id": i}`` or
#: :class:`RoutePrompts`), weights of every layer's experts (``[w_0, ...]``) or ``{layer: [w_0, ...]}``
RouteSpec = Sequence[str] | Sequence[float] | Tensor | Mapping[str, Any] | RoutePrompts


@dataclass
class Route:
    """One route: per layer the gate ``[E']`` over the factors its expert op multiplies."""

    gates: dict[str, Tensor]
    factors: dict[str, LayerFactors]
    groups: list[str] = field(default_factory=list)
    prompts: list[Any] = field(default_factory=list)

    def loras(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (A [R, in], B [out, R])}`` (scaling folded in); layers the route leaves off are absent."""
        out = {}
        for name, gate in self.gates.items():
            lora = lora_of_gate(self.factors[name], gate)
            if lora is not None:
                out[name] = lora
        return out

    def decision(self) -> dict[str, dict[str, list]]:
        """``{layer: {"experts": [j, ...], "weights": [w_j, ...]}}`` over the experts with a non-zero weight."""
        out = {}
        for name, gate in self.gates.items():
            chosen = [j for j, w in enumerate(gate.tolist()) if w != 0]
            out[name] = {"experts": chosen, "weights": [float(gate[j]) for j in chosen]}
        return out

    def same_decision(self, gates: Mapping[str, Tensor]) -> bool:
        return all((self.gates[name] - gate).abs().max().item() <= SAME_DECISION_ATOL for name, gate in gates.items())


def check_per_sequence(model: nn.Module, what: str) -> None:
    """Refuse token-level routers (in the model's current mode): their mixture is not one LoRA per route."""
    token_level = sorted({layer_router(layer).name for layer in mole_layers(model).values()} - _per_sequence(model))
    if token_level:
        raise ValueError(
            f"{what} needs a router that decides once per sequence (dlp, milora, fixed, mtl, ...), so that each "
            f"route is exactly one LoRA; router {', '.join(map(repr, token_level))} decides per token. Use "
            "molex.export_single(model, out_dir, calibration_batches, rank=...) (molex-export mode=single): one "
            "LoRA approximating the mixture, with its error reported per layer (approximate, not exact)"
        )


def _per_sequence(model: nn.Module) -> set[str]:
    return {
        layer_router(layer).name for layer in mole_layers(model).values() if layer_router(layer).decides_per_sequence()
    }


def _weights_route(model: nn.Module, name: str, spec: Any) -> Route:
    layers = mole_layers(model)
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(layers))
        if unknown:
            raise ValueError(f"route {name!r} names layers {unknown[:3]} that are not MoLE layers of this model")
        given = {layer: spec[layer] for layer in layers if layer in spec}
    else:
        given = dict.fromkeys(layers, spec)
    gates, factors = {}, {}
    for layer, weights in given.items():
        factors[layer] = pool_factors(layers[layer])
        try:
            gate = torch.as_tensor(weights, dtype=torch.float32).flatten()
        except (ValueError, TypeError, RuntimeError):
            raise ValueError(
                f"route {name!r}: {weights!r} is neither prompts (strings, or RoutePrompts(token_ids=...)) nor one "
                "weight per expert"
            ) from None
        if gate.numel() != factors[layer].num_experts or not torch.isfinite(gate).all():
            raise ValueError(
                f"route {name!r}: layer {layer!r} has {factors[layer].num_experts} experts but got weights "
                f"{gate.tolist()}; give one finite weight per expert"
            )
        gates[layer] = gate
    return Route(gates, factors, groups=[name])


def _fixed_route(model: nn.Module) -> Route:
    layers = mole_layers(model)
    routers = {layer_router(layer).name for layer in layers.values()}
    if routers != {"fixed"}:
        raise ValueError(
            f"routes=None exports the one route of the 'fixed' router, but this model uses {sorted(routers)}; "
            "give routes as example prompts or as per-expert weights"
        )
    mixes = {name: layer_router(layer).mix.detach().float().cpu() for name, layer in layers.items()}
    return _weights_route(model, "fixed", mixes)


def _as_prompts(name: str, spec: Any) -> RoutePrompts | None:
    """``RoutePrompts`` when ``spec`` gives prompts, ``None`` when it gives weights."""
    if isinstance(spec, RoutePrompts):
        return spec
    if isinstance(spec, str):
        return RoutePrompts(texts=[spec])
    if isinstance(spec, Mapping) and "prompts" in spec:
        extra = sorted(set(spec) - {"prompts", "task_id"})
        if extra:
            raise ValueError(f"route {name!r}: unknown key(s) {extra}; a prompt route takes 'prompts' and 'task_id'")
        prompts = spec["prompts"]
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return RoutePrompts(texts=texts, task_ids=spec.get("task_id"))
    if isinstance(spec, Sequence) and spec and all(isinstance(p, str) for p in spec):
        return RoutePrompts(texts=list(spec))
    return None


def _batches(prompts: RoutePrompts, tokenizer: Any, batch_size: int, name: str):
    if prompts.token_ids is not None:
        ids = [list(map(int, seq)) for seq in prompts.token_ids]
    else:
        if tokenizer is None:
            raise ValueError(f"route {name!r} is given as prompt texts: pass tokenizer= to tokenise them")
        ids = [list(tokenizer(text)["input_ids"]) for text in prompts.texts]
    if any(len(seq) == 0 for seq in ids):
        raise ValueError(f"route {name!r} holds an empty prompt; every prompt needs at least one token")
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):  # right padding: the prompt's positions stay those of an unpadded call
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if prompts.task_ids is not None:
            batch["task_ids"] = torch.tensor(list(prompts.task_ids[start : start + batch_size]), dtype=torch.long)
        labels = prompts.texts[start : start + batch_size] if prompts.texts is not None else chunk
        yield batch, list(labels)


def _prompt_routes(
    model: nn.Module, name: str, prompts: RoutePrompts, tokenizer: Any, batch_size: int, routes: list[Route]
) -> None:
    """Add ``prompts``' decisions to ``routes`` (a prompt joins the route whose decision it reaches)."""
    reads_text = any("route_text" in layer_router(layer).routing_inputs_read() for layer in mole_layers(model).values())
    device = next(model.parameters()).device
    for batch, labels in _batches(prompts, tokenizer, batch_size, name):
        if reads_text and prompts.texts is not None:
            batch["route_text"] = labels
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        try:
            captured = capture_gates(model, batch)
        except ValueError as err:
            raise ValueError(f"route {name!r}: {err}") from None
        mask = batch["attention_mask"].bool()
        for row, label in enumerate(labels):
            gates = {}
            for layer, seen in captured.items():
                real = seen.gates[row][mask[row]].cpu()
                if not bool((real == real[0]).all()):
                    raise ValueError(
                        f"route {name!r}: layer {layer!r} gives the tokens of one prompt different experts, so the "
                        "prompt's route is not one LoRA (per-token routing inputs?); use molex.export_single, which "
                        "approximates the mixture by one LoRA"
                    )
                gates[layer] = real[0]
            match = next((r for r in routes if r.prompts and r.same_decision(gates)), None)
            if match is None:
                match = Route(gates, {layer: seen.factors for layer, seen in captured.items()})
                routes.append(match)
            match.prompts.append(label)
            if name not in match.groups:
                match.groups.append(name)


def resolve_routes(
    model: nn.Module,
    routes: Mapping[str, RouteSpec] | Sequence[str] | RoutePrompts | None,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
) -> list[Route]:
    """The distinct routes of ``routes`` (``{name: spec}``, a list of prompts, or ``None`` for the ``fixed`` router).

    Prompt routes run the model (in eval mode, no gradients) and need a per-sequence router; weight
    routes take any router's pool. A name that reaches several decisions gives several routes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if routes is None:
        return [_fixed_route(model)]
    if isinstance(routes, (str, RoutePrompts)):
        routes = {"prompts": routes}
    elif isinstance(routes, Sequence) and not isinstance(routes, Mapping):
        routes = {"prompts": list(routes)}
    if not routes:
        raise ValueError("routes is empty: give {name: prompts or per-expert weights}")
    out: list[Route] = []
    with eval_mode(model):
        for name, spec in routes.items():
            prompts = _as_prompts(str(name), spec)
            if prompts is None:
                out.append(_weights_route(model, str(name), spec))
                continue
            check_per_sequence(model, f"route {name!r} (prompts)")
            _prompt_routes(model, str(name), prompts, tokenizer, batch_size, out)
    return out
