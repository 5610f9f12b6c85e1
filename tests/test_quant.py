"""Quantized frozen bases: inject wraps them, gradients reach only experts and routers, adapters round-trip,
unload gives the quantized layers back untouched, merging into them is refused, bad names fail clearly."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import molex
from molex.models import load_model
from molex.quant import DenseBackwardLinear, add_dense_backward, is_quantized
from molex.quant.grad import dense_weight

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEMES = ["nf4", "int8", "torchao-int8", "torchao-int4"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
# in_features 64 and 128: every scheme quantizes every linear (torchao int4 groups need 32 | in_features)
SIZES = {"hidden_size": 64, "intermediate_size": 128}


def quantized_llama(quantization: str | None):
    model, _ = load_model("tiny-llama", quantization=quantization, config_overrides=SIZES)
    return model


def mole_config(**kwargs) -> molex.MoLEConfig:
    options = {"rank": 4, "num_experts": 3, "router": "topk", "top_k": 2, **kwargs}
    return molex.MoLEConfig(target_modules=TARGETS, **options)


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (batch, length), generator=generator)


def raw_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` with tensor subclasses (torchao weights) flattened into their plain inner tensors."""
    out = {}
    for key, value in module.state_dict().items():
        if hasattr(value, "__tensor_flatten__"):
            names, _ = value.__tensor_flatten__()
            out.update({f"{key}.{name}": getattr(value, name).detach().clone() for name in names})
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().clone()
    return out


def randomise_experts(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            B = layer.experts.lora_B
            B.copy_(0.1 * torch.randn(B.shape, generator=generator))


@pytest.mark.parametrize("quantization", SCHEMES)
def test_load_model_quantizes_every_linear_but_the_head(quantization):
    model = quantized_llama(quantization)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert not is_quantized(linears.pop("lm_head"))
    assert linears and all(is_quantized(m) for m in linears.values())
    # the quantized model stays close to the float one (a garbage quantization would not)
    x = ids()
    with torch.no_grad():
        reference = quantized_llama(None)(input_ids=x).logits
        logits = model(input_ids=x).logits
    error = (logits - reference).abs().max() / reference.abs().max()
    assert error < {"nf4": 0.3, "int8": 0.05, "torchao-int8": 0.05, "torchao-int4": 0.3}[quantization]


@pytest.mark.parametrize("quantization", SCHEMES)
def test_experts_are_float32_with_layer_dims_and_only_they_get_gradients(quantization):
    model = molex.inject(quantized_llama(quantization), mole_config())
    for layer in molex.mole_layers(model).values():
        base = layer.base_layer
        assert is_quantized(base)
        assert layer.experts.lora_A.dtype == torch.float32
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)
    randomise_experts(model)
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".experts." in n or ".router." in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_" in n)
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []


@pytest.mark.parametrize("quantization", SCHEMES)
def test_unload_returns_the_untouched_quantized_layers(quantization):
    model = quantized_llama(quantization)
    originals = {n: model.get_submodule(n) for n, m in model.named_modules() if n.endswith(tuple(TARGETS))}
    before = raw_state(model)
    molex.inject(model, mole_config())
    randomise_experts(model)
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    torch.optim.SGD(molex.trainable_parameters(model), lr=0.1).step()
    molex.unload(model)
    assert all(model.get_submodule(name) is layer for name, layer in originals.items())
    after = raw_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("quantization", SCHEMES)
def test_adapter_round_trips_on_a_quantized_base(tmp_path, quantization):
    model = molex.inject(quantized_llama(quantization), mole_config())
    randomise_experts(model)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    molex.save_adapter(model, tmp_path / "adapter")
    loaded = molex.load_adapter(quantized_llama(quantization), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantization", SCHEMES)
def test_a_few_training_steps_lower_the_loss(quantization):
    from molex.training import OptimSettings, train_steps

    model = molex.inject(quantized_llama(quantization), mole_config())
    batch = ids(batch=4, length=16)
    before = raw_state(model)
    losses = train_steps(
        model, [batch], lambda b: model(input_ids=b, labels=b).loss, steps=6, settings=OptimSettings(lr=1e-2)
    )
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    base_keys = [k for k in before if "lora_" not in k and ".router." not in k]
    after = raw_state(model)
    assert all(torch.equal(before[k], after[k]) for k in base_keys)


@pytest.mark.parametrize("quantization", ["nf4", "torchao-int8"])
def test_merging_into_a_quantized_base_is_refused(quantization):
    model = molex.inject(quantized_llama(quantization), mole_config(router="fixed", top_k=None))
    with pytest.raises(ValueError, match=r"quantized base .*quantization=None"):
        molex.merge_route(model)


def test_bad_quantization_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"quantization='nf5'.*'int8'.*'nf4'.*'torchao-int4'.*'torchao-int8'"):
        load_model("tiny-llama", quantization="nf5")


def test_dense_backward_gives_the_gradient_of_the_dense_weight():
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    plain = nn.Linear(64, 16)
    quantize_(plain, PrototypeInt4WeightOnlyConfig(group_size=32, set_inductor_config=False))
    layer = DenseBackwardLinear.from_linear(plain)
    assert layer.weight is plain.weight
    x = torch.randn(5, 64, requires_grad=True)
    grad_out = torch.randn(5, 16)
    layer(x).backward(grad_out)
    weight = dense_weight(layer, torch.float32)  # no dequantize on this layout: the identity probe
    x_ref = x.detach().requires_grad_(True)
    out_ref = F.linear(x_ref, weight, layer.bias)
    torch.testing.assert_close(layer(x.detach()), out_ref, atol=1e-4, rtol=1e-4)
    out_ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


def test_loading_an_int4_base_says_it_saves_memory_not_time(caplog):
    with caplog.at_level(logging.WARNING, logger="molex.quant.ao"):
        quantized_llama("torchao-int4")
    assert "saves memory, not time" in caplog.text


def test_inject_warns_about_int4_layers_without_backward_and_the_fix_trains(caplog):
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    model = quantized_llama(None)
    head = model.lm_head
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=32, set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and m is not head)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="molex.inject"):
        molex.inject(model, mole_config())
    assert "add_dense_backward" in caplog.text
    x = ids()
    with pytest.raises(RuntimeError, match="derivative"):
        model(input_ids=x, labels=x).loss.backward()
    molex.unload(model)
    swapped = add_dense_backward(model)
    assert len(swapped) == 2 * 7  # every quantized linear of both layers
    molex.inject(model, mole_config())
    randomise_experts(model)
    model(input_ids=x, labels=x).loss.backward()
    first = molex.mole_layers(model)["model.layers.0.self_attn.q_proj"]
    assert first.experts.lora_A.grad.abs().sum() > 0  # reached through the int4 layers above it
