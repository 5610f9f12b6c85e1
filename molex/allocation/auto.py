"""Automatic layer-wise allocation: measure each layer after a short warm-up, then re-build its expert pool.

``AllocationConfig(schedule="auto", total_experts=N)`` injects the even split of ``N`` experts over the
decoder layers. After ``warmup_steps`` of training, :func:`decide_allocation` measures one signal per
layer and shares ``N`` in proportion to it (:func:`molex.allocation.budget.apportion`: largest remainder, within
``min_experts`` .. ``max_experts``, summing to ``N`` exactly, so the parameter budget is unchanged), and
:func:`reallocate` re-builds the pools with those counts, warm-started from the warm-up's experts. The
decision is stored in the model's config as ``allocation.per_layer``: a saved adapter records it and
loads into the same pools without a warm-up, and ``AllocationConfig(per_layer=[...])`` reuses it.

The signal is **how far the layer's experts moved during the warm-up**: for every pool, the mean over
its experts of ``||s_e (B_e^T A_e - B0_e^T A0_e)||_F`` (the Frobenius norm of the change of the expert's
weight update ``Delta W_e [out, in]`` since the warm-up began, ``s_e`` its scaling), summed over the
layer's MoLE modules. A layer whose routed update the loss keeps pushing in one direction moves most,
so it is where extra capacity is most likely to be used; a layer that barely moves is served by few
experts. It needs no extra forward or hook (read from the weights alone, the same in every training
loop), and the mean over a pool's experts keeps the layers the even split gave one more expert from
looking stronger.

Without Lightning: :func:`auto_allocate` runs the warm-up with :func:`molex.training.train_steps`,
decides and re-builds; build the optimizer of the rest of the training afterwards (the parameters
are new). Under Lightning, ``MoLEModule`` adds :class:`molex.lightning.auto_allocation.AutoAllocation`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from molex.allocation.budget import apportion
from molex.allocation.plan import AllocationConfig, auto_bounds, layers_spanned
from molex.core.files import atomic_write
from molex.core.model_argument import takes_model
from molex.core.tables import format_rows
from molex.layer.health import enable_routing_health, routing_health_settings
from molex.layer.inject import decoder_layers, get_config, get_plans, inject, mole_layers, unload
from molex.layer.io import adapter_state_dict
from molex.training import OptimSettings, train_steps
from molex.training.objective import mole_objective

__all__ = [
    "AllocationDecision",
    "auto_allocate",
    "decide_allocation",
    "layer_signals",
    "pending_auto_allocation",
    "plot_allocation",
    "reallocate",
    "snapshot_experts",
]

#: ``{MoLE layer name: (lora_A, lora_B)}`` copies taken when the warm-up starts
Snapshot = dict[str, tuple[Tensor, Tensor]]


@dataclasses.dataclass(frozen=True)
class AllocationDecision:
    """What the automatic allocation measured and chose, one entry per decoder layer (bottom to top).

    Attributes:
        signals: each layer's warm-up update norm (see the module docstring).
        warmup: the experts each layer trained with during the warm-up (the even split).
        per_layer: the experts each layer gets from now on; ``sum(per_layer) == total``.
        total, min_experts, max_experts: the budget and the bounds the split respected.
    """

    signals: list[float]
    warmup: list[int]
    per_layer: list[int]
    total: int
    min_experts: int
    max_experts: int

    def table(self, *, markdown: bool = False) -> str:
        """A per-layer table (signal, its share, experts during the warm-up and after), totals last."""
        whole = sum(self.signals) or 1.0
        rows = [
            [str(i), f"{s:.4g}", f"{100 * s / whole:.1f}%", str(w), str(n)]
            for i, (s, w, n) in enumerate(zip(self.signals, self.warmup, self.per_layer, strict=True))
        ]
        rows.append(["total", "", "", str(sum(self.warmup)), str(sum(self.per_layer))])
        return format_rows(["layer", "signal", "share", "warm-up", "experts"], rows, markdown=markdown)

    def reuse_hint(self) -> str:
        """How to train with this allocation again without a warm-up."""
        counts = ",".join(map(str, self.per_layer))
        return f"reuse with AllocationConfig(per_layer=[{counts}]) or molex-train +allocation.per_layer=[{counts}]"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pending_auto_allocation(model: nn.Module) -> AllocationConfig | None:
    """The model's allocation when it is ``schedule="auto"`` and not decided yet, else ``None``."""
    alloc = get_config(model).allocation
    return alloc if alloc is not None and alloc.schedule == "auto" and alloc.per_layer is None else None


