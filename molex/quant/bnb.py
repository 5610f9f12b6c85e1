"""bitsandbytes: ``Linear4bit`` (NF4 / FP4) and ``Linear8bitLt`` bases, and the ``nf4`` / ``int8`` schemes.

bitsandbytes 0.50 runs both layers on CPU, forward and backward (its CPU backend dequantizes), as well as
on CUDA; their matmuls carry their own backward for the input, so molex calls them as they are.
``Linear4bit`` stores its weight packed (``weight.shape`` is ``[out * in / 2, 1]`` of uint8), so the
dimensions molex uses are the layer's ``in_features`` / ``out_features``, never ``weight.shape``.
"""

from __future__ import annotations

import torch
from torch import nn

from molex.quant.base import (
    QuantizedKind,
    QuantScheme,
    class_names,
    float_linears,
    register_kind,
    register_scheme,
    replace_module,
)

__all__ = ["is_available"]

PACKAGE = "bitsandbytes"
_LINEAR4 = "bitsandbytes.nn.modules.Linear4bit"
_LINEAR8 = "bitsandbytes.nn.modules.Linear8bitLt"


def is_available() -> bool:
    from molex.quant.base import package_available

    return package_available(PACKAGE)


def _is_4bit(module: nn.Module) -> bool:
    return _LINEAR4 in class_names(module)


def _is_8bit(module: nn.Module) -> bool:
    return _LINEAR8 in class_names(module)


def _compute_dtype_4bit(module: nn.Module) -> torch.dtype:
    # None until the first forward when the user did not set it: bitsandbytes then follows the input
    return getattr(module, "compute_dtype", None) or torch.float32


def _keep_4bit_trainable(module: nn.Module) -> None:
    """Keep a ``Linear4bit`` passing gradients to its input on CPU.

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weight for its CPU inference kernel the
    first time the layer runs in eval mode on an input that needs no gradient (a validation pass, a
    ``generate`` call), and from then on its output has no gradient for its input, in training too: every
    adapter below such a layer stops learning (measured: the default run on an NF4 SmolLM2 ended at 12.5%
    exact match, its ``q_proj`` / ``v_proj`` experts untouched). molex turns the repacking off and undoes one
    that already happened (bitsandbytes' inverse rounds the block scales: outputs stay within 1%)."""
    module.support_avx512bf16_for_cpu = False
    state = getattr(module.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, state
        )


def _describe_4bit(module: nn.Module) -> str:
    quant_type = getattr(module.weight, "quant_type", None) or "4-bit"
    return f"bitsandbytes Linear4bit ({quant_type})"


register_kind(
    QuantizedKind(
        name="bitsandbytes Linear4bit",
        matches=_is_4bit,
        compute_dtype=_compute_dtype_4bit,
        describe=_describe_4bit,
        prepare=_keep_4bit_trainable,
    )
)
register_kind(
    QuantizedKind(
        name="bitsandbytes Linear8bitLt (int8)",
        matches=_is_8bit,
        # an int8 layer computes in its input's dtype; float32 experts are the safe default
        compute_dtype=lambda module: torch.float32,
    )
)


def _quantize(model: nn.Module, dtype: torch.dtype, *, bits: int) -> list[str]:
    import bitsandbytes as bnb

    names = []
    for name, linear in float_linears(model).items():
        has_bias = linear.bias is not None
        weight = linear.weight.data
        if bits == 4:
            new = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype, quant_type="nf4",
                device="meta",
            )  # fmt: skip
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            # threshold 6.0: LLM.int8()'s outlier columns, as transformers' BitsAndBytesConfig sets it
            new = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0,
                device="meta",
            )  # fmt: skip
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if has_bias:
            new.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
        new = new.to(weight.device)  # bitsandbytes quantizes when the parameter is moved to its device
        new.train(linear.training)
        replace_module(model, name, new)
        names.append(name)
    return names


for _name, _bits, _description in (
    ("nf4", 4, "bitsandbytes Linear4bit, NF4 (QLoRA's 4-bit normal float), blocks of 64"),
    ("int8", 8, "bitsandbytes Linear8bitLt (LLM.int8(): per-row absmax int8, outlier threshold 6)"),
):
    register_scheme(
        QuantScheme(
            name=_name,
            package=PACKAGE,
            description=_description,
            quantize=lambda model, dtype, bits=_bits: _quantize(model, dtype, bits=bits),
        )
    )
