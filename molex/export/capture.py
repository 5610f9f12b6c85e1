"""What a routed model's expert op sees, layer by layer: its factors and the gate of every token.

A MoLE layer computes ``delta = sum_j g_j s_j B_j^T A_j x`` over the factors its router hands to the
expert op (:meth:`molex.routers.base.Router.kernel_inputs`: the pool's experts, or derived ones such as
MTL-LoRA's per-task LoRAs and AdaMix's averaged LoRA). :func:`capture_gates` runs the model on a
batch and records, per layer, those factors and the dense gate ``g [B, S, E']`` of every token;
:func:`lora_of_gate` turns one gate row into the single LoRA ``(A [R, in], B [out, R])`` it amounts to.
The exits (:mod:`molex.export.routes`, :mod:`molex.export.single`, :mod:`molex.export.merge_route`)
are built on these two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from molex.layer.inject import mole_layers
from molex.layer.linear import MoLELinear
from molex.routers.base import Router

__all__ = [
    "LayerFactors",
    "LayerGates",
    "capture_gates",
    "check_model_batch",
    "eval_mode",
    "is_conv1d",
    "layer_router",
    "lora_of_gate",
    "pool_factors",
]


@dataclass
class LayerFactors:
    """The factors one layer's expert op multiplies: ``A [E', r, in]`` (``[1, r, in]`` when shared),
    ``B [E', r, out]`` and ``scaling [E']``."""

    A: Tensor
    B: Tensor
    scaling: Tensor

    @property
    def num_experts(self) -> int:
        return self.B.shape[0]


@dataclass
class LayerGates:
    """One layer's factors and the dense gate of every token of a batch: ``gates [B, S, E']``."""

    factors: LayerFactors
    gates: Tensor


def layer_router(layer: MoLELinear) -> Router:
    """The router deciding for ``layer``: its own, or the shared (block / model) router behind its view."""
    if layer.router is not None:
        return layer.router
    return layer.active_router.router


def pool_factors(layer: MoLELinear) -> LayerFactors:
    """The layer's own expert pool as factors (what explicit per-expert weights mix)."""
    experts = layer.experts
    return LayerFactors(experts.lora_A.detach(), experts.lora_B.detach(), experts.scaling.detach())


def is_conv1d(layer: MoLELinear) -> bool:
    """GPT-2 style ``Conv1D`` base (``weight [in, out]``), which PEFT marks with ``fan_in_fan_out``."""
    return type(layer.base_layer).__name__ == "Conv1D"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` and no autograd inside the block; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _kernel_view(layer: MoLELinear) -> tuple[LayerFactors, Tensor]:
    """``(factors, gate [T, E'])`` of the layer's last forward, as its expert op saw them."""
    decision = layer.last_decision
    kernel_inputs = getattr(layer.active_router, "kernel_inputs", None)
    if kernel_inputs is None:  # a shared router's view: the pool's own factors
        A, B, scaling, applied = layer.experts.lora_A, layer.experts.lora_B, layer.experts.scaling, decision
    else:
        A, B, scaling, applied = kernel_inputs(layer.experts, decision, layer.context)
    factors = LayerFactors(A.detach(), B.detach(), scaling.detach())
    return factors, applied.to_dense(factors.num_experts).detach().float()


#: what a batch of model inputs looks like, for the messages of :func:`check_model_batch`
BATCH_FORM = (
    "a dict of tensors such as {'input_ids': LongTensor [B, S], 'attention_mask': [B, S]} "
    "(tokenize texts first, e.g. tokenizer(texts, padding=True, return_tensors='pt'))"
)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_model_batch(batch: Any, where: str = "batch") -> Mapping[str, Any]:
    """``batch`` itself once it is a dict of model inputs holding ``input_ids [B, S]`` (and, if given, an
    ``attention_mask`` of that shape); otherwise a clear error naming ``where`` (e.g. ``calibration_batches[3]``).

    Exports run the model on the caller's batches and index their masks; a text, a list of ids or a
    batch of the wrong shape would otherwise fail inside the model or torch, naming neither the batch nor
    what it should be.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where} is a {type(batch).__name__} ({_shown(batch)}), not a batch: it must be {BATCH_FORM}")
    if "input_ids" not in batch:
        raise ValueError(f"{where} has no 'input_ids' (its keys: {sorted(map(str, batch))}): it must be {BATCH_FORM}")
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        what = f"a tensor of shape {tuple(ids.shape)} ({ids.dtype})" if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(
            f"{where}['input_ids'] is {what}: it must be an integer tensor [B, S]; {where} must be {BATCH_FORM}"
        )
    mask = batch.get("attention_mask")
    if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        what = f"of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else f"a {type(mask).__name__}"
        raise ValueError(
            f"{where}['attention_mask'] is {what} but input_ids has shape {tuple(ids.shape)}: give a tensor of "
            "the same [B, S] shape (1 = real token), or leave it out"
        )
    return batch


def capture_gates(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, LayerGates]:
    """Run ``model(**batch)`` (``labels`` left out) and return every MoLE layer's factors and gates.

    ``batch`` holds ``input_ids [B, S]``, ``attention_mask [B, S]`` and any routing inputs
    (``task_ids``, ``route_text``, ...). Gates are ``[B, S, E']`` (float32); the caller picks the
    real tokens with the attention mask. Call it inside :func:`eval_mode`.
    """
    check_model_batch(batch)
    layers = mole_layers(model)
    if not layers:
        raise ValueError("this model has no MoLE layers; load or inject a molex adapter first")
    captured: dict[str, tuple[LayerFactors, Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            captured[name] = _kernel_view(module)

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    input_ids = batch["input_ids"]
    rows, seq = input_ids.shape
    out = {}
    for name in layers:
        if name not in captured:
            raise RuntimeError(f"MoLE layer {name!r} did not run in the forward pass; it cannot be exported")
        factors, gate = captured[name]
        out[name] = LayerGates(factors, gate.view(rows, seq, -1))
    return out


def lora_of_gate(factors: LayerFactors, gate: Tensor) -> tuple[Tensor, Tensor] | None:
    """The one LoRA ``(A [R, in], B [out, R])`` equal to ``sum_j gate_j s_j B_j^T A_j`` (scaling folded into B).

    Experts of weight 0 are dropped; the A's rows are concatenated and the weighted, scaled B's
    columns too, so ``R`` is the sum of the chosen experts' ranks (``r`` for a shared ``A``: the B's
    add up). Rank components whose A row or B column is all zero (the zero padding of a fused hub's
    smaller adapters) add nothing and are dropped too. ``None`` when nothing is left.
    """
    weights = gate.double().cpu() * factors.scaling.double().cpu()
    chosen = [j for j in range(weights.shape[0]) if weights[j] != 0]
    if not chosen:
        return None
    dtype = factors.A.dtype
    A_all, B_all = factors.A.double(), factors.B.double()
    if A_all.shape[0] == 1 and B_all.shape[0] > 1:  # shared A: one down-projection, the B's add up
        A = A_all[0]
        B = sum(weights[j].to(B_all.device) * B_all[j] for j in chosen)
    else:
        A = torch.cat([A_all[j] for j in chosen])
        B = torch.cat([weights[j].to(B_all.device) * B_all[j] for j in chosen])
    keep = (A != 0).any(dim=1) & (B != 0).any(dim=1)
    if not bool(keep.any()):
        return None
    return A[keep].to(dtype), B[keep].t().to(dtype).contiguous()
