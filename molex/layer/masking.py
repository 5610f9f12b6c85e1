"""Masking experts at inference: remove chosen experts (or fused adapters) from routing, no retraining.

``molex.mask_experts(model, ["code"])`` (adapter names of a fused hub, or expert indices) sets a
bool mask ``[E]`` on every MoLE layer. Routing then proceeds as if the masked experts did not exist,
as Microsoft's MoLE does: the router's distribution is restricted to the others and renormalised
*before* its top-k choice (token-level routers) or per sequence (``dlp``, ``milora``).
``molex.unmask_experts(model)`` removes the mask; the model's outputs are then bit for bit those of
before. ``with molex.masked_experts(model, [...]):`` does both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from molex.core.model_argument import takes_model
from molex.layer.expert_mask import apply_expert_mask

__all__ = ["apply_expert_mask", "mask_experts", "masked_experts", "unmask_experts"]


def _layer_masks(model: nn.Module, names_or_indices: Sequence[str | int]) -> dict[str, Tensor]:
    from molex.layer.inject import get_config, mole_layers

    layers = mole_layers(model)
    if not layers:
        raise ValueError("the model has no MoLE layers: call molex.inject or molex.fuse_adapters first")
    chosen = list(names_or_indices) if not isinstance(names_or_indices, (str, int)) else [names_or_indices]
    if not chosen:
        raise ValueError("no experts to mask: pass adapter names or expert indices, e.g. mask_experts(model, [0])")
    hub = get_config(model).hub
    # a fused hub's record (molex.fuse_adapters): adapter names, and each module's adapter index per expert
    names = list(hub["adapters"]) if hub else []
    slots = {module: list(indices) for module, indices in hub["experts"].items()} if hub else {}
    masks = {}
    for layer_name, layer in layers.items():
        num_experts = layer.experts.num_experts
        mask = torch.zeros(num_experts, dtype=torch.bool)
        for item in chosen:
            if isinstance(item, str):
                if item not in names:
                    known = names or "none (the model is not a fused hub: use expert indices)"
                    raise ValueError(f"cannot mask {item!r}: not a fused adapter; adapters: {known}")
                index = names.index(item)
                layer_slots = slots.get(layer_name, list(range(num_experts)))
                mask[[s for s, a in enumerate(layer_slots) if a == index]] = True
            elif isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < num_experts:
                    raise ValueError(f"cannot mask expert {item}: layer {layer_name!r} has {num_experts} experts")
                mask[item] = True
            else:
                raise TypeError(f"mask entries are adapter names or expert indices, got {item!r}")
        if bool(mask.all()):
            raise ValueError(f"masking {chosen} leaves layer {layer_name!r} no expert; keep at least one")
        masks[layer_name] = mask
    return masks


@takes_model
def mask_experts(model: nn.Module, names_or_indices: Sequence[str | int]) -> nn.Module:
    """Remove experts from routing on every MoLE layer of ``model`` (replaces an earlier mask); returns it.

    ``names_or_indices``: fused adapter names (:func:`molex.adapter_names`) or expert indices.
    """
    from molex.layer.inject import mole_layers

    masks = _layer_masks(model, names_or_indices)
    for name, layer in mole_layers(model).items():
        mask = masks[name].to(layer.experts.lora_B.device)
        layer.expert_mask = mask
        router = layer.active_router
        if getattr(router, "applies_expert_mask", False):
            router.expert_mask = mask
    return model


@takes_model
def unmask_experts(model: nn.Module) -> nn.Module:
    """Undo :func:`mask_experts`: routing is again exactly that of the unmasked model."""
    from molex.layer.inject import mole_layers

    for layer in mole_layers(model).values():
        layer.expert_mask = None
        router = layer.active_router
        if getattr(router, "applies_expert_mask", False):
            router.expert_mask = None
    return model


@takes_model
@contextlib.contextmanager
def masked_experts(model: nn.Module, names_or_indices: Sequence[str | int]) -> Iterator[nn.Module]:
    """``with masked_experts(model, ["code"]): ...`` masks inside the block, unmasks on exit."""
    mask_experts(model, names_or_indices)
    try:
        yield model
    finally:
        unmask_experts(model)
