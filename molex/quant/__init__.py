"""Quantized frozen bases (QLoRA-style): schemes for :func:`molex.load_model` and the quantized linear
layers :func:`molex.inject` wraps. One file per library registers itself; none imports the library
until a model is quantized, so ``import molex`` works without them (``pip install 'molex-lora[quant]'``).
torchao's import-time notices, printed whenever ``transformers`` imports it, are dropped
(:mod:`molex.quant.quiet`): with the extra installed, an unquantized run prints nothing about it.
"""

from molex.quant import ao, bnb, quiet  # noqa: F401 - ao and bnb register their schemes
from molex.quant.base import (
    QuantizedKind,
    QuantScheme,
    available_quantizations,
    check_quantization,
    get_scheme,
    is_quantized,
    needs_dense_backward,
    prepare_for_training,
    quantized_kind,
    register_kind,
    register_scheme,
)
from molex.quant.grad import DenseBackwardLinear, add_dense_backward

quiet.install()

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
    "prepare_for_training",
    "quantized_kind",
    "register_kind",
    "register_scheme",
]
