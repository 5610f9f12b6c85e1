"""The quantization registry: named schemes for :func:`molex.load_model` and the quantized linear kinds
that :func:`molex.inject` can wrap.

A backend file (``molex.quant.bnb``, ``molex.quant.ao``) registers two things:

* :class:`QuantScheme`: a name users pass as ``load_model(..., quantization=name)`` and the function
  that quantizes a float model's linear layers in place;
* :class:`QuantizedKind`: how to recognise one of that library's quantized linear layers, its compute
  dtype, and whether gradients must flow through it by a dense backward (see :mod:`molex.quant.grad`).

Recognising a layer never imports the quantization library: it reads the class names, so
``import molex`` (and wrapping a plain model) works without ``bitsandbytes`` or ``torchao`` installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from molex.core.registry import Registry

__all__ = [
    "QuantScheme",
    "QuantizedKind",
    "available_quantizations",
    "check_quantization",
    "get_scheme",
    "is_quantized",
    "needs_dense_backward",
    "package_available",
    "quantized_kind",
    "register_kind",
    "register_scheme",
]


@dataclass(frozen=True)
class QuantScheme:
    """A named way to quantize a float model's linear layers (``load_model(..., quantization=name)``).

    ``quantize(model, dtype)`` replaces or converts the model's ``nn.Linear`` layers in place (never the
    output head, which is often tied to the input embeddings) and returns the names it quantized.
    """

    name: str
    package: str  #: the pip package it needs (in ``molex-lora[quant]``)
    description: str
    quantize: Callable[[nn.Module, torch.dtype], list[str]]

    def is_available(self) -> bool:
        return package_available(self.package)


@dataclass(frozen=True)
class QuantizedKind:
    """A quantized linear layer class of one library, recognised without importing that library."""

    name: str  #: shown in messages, e.g. ``"bitsandbytes Linear4bit (nf4)"``
    matches: Callable[[nn.Module], bool]
    #: the dtype the layer computes in (inputs and outputs), which the experts follow
    compute_dtype: Callable[[nn.Module], torch.dtype]
    #: ``True`` when the library's matmul has no backward for the input: molex supplies a dense one
    dense_backward: Callable[[nn.Module], bool] = lambda module: False
    describe: Callable[[nn.Module], str] | None = None
    #: puts the layer in a state gradients flow through (``None``: it always is)
    prepare: Callable[[nn.Module], None] | None = None

    def label(self, module: nn.Module) -> str:
        return self.describe(module) if self.describe is not None else self.name


#: quantization schemes of a frozen base by name (``load_model(quantization=name)``)
SCHEMES: Registry[QuantScheme] = Registry("quantization")
_KINDS: list[QuantizedKind] = []


def register_scheme(scheme: QuantScheme, *, replace: bool = False) -> QuantScheme:
    """Make ``scheme`` available as ``load_model(quantization=scheme.name)``."""
    return SCHEMES.register(scheme.name, scheme, replace=replace)


def register_kind(kind: QuantizedKind) -> QuantizedKind:
    _KINDS.append(kind)
    return kind


def available_quantizations() -> list[str]:
    """Every registered scheme name (installed or not), sorted."""
    return sorted(SCHEMES)


def check_quantization(value: object) -> str | None:
    """``value`` if it names a registered scheme (``None`` stays ``None``); otherwise one clear error."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in SCHEMES:
        raise ValueError(
            f"quantization={value!r} is not a known quantization; use one of {available_quantizations()} "
            "or None (a float base)"
        )
    return value


def get_scheme(name: str) -> QuantScheme:
    """The scheme ``name``; an error naming the missing package when it is not installed."""
    scheme = SCHEMES[check_quantization(name)]
    if not scheme.is_available():
        raise ImportError(
            f"quantization={name!r} needs the {scheme.package} package: pip install 'molex-lora[quant]' "
            f"(or pip install {scheme.package})"
        )
    return scheme


def quantized_kind(module: nn.Module) -> QuantizedKind | None:
    """The registered quantized kind of ``module``, or ``None`` for a float layer."""
    for kind in _KINDS:
        if kind.matches(module):
            return kind
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantized_kind(module) is not None


def prepare_for_training(model: nn.Module) -> int:
    """Make every quantized linear of ``model`` pass gradients to its input (its kind's ``prepare``); returns
    how many layers it prepared."""
    count = 0
    for module in model.modules():
        kind = quantized_kind(module)
        if kind is not None and kind.prepare is not None:
            kind.prepare(module)
            count += 1
    return count


def needs_dense_backward(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized linear whose matmul has no backward for its input."""
    kind = quantized_kind(module)
    return kind is not None and kind.dense_backward(module)


def package_available(package: str) -> bool:
    """Whether ``package`` is installed (found without importing it)."""
    return importlib.util.find_spec(package) is not None


def class_names(module: nn.Module) -> set[str]:
    """``module.class`` of every class in ``type(module).__mro__`` (subclasses of a library's layers match too)."""
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(module).__mro__}


def float_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """``{name: layer}`` of the plain ``nn.Linear`` layers a scheme quantizes: every one except the output
    head (``get_output_embeddings()``), which is often tied to the input embeddings and stays float."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head and not is_quantized(module)
    }


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
