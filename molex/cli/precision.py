"""``trainer.precision=auto``: bf16 autocast only where the hardware computes bfloat16 natively.

On a CPU without bfloat16 units (AVX2 only, no AVX512-BF16 or AMX) autocast to bf16 emulates every
matmul and a training step of SmolLM2-135M becomes over ten times slower than in float32; with those
units (or on a GPU that supports bf16) it is faster than float32. ``auto`` picks per machine, and an
explicit value (``32-true``, ``bf16-mixed``, ...) is always used as given.
"""

from __future__ import annotations

import torch

__all__ = ["AUTO", "cpu_has_native_bf16", "resolve_precision"]

AUTO = "auto"


def cpu_has_native_bf16() -> bool:
    """True if this CPU has bfloat16 matmul units (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str | int | None, accelerator: str | None) -> str | int | None:
    """``precision`` unless it is ``"auto"``: then ``"bf16-mixed"`` on hardware with native bf16
    (a CUDA device that supports it, or a CPU with AVX512-BF16/AMX), else ``"32-true"``."""
    if precision != AUTO:
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available())
    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported() if on_gpu else cpu_has_native_bf16()
    return "bf16-mixed" if native else "32-true"