def _num_layers(model: nn.Module) -> int:
    # the count inject gave plan_allocation
    return decoder_layers(model) or layers_spanned(p.layer_index for p in get_plans(model))


@torch.no_grad()
def snapshot_experts(model: nn.Module) -> Snapshot:
    """Copies of every MoLE layer's ``lora_A [E|1, r, in]`` and ``lora_B [E, r, out]``: where the warm-up starts."""
    return {
        name: (m.experts.lora_A.detach().clone(), m.experts.lora_B.detach().clone())
        for name, m in mole_layers(model).items()
    }


@torch.no_grad()
def _update_norms(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor, scaling: Tensor) -> Tensor:
    """``||s_e (B_e^T A_e - B0_e^T A0_e)||_F`` for every expert ``e`` -> ``[E]``, without forming ``[out, in]``.

    With ``U = [B_e; -B0_e] [2r, out]`` and ``V = [A_e; A0_e] [2r, in]`` the change is ``U^T V``, whose
    squared norm is ``sum((U U^T) * (V V^T))``: two ``[2r, 2r]`` Gram matrices per expert.
    """
    experts = B.shape[0]
    U = torch.cat([B, -B0], dim=1).double()
    V = torch.cat([A.expand(experts, -1, -1), A0.expand(experts, -1, -1)], dim=1).double()
    squared = ((U @ U.transpose(1, 2)) * (V @ V.transpose(1, 2))).sum((1, 2))
    return squared.clamp_min(0).sqrt() * scaling.double().abs()


def layer_signals(model: nn.Module, snapshot: Snapshot) -> list[float]:
    """One signal per decoder layer: the mean update norm of each pool's experts since ``snapshot``,
    summed over the layer's MoLE modules (modules outside the decoder layers are left out)."""
    signals = [0.0] * _num_layers(model)
    index = {plan.name: plan.layer_index for plan in get_plans(model)}
    for name, layer in mole_layers(model).items():
        if index.get(name) is None or name not in snapshot:
            continue
        experts = layer.experts
        norms = _update_norms(experts.lora_A, experts.lora_B, *snapshot[name], experts.scaling)
        signals[index[name]] += float(norms.mean())
    return signals


def decide_allocation(model: nn.Module, snapshot: Snapshot) -> AllocationDecision:
    """Share the model's ``schedule="auto"`` budget among its layers in proportion to :func:`layer_signals`."""
    alloc = pending_auto_allocation(model)
    if alloc is None:
        raise ValueError(
            "the model's allocation is not an undecided schedule='auto': inject it with "
            "AllocationConfig(schedule='auto', total_experts=N) to decide the experts per layer"
        )
    config = get_config(model)
    num_layers = _num_layers(model)
    total, low, high = auto_bounds(num_layers, alloc, config.num_experts)
    signals = layer_signals(model, snapshot)
    return AllocationDecision(
        signals=signals,
        warmup=apportion([1.0] * num_layers, total, low=low, high=high),
        per_layer=apportion(signals, total, low=low, high=high),
        total=total,
        min_experts=low,
        max_experts=high,
    )


@torch.no_grad()
def _warm_start(model: nn.Module, old: dict[str, Tensor], old_counts: dict[str, int]) -> None:
    """Copy the previous pools' tensors into the new ones: whole where the shapes agree, the first
    ``min(old, new)`` experts where they differ only along the expert dimension (router rows included)."""
    layers = mole_layers(model)
    for key, target in adapter_state_dict(model).items():
        source = old.get(key)
        if source is None:
            continue
        if source.shape == target.shape:
            target.copy_(source)
            continue
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None or source.dim() != target.dim():
            continue
        was, now = old_counts[owner], layers[owner].experts.num_experts
        differ = [d for d, (a, b) in enumerate(zip(source.shape, target.shape, strict=True)) if a != b]
        if all(source.shape[d] == was and target.shape[d] == now for d in differ):
            keep = tuple(slice(0, min(was, now)) if d in differ else slice(None) for d in range(source.dim()))
            target[keep].copy_(source[keep])


