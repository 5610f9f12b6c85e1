"""Quantized frozen bases (QLoRA-style): schemes for :func:`molex.load_model` and the quantized linear
layers :func:`molex.inject` wraps. One file per library registers itself; none imports the library
until a model is quantized, so ``import molex`` works without them (``pip install 'molex[quant]'``).
"""

from molex.quant import ao, bnb  # noqa: F401 - registration side effect
from molex.quant.base import (
    QuantizedKind,
    QuantScheme,
    available_quantizations,
    check_quantization,
    get_scheme,
    is_quantized,
    needs_dense_backward,
    quantized_kind,
    register_kind,
    register_scheme,
)
from molex.quant.grad import DenseBackwardLinear, add_dense_backward

__all__ = [
    "DenseBackwardLinear",
    "QuantScheme",
    "QuantizedKind",
    "add_dense_backward",
    "available_quantizations",
    "check_quantization",
    "get_scheme",
    "is_quantized",
    "needs_dense_backward",
    "quantized_kind",
    "register_kind",
    "register_scheme",
]
