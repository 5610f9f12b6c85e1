"""Fuse off-the-shelf PEFT LoRA adapters into one model as frozen experts behind a router.

``fuse_adapters(model, {"math": dir_a, "code": dir_b}, router="gate")`` reads each adapter
(:mod:`molex.hub.peft_format`, no peft import), checks every module against the base model, then
injects one MoLE layer per module that any adapter targets. A module targeted by ``n`` of the
adapters gets ``n`` experts (in adapter order); ranks are zero-padded to the layer's largest one
(exact: padded rows and columns contribute nothing); each expert keeps its own ``alpha / r``
scaling. The map adapter -> expert slot per layer is recorded in ``MoLEConfig.hub`` so that
:func:`molex.save_adapter` / :func:`molex.load_adapter` round-trip a fused model.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from molex.core.model_argument import takes_model
from molex.hub.peft_format import PeftLoraAdapter, read_peft_adapter
from molex.layer.config import AllocationConfig, MoLEConfig
from molex.layer.context import get_context
from molex.layer.inject import get_config, inject, is_injected, mole_layers
from molex.layer.linear import is_supported_linear, linear_dims
from molex.routers.base import Scope, get_router_class

__all__ = [
    "adapter_gates",
    "adapter_names",
    "expert_slots",
    "fuse_adapters",
    "load_adapters",
    "routing_accuracy",
    "set_adapter_weights",
]

AdapterSource = str | os.PathLike | PeftLoraAdapter


def load_adapters(adapters: Mapping[str, AdapterSource]) -> list[PeftLoraAdapter]:
    """Read every adapter of ``{name: directory or PeftLoraAdapter}`` (in mapping order)."""
    if not adapters:
        raise ValueError("no adapters given: pass {name: PEFT adapter directory, ...}")
    loaded = []
    for name, source in adapters.items():
        if isinstance(source, PeftLoraAdapter):
            loaded.append(dataclasses.replace(source, name=name))
        else:
            loaded.append(read_peft_adapter(source, name=name))
    return loaded


def _target_matches(name: str, target: list[str] | str) -> bool:
    # PEFT's rule: a regex string must match the full path; list entries match a dotted suffix
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _validate(model: nn.Module, adapters: Sequence[PeftLoraAdapter]) -> None:
    """Every check before the model is touched; errors name the adapter and the module."""
    modules = dict(model.named_modules())
    linear_names = sorted({n.split(".")[-1] for n, m in modules.items() if n and is_supported_linear(m)})
    for adapter in adapters:
        where = f"adapter {adapter.name!r} ({adapter.path})"
        targets = adapter.target_modules
        entries = [targets] if isinstance(targets, str) else targets
        for entry in entries:
            pattern = targets if isinstance(targets, str) else [entry]
            if not any(n and _target_matches(n, pattern) for n in modules):
                close = difflib.get_close_matches(entry.split(".")[-1], linear_names, n=3)
                raise ValueError(
                    f"{where}: target module {entry!r} matches no module of {type(model).__name__}"
                    + (f" (did you mean {close}?)" if close else "")
                    + f"; this model's linear layers: {linear_names}. Was it trained on another architecture?"
                )
        for name, factors in adapter.modules.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(
                    f"{where}: has weights for module {name!r}, which {type(model).__name__} does not have; "
                    "the adapter was trained on another base model"
                )
            if not is_supported_linear(module):
                raise ValueError(
                    f"{where}: module {name!r} is a {type(module).__name__}; only nn.Linear / Conv1D LoRA can be fused"
                )
            in_features, out_features = linear_dims(module)
            if factors.A.shape[1] != in_features or factors.B.shape[0] != out_features:
                raise ValueError(
                    f"{where}: module {name!r} has lora_A {tuple(factors.A.shape)} and lora_B "
                    f"{tuple(factors.B.shape)}, but the base layer is {in_features} -> {out_features}: the adapter "
                    "was trained on a base model of different dimensions"
                )


def _fused_config(
    model: nn.Module,
    adapters: Sequence[PeftLoraAdapter],
    router: str,
    top_k: int | None,
    kernel_backend: str,
    router_options: dict[str, Any],
) -> MoLEConfig:
    order = [n for n, _ in model.named_modules()]
    targeted = {name for a in adapters for name in a.modules}
    names = [n for n in order if n in targeted]
    experts = {n: [i for i, a in enumerate(adapters) if n in a.modules] for n in names}
    ranks = {n: max(adapters[i].modules[n].rank for i in experts[n]) for n in names}
    scope = get_router_class(router).scope
    if scope is Scope.BLOCK:
        raise ValueError(
            f"router {router!r} chooses among the modules of a decoder block, not among adapters; "
            "use a per-layer router (gate, soft, topk, fixed) or a per-sequence one (dlp)"
        )
    if scope is Scope.MODEL:
        # one decision over adapters for every layer: each layer holds every adapter (slot == adapter
        # index); an adapter that does not target a module is a zero expert there, which adds nothing
        experts = {n: list(range(len(adapters))) for n in names}
    if router_options.get("task_loss_coef", 0) > 0 and any(e != list(range(len(adapters))) for e in experts.values()):
        raise ValueError(
            f"router {router!r} option task_loss_coef reads task_ids as expert indices, but some modules are "
            "targeted by only some adapters; leave it 0 and train with molex.train_router(..., task_loss_coef=...), "
            "which maps adapters to each layer's experts"
        )
    if top_k is not None:
        short = [n for n in names if len(experts[n]) < top_k]
        if short:
            raise ValueError(
                f"top_k={top_k} but {len(short)} module(s) are targeted by fewer adapters, e.g. {short[:3]} "
                f"({len(experts[short[0]])} expert(s)); lower top_k or use router='soft'"
            )
    exact = {n: "^" + re.escape(n) + "$" for n in names}
    return MoLEConfig(
        target_modules=names,
        rank=max(ranks.values()),
        alpha=float(max(ranks.values())),
        num_experts=max(len(e) for e in experts.values()),
        allocation=AllocationConfig(
            overrides={exact[n]: len(experts[n]) for n in names},
            rank_overrides={exact[n]: ranks[n] for n in names},
        ),
        router=router,
        top_k=top_k,
        router_options=router_options,
        kernel_backend=kernel_backend,
        hub={"adapters": [a.name for a in adapters], "experts": experts},
    )


@takes_model
def fuse_adapters(
    model: nn.Module,
    adapters: Mapping[str, AdapterSource],
    router: str = "gate",
    top_k: int | None = None,
    *,
    train_experts: bool = False,
    kernel_backend: str = "auto",
    general_adapters: Mapping[str, AdapterSource] | None = None,
    **router_options: Any,
) -> nn.Module:
    """Load PEFT LoRA adapters into ``model`` as experts of MoLE layers; returns ``model``.

    Args:
        model: the base model the adapters were trained on (modified in place).
        adapters: ``{name: PEFT adapter directory}`` (or :class:`PeftLoraAdapter`); order defines the
            adapter index used by ``task_ids``, :func:`routing_accuracy` and :func:`set_adapter_weights`.
        router: router name (``gate``, ``soft``, ``topk``, ``fixed``, ...); its options follow as
            keyword arguments. With ``router="fixed"``, ``weights=[w_1, ..., w_A]`` gives one
            weight per *adapter* (mapped onto each layer's experts).
        top_k: experts per token for routers that take it; must not exceed the number of adapters
            targeting any module.
        train_experts: also train the LoRA factors (default: only the router trains).
        kernel_backend: expert op backend, or ``"auto"``.
        general_adapters: GenKnowSub (with ``router="arrow"``): ``{name: PEFT adapter directory}`` of
            general-knowledge adapters whose mean ``A`` and mean ``B`` are subtracted from every adapter's
            factors per module before the prototypes are computed, as PEFT's Arrow does. They are not experts.

    Everything is validated before the model changes; a bad adapter raises naming the adapter and module.
    """
    if is_injected(model):
        raise ValueError("model already has MoLE layers; call molex.unload(model) first")
    loaded = load_adapters(adapters)
    _validate(model, loaded)
    if general_adapters:
        general = load_adapters(general_adapters)
        _validate(model, general)
        loaded = subtract_general_knowledge(loaded, general)
    options = dict(router_options)
    adapter_weights = options.pop("weights", None) if router == "fixed" else None
    if adapter_weights is not None and len(adapter_weights) != len(loaded):
        raise ValueError(f"fixed router: {len(adapter_weights)} weights given for {len(loaded)} adapters")
    config = _fused_config(model, loaded, router, top_k, kernel_backend, options)
    inject(model, config)
    _copy_factors(model, loaded)
    for layer in mole_layers(model).values():
        layer.experts.requires_grad_(train_experts)
    if adapter_weights is not None:
        set_adapter_weights(model, adapter_weights)
    return model


def subtract_general_knowledge(
    adapters: Sequence[PeftLoraAdapter], general: Sequence[PeftLoraAdapter]
) -> list[PeftLoraAdapter]:
    """GenKnowSub: per module, ``A_e - mean_g A_g`` and ``B_e - mean_g B_g`` (new adapters; inputs unchanged).

    Every general adapter must target each module the adapters target, with the same rank (PEFT's rule).
    """
    result = []
    for adapter in adapters:
        modules = {}
        for name, factors in adapter.modules.items():
            missing = [g.name for g in general if name not in g.modules]
            if missing:
                raise ValueError(
                    f"general adapter(s) {missing} do not target module {name!r}, which adapter {adapter.name!r} "
                    "targets; GenKnowSub needs every general adapter on every adapted module"
                )
            ranks = {g.name: g.modules[name].rank for g in general if g.modules[name].rank != factors.rank}
            if ranks:
                raise ValueError(
                    f"GenKnowSub needs equal ranks: adapter {adapter.name!r} has rank {factors.rank} on {name!r}, "
                    f"general adapter(s) {ranks}; use general adapters of the same rank"
                )
            mean_A = torch.stack([g.modules[name].A.float() for g in general]).mean(0)
            mean_B = torch.stack([g.modules[name].B.float() for g in general]).mean(0)
            modules[name] = dataclasses.replace(factors, A=factors.A.float() - mean_A, B=factors.B.float() - mean_B)
        result.append(dataclasses.replace(adapter, modules=modules))
    return result


@torch.no_grad()
def _copy_factors(model: nn.Module, adapters: Sequence[PeftLoraAdapter]) -> None:
    experts_of = get_config(model).hub["experts"]
    for name, layer in mole_layers(model).items():
        pool = layer.experts
        pool.lora_A.zero_()
        pool.lora_B.zero_()
        for slot, index in enumerate(experts_of[name]):
            factors = adapters[index].modules.get(name)
            if factors is None:  # an adapter that does not target this module (per-sequence routers)
                pool.scaling[slot] = 0.0
                continue
            r = factors.rank
            pool.lora_A[slot, :r].copy_(factors.A.to(pool.lora_A.dtype))
            pool.lora_B[slot, :r].copy_(factors.B.t().to(pool.lora_B.dtype))  # molex keeps B as [r, out]
            pool.scaling[slot] = factors.scaling


def _hub(model: nn.Module) -> dict[str, Any]:
    hub = get_config(model).hub
    if not hub:
        raise ValueError("this model was not built by molex.fuse_adapters (its MoLEConfig has no hub record)")
    return hub


@takes_model
def adapter_names(model: nn.Module) -> list[str]:
    """Names of the fused adapters, in adapter-index order."""
    return list(_hub(model)["adapters"])


def expert_slots(model: nn.Module) -> dict[str, list[int]]:
    """``{module: [adapter index of expert 0, 1, ...]}`` of a fused model."""
    return {name: list(indices) for name, indices in _hub(model)["experts"].items()}


@torch.no_grad()
@takes_model
def set_adapter_weights(model: nn.Module, weights: Sequence[float] | Tensor) -> None:
    """Set one mixing weight per adapter on a fused model with the ``fixed`` router."""
    slots = expert_slots(model)
    weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if weights.numel() != len(adapter_names(model)):
        raise ValueError(f"{weights.numel()} weights given for {len(adapter_names(model))} adapters")
    for name, layer in mole_layers(model).items():
        mix = getattr(layer.active_router, "mix", None)
        if mix is None:
            raise ValueError(
                f"layer {name!r} has router {layer.active_router.name!r}; fixed weights need router='fixed'"
            )
        mix.copy_(weights[slots[name]].to(mix.device))


def adapter_gates(model: nn.Module) -> dict[str, Tensor]:
    """Per layer, the last forward's routing weights summed per *adapter*: ``{module: [T, A]}``."""
    slots = expert_slots(model)
    num_adapters = len(adapter_names(model))
    gates = {}
    for name, layer in mole_layers(model).items():
        decision = layer.last_decision
        if decision is None:
            continue
        dense = decision.to_dense(layer.experts.num_experts).float()
        index = torch.tensor(slots[name], device=dense.device)
        gates[name] = dense.new_zeros(dense.shape[0], num_adapters).index_add(1, index, dense)
    return gates


@torch.no_grad()
@takes_model
def routing_accuracy(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> float:
    """Share of sequences whose most-weighted adapter (summed over layers and real tokens) is
    their ``task_ids`` label. Each batch: ``input_ids [B, S]``, ``attention_mask``, ``task_ids [B]``
    (adapter indices); ``prompt_mask`` restricts the tokens that count."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k not in ("task_ids", "labels")})
            ctx = get_context(model)
            mask = ctx.sequence_mask()
            scores = 0.0
            for gate in adapter_gates(model).values():
                gate = gate.view(ctx.batch_size, ctx.seq_len, -1)
                if mask is not None:
                    gate = gate * mask.unsqueeze(-1).to(gate.dtype)
                scores = scores + gate.sum(1)
            labels = torch.as_tensor(batch["task_ids"]).to(scores.device)
            correct += int((scores.argmax(-1) == labels).sum())
            total += labels.numel()
    finally:
        model.train(was_training)
    return correct / max(total, 1)
