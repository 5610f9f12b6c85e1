"""Put MoLE layers into any ``nn.Module`` tree, take them out again, and report what was done."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from molex.allocation.plan import LayerPlan, plan_allocation
from molex.core.model_argument import takes_model
from molex.core.refs import get_unregistered, pop_unregistered, set_unregistered
from molex.layer.config import MoLEConfig
from molex.layer.context import install_context, remove_context
from molex.layer.experts import LoRAExperts
from molex.layer.linear import MoLELinear, is_supported_linear, linear_dims
from molex.layer.placement import place, remove
from molex.layer.routing_checks import declare_readers
from molex.quant import needs_dense_backward, prepare_for_training, quantized_kind
from molex.routers.base import Router, RouterConfig, Scope

__all__ = [
    "aux_losses",
    "aux_losses_by_kind",
    "decoder_layers",
    "find_target_modules",
    "get_config",
    "inject",
    "is_injected",
    "mole_layers",
    "summary",
    "total_aux_loss",
    "trainable_parameters",
    "unload",
]

_STATE_ATTR = "_molex_state"
logger = logging.getLogger(__name__)


def _matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


@takes_model
def find_target_modules(model: nn.Module, config: MoLEConfig) -> list[str]:
    """Names of the modules ``config.target_modules`` selects; a clear error if none or unsupported."""
    selected = []
    for name, module in model.named_modules():
        if not name or not _matches(name, config.target_modules):
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if isinstance(module, MoLELinear):
            raise ValueError(f"module {name!r} already holds MoLE experts; call molex.unload(model) first")
        if not is_supported_linear(module):
            linears = [n for n, m in module.named_modules() if n and is_supported_linear(m)]
            hint = f"; its linear layers are {sorted({n.split('.')[-1] for n in linears})}" if linears else ""
            raise TypeError(
                f"target {name!r} is a {type(module).__name__}, which cannot host LoRA experts (molex wraps "
                f"nn.Linear and GPT-2 Conv1D){hint}"
            )
        selected.append(name)
    if not selected:
        leaf_names = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and is_supported_linear(m)})
        wanted = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
        # best matches first, without repeats
        close = list(dict.fromkeys(c for w in wanted for c in difflib.get_close_matches(w.split(".")[-1], leaf_names)))
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of {type(model).__name__}. "
            + (f"Did you mean {close}? " if close else "")
            + f"Linear layers in this model: {leaf_names}"
        )
    return selected


def decoder_layers(model: nn.Module) -> int | None:
    """The model's number of decoder layers from its config (``num_hidden_layers``, ...), if it states one."""
    cfg = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _adapter_dtype(base: nn.Module, config: MoLEConfig) -> torch.dtype:
    kind = quantized_kind(base)
    # a quantized weight's dtype is its storage (uint8, int8); the experts follow the compute dtype
    dtype = kind.compute_dtype(base) if kind is not None else base.weight.dtype
    if config.autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _build_layer(
    base: nn.Module,
    plan: LayerPlan,
    config: MoLEConfig,
    router_cls: type[Router],
    router_config: RouterConfig,
    router_view: nn.Module | None = None,
) -> MoLELinear:
    """One MoLE layer around ``base``: its own ``router_cls`` router (built with the shared, already
    validated ``router_config``) or, for a block / model router, ``router_view``."""
    in_features, out_features = linear_dims(base)
    device = base.weight.device
    experts = LoRAExperts(
        in_features=in_features,
        out_features=out_features,
        num_experts=plan.num_experts,
        rank=plan.rank,
        scaling=config.scaling_for(plan.rank),
        dtype=_adapter_dtype(base, config),
        device=device,
        share_A=config.share_A or router_cls.needs_shared_a,
    )
    router = None
    if router_view is None:
        try:
            router = router_cls(in_features=in_features, num_experts=plan.num_experts, config=router_config)
        except ValueError as err:
            raise ValueError(f"layer {plan.name!r} ({plan.num_experts} experts): {err}") from None
        router.to(device=device, dtype=torch.float32)
    return MoLELinear(
        base,
        experts=experts,
        router=router,
        router_view=router_view,
        dropout=config.dropout,
        kernel_backend=config.kernel_backend,
    )


