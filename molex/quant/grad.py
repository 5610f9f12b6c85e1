"""Linear layers whose quantized matmul has no backward: run them as they are, differentiate them densely.

torchao's int4 kernels (``_weight_int4pack_mm_for_cpu`` and the CUDA tinygemm one) define no derivative,
so no gradient could pass through such a layer back to the experts below it, wrapped or not.
:class:`DenseBackwardLinear` is an ``nn.Linear`` holding the same quantized weight whose forward calls
the quantized kernel unchanged and whose backward computes ``grad_x = grad_y @ W`` with ``W`` the dense
weight the kernel uses (``weight.dequantize()``, or, for a layout without one, the layer applied to the
identity). The weight gets no gradient (it is frozen) and nothing is cached: memory stays that of the
quantized layer, plus one dense weight during each layer's backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenseBackwardLinear", "dense_weight"]


@torch.no_grad()
def dense_weight(layer: nn.Linear, dtype: torch.dtype) -> Tensor:
    """The layer's weight as a dense ``[out, in]`` tensor of ``dtype``."""
    weight = layer.weight
    try:
        return weight.dequantize().to(dtype)
    except NotImplementedError:
        eye = torch.eye(layer.in_features, dtype=weight.dtype, device=weight.device)
        return F.linear(eye, weight).t().to(dtype)  # row i of the identity picks the weight's column i


class _DenseBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: nn.Linear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        return grad @ dense_weight(ctx.layer, grad.dtype), None, None, None


class DenseBackwardLinear(nn.Linear):
    """``nn.Linear`` over a quantized weight whose matmul lacks a backward; ``x [..., in]`` -> ``[..., out]``.

    Build it with :meth:`from_linear`, which keeps the layer's weight and bias tensors (nothing is copied).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DenseBackwardLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad:  # inference, or the first layers (no trainable input yet): the kernel alone
            return F.linear(x, self.weight, self.bias)
        return _DenseBackward.apply(x, self.weight, self.bias, self)


def add_dense_backward(model: nn.Module) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` whose quantized weight lacks a backward (torchao int4) for a
    :class:`DenseBackwardLinear` over the same tensors, in place, so gradients reach the layers below it.
    Returns the names swapped. ``load_model(..., quantization="torchao-int4")`` does this itself."""
    from molex.quant.base import needs_dense_backward, replace_module

    names = [name for name, module in model.named_modules() if name and needs_dense_backward(module)]
    for name in names:
        replace_module(model, name, DenseBackwardLinear.from_linear(model.get_submodule(name)))
    return names
