"""Export AdaMix's averaged experts as one plain PEFT LoRA adapter.

A model trained with the ``stochastic`` router serves one LoRA per layer, the average of its
experts (``A = mean_e A_e``, ``B = mean_e B_e``, see :func:`molex.routers.average_experts`). That
LoRA needs neither molex nor a router at inference: this writes it in PEFT's format, which
``peft.PeftModel.from_pretrained(base, directory)`` loads.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from molex.hub.peft_format import write_peft_adapter
from molex.layer.inject import get_config, mole_layers
from molex.routers.stochastic import StochasticRouter, average_experts

__all__ = ["export_average_adapter"]


def export_average_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write every MoLE layer of ``model`` as its averaged LoRA, a PEFT adapter in ``directory``.

    ``model`` is the injected causal LM (module paths are taken relative to it, as PEFT names them).
    Each layer's scaling is folded into ``B`` (PEFT scaling 1). Every layer must use the
    ``stochastic`` router: other routers' mixtures are not one LoRA.
    """
    config = get_config(model)
    layers = mole_layers(model)
    other = sorted({type(layer.active_router).__name__ for layer in layers.values()} - {StochasticRouter.__name__})
    if other:
        raise ValueError(
            f"export_average_adapter exports AdaMix's averaged experts, so every layer needs the 'stochastic' "
            f"router; this model uses {other}"
        )
    modules = {}
    for name, layer in layers.items():
        A, B, scaling = average_experts(layer.experts)  # [1, r, in], [1, r, out], [1]
        modules[name] = (A[0], (B[0] * scaling.to(B.dtype)).t())
    conv1d = any(type(layer.base_layer).__name__ == "Conv1D" for layer in layers.values())  # GPT-2 style weights
    return write_peft_adapter(
        directory, modules, base_model_name_or_path=config.base_model_name_or_path, fan_in_fan_out=conv1d
    )