def _router_fixed_experts(
    plans: list[LayerPlan], router_cls: type[Router], router_config: RouterConfig
) -> list[LayerPlan]:
    """The plans with the expert count the router's rule fixes, when it fixes one (see ``Router.fixed_num_experts``)."""
    fixed = router_cls.fixed_num_experts(router_config)
    if fixed is None:
        return plans
    differ = sorted({plan.num_experts for plan in plans if plan.num_experts != fixed})
    if differ:
        logger.warning(
            "router %r fixes %d experts per layer; the allocation's expert counts %s are not used",
            router_cls.name, fixed, differ,
        )  # fmt: skip
    return [dataclasses.replace(plan, num_experts=fixed) for plan in plans]


@takes_model
def inject(model: nn.Module, config: MoLEConfig) -> nn.Module:
    """Replace the target linears of ``model`` by MoLE layers, in place; freeze everything else.

    Returns ``model``. The base weights are kept (as ``<name>.base_layer``) and frozen; only the
    experts and routers train. A fresh injection leaves outputs unchanged (``B = 0``).
    ``config`` is not changed: the model keeps a copy (with ``base_model_name_or_path`` filled in from
    the model when unset), which :func:`get_config` returns. The router class is looked up once and every
    router is built from the one config dataclass ``config.router``.
    Quantized linears (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, torchao weight-only) are wrapped
    as they are; their experts are float32 (or the base's compute dtype with ``autocast_adapter_dtype=False``).
    """
    if not isinstance(config, MoLEConfig):
        raise TypeError(f"inject needs a molex.MoLEConfig, got {type(config).__name__}")
    if is_injected(model):
        raise ValueError("model already has MoLE layers; call molex.unload(model) before injecting again")
    router_cls = config.router_class()  # the one registry lookup of this inject
    recorded = copy.deepcopy(config)  # the model's copy; the caller's config stays as given
    router_config = recorded.router  # every router is built from this one object (get_config(model).router)
    if not isinstance(router_cls.scope, Scope):  # set on the class after it was created
        raise ValueError(
            f"router {router_cls.name!r} has scope {router_cls.scope!r}, which inject cannot place; "
            "declare scope = Scope.LINEAR, Scope.BLOCK or Scope.MODEL (molex.routers.base.Scope)"
        )
    names = find_target_modules(model, config)
    prepare_for_training(model)  # quantized layers that would stop passing gradients (bitsandbytes on CPU)
    no_backward = [name for name, module in model.named_modules() if needs_dense_backward(module)]
    if no_backward:
        logger.warning(
            "%d linear layers (%s, ...) hold quantized weights whose matmul has no backward (torchao int4): "
            "training stops at the first backward through them; call molex.quant.add_dense_backward(model) "
            "before inject (load_model(..., quantization='torchao-int4') already does)",
            len(no_backward), no_backward[0],
        )  # fmt: skip
    plans = plan_allocation(
        names, config.allocation, decoder_layers(model), num_experts=config.num_experts, rank=config.rank
    )
    plans = _router_fixed_experts(plans, router_cls, router_config)
    modules = dict(model.named_modules())
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    context = install_context(model)
    placement = None
    try:
        if router_cls.scope is not Scope.LINEAR:  # one router shared by several layers, seen through views
            dims = {plan.name: linear_dims(modules[plan.name])[0] for plan in plans}
            placement = place(model, router_cls, plans, router_config, dims, context)
        views = placement.views if placement is not None else {}
        new_layers = {
            plan.name: _build_layer(modules[plan.name], plan, config, router_cls, router_config, views.get(plan.name))
            for plan in plans
        }
    except Exception:
        if placement is not None:
            remove(placement)
        remove_context(model)
        raise

    model.requires_grad_(False)
    for name, layer in new_layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
    for layer in new_layers.values():
        layer.context = context
        layer.experts.requires_grad_(True)
    for router in routers_of(model).values():  # per-layer and shared (block / model) routers
        router.requires_grad_(True)
        router.train(model.training)  # new modules start in training mode; follow the model (dropout, jitter)
    for layer in new_layers.values():
        layer.train(model.training)
    declare_readers(context, routers_of(model).values())  # which routing inputs to check at each call
    if recorded.base_model_name_or_path is None:
        recorded.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    state = {"config": recorded, "plans": plans, "requires_grad": requires_grad, "placement": placement}
    set_unregistered(model, _STATE_ATTR, state)  # bookkeeping, not part of the model (see molex.core.refs)
    return model


def is_injected(model: nn.Module) -> bool:
    return get_unregistered(model, _STATE_ATTR) is not None


