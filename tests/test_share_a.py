"""Shared-A expert pools (HydraLoRA / MTL-LoRA shape): one A per layer, E B's, one r-wide shrink."""

from __future__ import annotations

import pytest
import torch

import molex
from molex.core.decision import RoutingDecision
from molex.kernels import available_backends, estimate_cost, mole_delta
from molex.layer.experts import LoRAExperts
from tests.helpers.models import assert_close, tiny_llama

CPU_BACKENDS = [b for b in available_backends() if b not in ("megablocks",)]


def _decision(tokens: int, num_experts: int, top_k: int, seed: int = 0) -> RoutingDecision:
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64)
    return RoutingDecision(indices, weights)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_takes_a_shared_a(backend):
    torch.manual_seed(0)
    tokens, num_experts, rank, d_in, d_out = 12, 4, 3, 16, 8
    x = torch.randn(tokens, d_in, dtype=torch.float64)
    shared = torch.randn(1, rank, d_in, dtype=torch.float64)
    B = torch.randn(num_experts, rank, d_out, dtype=torch.float64)
    scaling = torch.tensor([0.5, 1.0, 2.0, 1.5])
    decision = _decision(tokens, num_experts, 2)
    expected = mole_delta(x, shared.expand(num_experts, -1, -1).clone(), B, decision, scaling.double(), "reference")
    decision32 = RoutingDecision(decision.indices, decision.weights.float())
    actual = mole_delta(x.float(), shared.float(), B.float(), decision32, scaling, backend)  # triton runs in fp32
    assert_close(actual, expected, torch.float32)


def test_shared_a_gradients_sum_over_the_experts():
    torch.manual_seed(0)
    x = torch.randn(10, 16, dtype=torch.float64)
    shared = torch.randn(1, 4, 16, dtype=torch.float64, requires_grad=True)
    copies = shared.detach().expand(3, -1, -1).clone().requires_grad_(True)
    B = torch.randn(3, 4, 8, dtype=torch.float64)
    decision = _decision(10, 3, 2)
    mole_delta(x, shared, B, decision, 1.0, "dense").pow(2).sum().backward()
    mole_delta(x, copies, B, decision, 1.0, "reference").pow(2).sum().backward()
    assert_close(shared.grad[0], copies.grad.sum(0))


def test_mole_delta_rejects_a_with_another_expert_count():
    x, A, B = torch.randn(4, 8), torch.randn(2, 2, 8), torch.randn(3, 2, 5)
    with pytest.raises(ValueError, match="one shared by all"):
        mole_delta(x, A, B, _decision(4, 3, 1), 1.0, "dense")


def test_the_cost_model_sees_the_narrower_shrink():
    dims = dict(tokens=4096, in_features=2048, out_features=2048, num_experts=8, rank=16, top_k=2, device_type="cpu")
    assert estimate_cost("dense", **dims, shared_a=True) < estimate_cost("dense", **dims)


def test_pool_shapes_and_repr():
    pool = LoRAExperts(in_features=16, out_features=8, num_experts=4, rank=2, scaling=1.0, share_A=True)
    assert pool.lora_A.shape == (1, 2, 16) and pool.lora_B.shape == (4, 2, 8)
    assert pool.num_experts == 4 and pool.shares_a and "share_A=True" in repr(pool)


def _inject(share: bool):
    model = tiny_llama(num_layers=2)
    config = molex.MoLEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, share_A=share)
    return molex.inject(model, config)


def test_shared_pool_equals_an_unshared_pool_with_equal_as():
    shared, plain = _inject(True), _inject(False)
    torch.manual_seed(1)
    for (name, a), b in zip(molex.mole_layers(shared).items(), molex.mole_layers(plain).values(), strict=True):
        assert a.experts.lora_A.shape[0] == 1 and b.experts.lora_A.shape[0] == 4, name
        with torch.no_grad():
            a.experts.lora_B.normal_(std=0.1)
            b.experts.lora_B.copy_(a.experts.lora_B)
            b.experts.lora_A.copy_(a.experts.lora_A.expand_as(b.experts.lora_A))
            b.router.gate.weight.copy_(a.router.gate.weight)
    ids = torch.randint(1, 128, (2, 7))
    with torch.no_grad():
        assert_close(shared(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_shared_pool_saves_and_loads(tmp_path):
    model = _inject(True)
    with torch.no_grad():
        for layer in molex.mole_layers(model).values():
            layer.experts.lora_B.normal_(std=0.1)
    molex.save_adapter(model, tmp_path)
    loaded = molex.load_adapter(tiny_llama(num_layers=2), tmp_path)
    ids = torch.randint(1, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert molex.get_config(loaded).share_A


def test_benchmark_reports_both_ratios(tmp_path):
    from benchmarks.bench_share_a import main

    out = tmp_path / "share_a.json"
    result = main(["--tokens", "32", "--dim", "64", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert set(result["ratios"]) == {"layer: unshared / shared", "experts: unshared / shared"}
    assert all(value > 0 for value in result["ratios"].values()) and out.exists()