def reallocate(model: nn.Module, per_layer: list[int]) -> nn.Module:
    """Re-build the pools of a ``schedule="auto"`` model with ``per_layer`` experts, warm-started.

    Each layer keeps its first ``min(old, new)`` experts' weights and their router rows; new experts
    start as :func:`molex.inject` starts them (``B = 0``, so they add nothing yet). The config records
    ``per_layer`` (and the total) from now on. Returns ``model``, whose trainable parameters are new
    tensors: build the optimizer again.
    """
    config = get_config(model)
    alloc = config.allocation
    if alloc is None or alloc.schedule != "auto":
        raise ValueError("reallocate re-builds a model injected with AllocationConfig(schedule='auto', ...)")
    counts = [int(n) for n in per_layer]
    decided = dataclasses.replace(alloc, per_layer=counts, total_experts=sum(counts), budget_schedule=None)
    new_config = dataclasses.replace(config, allocation=decided)
    old = {key: value.detach().clone() for key, value in adapter_state_dict(model).items()}
    old_counts = {name: layer.experts.num_experts for name, layer in mole_layers(model).items()}
    health = routing_health_settings(model)  # its hooks sit on the layers about to be replaced
    unload(model)
    try:
        inject(model, new_config)
    except Exception:
        inject(model, config)  # put the warm-up's pools back before reporting
        _warm_start(model, old, old_counts)
        raise
    finally:
        if health is not None:
            enable_routing_health(model, **health)
    _warm_start(model, old, old_counts)
    return model


@takes_model
def auto_allocate(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], Tensor] | None = None,
    *,
    warmup_steps: int | None = None,
    settings: OptimSettings | None = None,
) -> AllocationDecision:
    """Warm up, decide and re-build the pools of a model injected with ``AllocationConfig(schedule="auto")``.

    Args:
        model: injected with an undecided ``schedule="auto"`` allocation (its pools hold the even split).
        batches: training batches, cycled for the warm-up (dicts of model inputs with ``labels``).
        loss_fn: the loss of one batch; default: the MoLE objective of ``model(**batch)`` (LM loss plus
            the routers' auxiliary losses, :func:`molex.training.objective.mole_objective`).
        warmup_steps: optimizer steps before deciding (default: the allocation's ``warmup_steps``).
        settings: the warm-up's optimizer (default ``OptimSettings()``: AdamW, lr 1e-3).

    Returns the :class:`AllocationDecision`; the model then holds the decided pools (new parameters:
    build the optimizer for the rest of the training after this call).
    """
    alloc = pending_auto_allocation(model)
    if alloc is None:
        raise ValueError(
            "auto_allocate needs a model injected with AllocationConfig(schedule='auto', total_experts=N) whose "
            "allocation is not decided yet (allocation.per_layer is None)"
        )
    steps = alloc.warmup_steps if warmup_steps is None else warmup_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"auto_allocate: warmup_steps must be an integer >= 1, got {steps!r}")
    if loss_fn is None:

        def loss_fn(batch: Any) -> Tensor:
            return mole_objective(model, model(**batch)).total

    snapshot = snapshot_experts(model)
    train_steps(model, batches, loss_fn, steps=steps, settings=settings or OptimSettings(), name="auto_allocate")
    decision = decide_allocation(model, snapshot)
    reallocate(model, decision.per_layer)
    return decision


def plot_allocation(decision: AllocationDecision, path: str | Path) -> Path:
    """Save a PNG of the experts per layer (warm-up and decided) with each layer's signal share; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = list(range(len(decision.per_layer)))
    whole = sum(decision.signals) or 1.0
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(layers) + 2), 3.5))
    ax.bar([i - 0.2 for i in layers], decision.warmup, width=0.4, color="0.75", label="warm-up (even split)")
    ax.bar([i + 0.2 for i in layers], decision.per_layer, width=0.4, color="tab:blue", label="decided")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("experts")
    ax.set_title(
        f"automatic allocation: {decision.total} experts, {decision.min_experts}-{decision.max_experts} per layer"
    )
    share = ax.twinx()
    share.plot(layers, [100 * s / whole for s in decision.signals], color="tab:red", marker="o", label="signal share")
    share.set_ylabel("signal share (%)")
    handles = ax.get_legend_handles_labels()[0] + share.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize="small")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path
