"""A 4-bit bitsandbytes base keeps passing gradients after an eval pass (validation, ``generate``).

On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight for its inference kernel the first
time the layer runs in eval mode without gradients, and the repacked layer gives its input no gradient
afterwards: the default run's sanity validation did that, and every adapter below a quantized
``o_proj`` stopped learning. molex turns the repacking off for the layers it builds and for any it injects
into, and undoes a repacking that already happened.
"""

from __future__ import annotations

import pytest
import torch

import molex
from molex.models import load_model

bnb = pytest.importorskip("bitsandbytes")

needs_avx512bf16 = pytest.mark.skipif(
    not getattr(bnb.functional, "has_avx512bf16", lambda: False)(),
    reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16",
)


def _linear4bit(d: int = 576) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = torch.nn.Linear(d, d, bias=False)
    layer = bnb.nn.Linear4bit(d, d, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def _input_gets_gradient(layer: torch.nn.Module) -> bool:
    layer.train()
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    return x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_load_model_and_inject_turn_the_cpu_repacking_off():
    model, _ = load_model("tiny-llama", quantization="nf4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    for m in layers:
        m.support_avx512bf16_for_cpu = True  # as bitsandbytes builds a layer itself
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], num_experts=2))
    assert not any(m.support_avx512bf16_for_cpu for m in layers)


@needs_avx512bf16
def test_a_repacked_layer_loses_its_input_gradient_and_prepare_restores_it():
    from molex.quant import prepare_for_training

    layer = _linear4bit()
    x = torch.randn(3, layer.in_features)
    expected = layer(x)
    layer.eval()
    with torch.no_grad():
        layer(x)  # bitsandbytes repacks here
    assert layer.weight.quant_state.packing_format_for_cpu
    assert not _input_gets_gradient(layer)  # the failure molex guards against
    assert prepare_for_training(torch.nn.Sequential(layer)) == 1
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    # bitsandbytes' own inverse of the repacking rounds the block scales: the layer stays within 1%
    assert ((layer(x) - expected).norm() / expected.norm()).item() < 1e-2
    assert _input_gets_gradient(layer)


@needs_avx512bf16
def test_adapters_under_a_quantized_layer_learn_after_an_eval_pass():
    model, _ = load_model("tiny-llama", quantization="nf4")
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], num_experts=2, router="topk"))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # a validation pass: o_proj, not a target, stays quantized
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "q_proj.experts.lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
