"""``trainer.precision=auto`` picks bf16 autocast only where the hardware has bfloat16 units."""

from __future__ import annotations

import pytest
import torch

from molex.cli import precision as precision_mod
from molex.cli.precision import resolve_precision


@pytest.mark.parametrize("explicit", ["32-true", "bf16-mixed", "16-mixed", 32, None])
def test_an_explicit_precision_is_used_as_given(explicit):
    assert resolve_precision(explicit, "cpu") == explicit


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_cpu_follows_the_cpu_s_bf16_units(monkeypatch, native, expected):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == expected


def test_auto_on_a_gpu_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", "gpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("auto", "auto") == "bf16-mixed"


def test_the_cpu_probe_answers_a_bool():
    assert isinstance(precision_mod.cpu_has_native_bf16(), bool)