@takes_model
def get_config(model: nn.Module) -> MoLEConfig:
    """The model's copy of the :class:`MoLEConfig` it was injected with (``base_model_name_or_path`` filled in)."""
    if not is_injected(model):
        raise ValueError("this model has no MoLE layers; call molex.inject(model, config) first")
    return get_unregistered(model, _STATE_ATTR)["config"]


def get_plans(model: nn.Module) -> list[LayerPlan]:
    get_config(model)
    return list(get_unregistered(model, _STATE_ATTR)["plans"])


@takes_model
def mole_layers(model: nn.Module) -> dict[str, MoLELinear]:
    """``{module name: MoLELinear}`` in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLELinear)}


@takes_model
def unload(model: nn.Module) -> nn.Module:
    """Put the original modules back; outputs, ``state_dict`` and ``requires_grad`` as before ``inject``.

    The very same base modules come back, so a quantized base is returned untouched (nothing is merged).
    """
    if not is_injected(model):
        raise ValueError("this model has no MoLE layers to unload")
    for name, layer in mole_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    state = pop_unregistered(model, _STATE_ATTR)
    if state.get("placement") is not None:
        remove(state["placement"])
    remove_context(model)
    for name, param in model.named_parameters():
        param.requires_grad_(state["requires_grad"].get(name, param.requires_grad))
    return model


@takes_model
def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@takes_model
def aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """The weighted auxiliary losses of the last forward, ``{"<layer>/<loss>": value}``."""
    out: dict[str, Tensor] = {}
    for name, layer in mole_layers(model).items():
        decision = layer.last_decision
        if decision is not None:
            out.update({f"{name}/{key}": value for key, value in decision.aux_losses.items()})
    return out


#: how :func:`total_aux_loss` combines the layers' losses of one kind
AUX_REDUCTIONS = ("mean", "sum")


@takes_model
def aux_losses_by_kind(model: nn.Module, *, reduction: str = "mean") -> dict[str, Tensor]:
    """The auxiliary losses of the last forward, one scalar per kind (``{"load_balance": ..., "z_loss": ...}``).

    ``reduction="mean"`` (the default) averages each kind over the routing units that emitted it: every
    MoLE layer with its own router, or once per shared (block / model) router, which reports its losses
    through a single layer. Each value stays weighted by its router's coefficient, so a coefficient means
    the same pressure toward balance whether the model has 2 MoLE layers or 90, as in Mixtral's and
    MixLoRA's load-balancing term, computed over all layers' tokens at once. ``reduction="sum"`` adds
    them instead (every layer at full coefficient, the convention before this option existed; with ``L``
    reporting layers it equals ``"mean"`` with every coefficient multiplied by ``L``).
    """
    if reduction not in AUX_REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(AUX_REDUCTIONS)}, got {reduction!r}")
    by_kind: dict[str, list[Tensor]] = {}
    for key, value in aux_losses(model).items():
        by_kind.setdefault(key.rsplit("/", 1)[-1], []).append(value.float())
    reduce = torch.mean if reduction == "mean" else torch.sum
    return {kind: reduce(torch.stack(values)) for kind, values in by_kind.items()}


@takes_model
def total_aux_loss(model: nn.Module, *, reduction: str = "mean") -> Tensor | None:
    """The auxiliary losses of the last forward as one scalar to add to the LM loss, or ``None`` if there
    are none: the sum over loss kinds of :func:`aux_losses_by_kind` (each kind averaged over the layers
    that emitted it by default; ``reduction="sum"`` sums every layer's losses instead)."""
    kinds = aux_losses_by_kind(model, reduction=reduction)
    return torch.stack(list(kinds.values())).sum() if kinds else None


def _count(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


@takes_model
def summary(model: nn.Module) -> str:
    """A table: layer -> experts, rank, router, trainable parameters; then totals."""
    layers = mole_layers(model)
    rows = [("layer", "experts", "rank", "router", "trainable")]
    for name, layer in layers.items():
        router = layer.active_router
        rows.append(
            (
                name,
                str(layer.experts.num_experts),
                str(layer.experts.rank),
                getattr(router, "name", type(router).__name__),
                f"{_count(p for p in layer.parameters() if p.requires_grad):,}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    trainable = _count(trainable_parameters(model))
    total = _count(model.parameters())
    lines.append(
        f"{len(layers)} MoLE layers, {trainable:,} trainable of {total:,} parameters "
        f"({100.0 * trainable / max(total, 1):.3f}%)"
    )
    return "\n".join(lines)


def routers_of(model: nn.Module) -> dict[str, Router]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Router)}
