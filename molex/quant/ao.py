"""torchao weight-only bases, and the ``torchao-int8`` / ``torchao-int4`` schemes.

torchao keeps the module an ``nn.Linear`` and swaps its ``weight`` for a tensor subclass, so such a layer
is recognised by its weight's class. What runs on CPU (torch 2.13, torchao 0.18):

* int8 weight-only (``Int8WeightOnlyConfig``, per-row ``Int8Tensor``): forward and backward.
* int4 weight-only: ``Int4WeightOnlyConfig``'s layouts do not run on CPU (``plain`` and ``preshuffled``
  need the ``mslk`` GPU kernels, ``tile_packed_to_4d`` needs CUDA, ``plain_int32`` has no CPU path).
  The CPU layout is ``Int4OpaqueTensor`` (torchao's ``PrototypeInt4WeightOnlyConfig``, the
  ``_weight_int4pack_mm_for_cpu`` kernel), which is what ``torchao-int4`` builds. Its matmul has no
  backward, so each layer becomes a :class:`~molex.quant.grad.DenseBackwardLinear` (an ``nn.Linear``
  over the same weight) that computes the input's gradient from the dense weight.
  Groups are 128, 64 or 32 input columns (the largest that divides the layer's ``in_features``); a layer
  no group size divides stays float, with a warning naming it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from molex.quant.base import (
    QuantizedKind,
    QuantScheme,
    float_linears,
    package_available,
    register_kind,
    register_scheme,
    replace_module,
)
from molex.quant.grad import DenseBackwardLinear

__all__ = ["INT4_GROUP_SIZES", "is_available"]

logger = logging.getLogger(__name__)

PACKAGE = "torchao"
#: int4 group sizes tried, largest first (torchao's CPU int4 kernel takes 32, 64, 128 or 256)
INT4_GROUP_SIZES = (128, 64, 32)
# weight classes whose matmul carries its own backward for the input; every other torchao weight
# gets molex's dense backward (always correct, at the cost of one dense matmul)
_OWN_BACKWARD = {"Int8Tensor"}


def is_available() -> bool:
    return package_available(PACKAGE)


def _torchao_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and any(
        cls.__module__.startswith("torchao") for cls in type(weight).__mro__ if cls is not torch.Tensor
    )


def _describe(module: nn.Module) -> str:
    return f"torchao {type(module.weight).__name__} weight"


register_kind(
    QuantizedKind(
        name="torchao quantized weight",
        matches=_torchao_weight,
        compute_dtype=lambda module: module.weight.dtype,  # the subclass reports the dtype it computes in
        dense_backward=lambda module: (
            not isinstance(module, DenseBackwardLinear) and type(module.weight).__name__ not in _OWN_BACKWARD
        ),
        describe=_describe,
    )
)


def _log_import_notices() -> None:
    """What torchao said on import (dropped from the output by :mod:`molex.quant.quiet`), now that it is used."""
    from molex.quant.quiet import suppressed

    for message in suppressed():
        logger.debug("on import, torchao said: %s", message)


def _quantize_int8(model: nn.Module, dtype: torch.dtype) -> list[str]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    _log_import_notices()

    names = list(float_linears(model))
    chosen = set(names)
    # set_inductor_config=False: quantizing must not change torch.compile's global settings
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, fqn: fqn in chosen)
    return names


def _quantize_int4(model: nn.Module, dtype: torch.dtype) -> list[str]:
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    _log_import_notices()
    names, skipped = [], []
    for name, linear in float_linears(model).items():
        group = next((g for g in INT4_GROUP_SIZES if linear.in_features % g == 0), None)
        if group is None:
            skipped.append(f"{name} (in_features={linear.in_features})")
            continue
        config = PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
        quantize_(linear, config, filter_fn=lambda m, fqn: fqn == "")
        replace_module(model, name, DenseBackwardLinear.from_linear(linear))  # the kernel has no backward
        names.append(name)
    if names:  # measured in benchmarks/RESULTS.md ("Quantized bases"): memory, not time, is what it saves
        logger.warning(
            "torchao-int4 uses torchao's CPU int4 kernel: on an AVX2 CPU a SmolLM2-135M training step took about "
            "35x its float32 time (the matmul alone 58x); it saves memory, not time; nf4 and int8 train within "
            "10%% of float32"
        )
    if skipped:
        logger.warning(
            "torchao-int4 needs in_features divisible by one of %s; these layers stay %s: %s",
            list(INT4_GROUP_SIZES), dtype, ", ".join(skipped),
        )  # fmt: skip
    return names


register_scheme(
    QuantScheme(
        name="torchao-int8",
        package=PACKAGE,
        description="torchao int8 weight-only, per output row (Int8Tensor)",
        quantize=_quantize_int8,
    )
)
register_scheme(
    QuantScheme(
        name="torchao-int4",
        package=PACKAGE,
        description="torchao int4 weight-only, asymmetric groups of 128/64/32 (CPU layout Int4OpaqueTensor)",
        quantize=_quantize_int4,
    )
)
