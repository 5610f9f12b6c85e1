"""MTL-LoRA (``mtl`` router): shared A, per-task ``Lambda_t`` and ``softmax(w_t / tau)`` over the B's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import molex
from molex.layer.context import RoutingContext
from molex.layer.experts import LoRAExperts
from molex.layer.linear import MoLELinear
from molex.routers import build_router
from tests.helpers.models import tiny_llama

NUM_TASKS, NUM_EXPERTS, RANK, D_IN, D_OUT = 4, 3, 2, 6, 5


def mtl_layer(temperature: float = 0.7) -> MoLELinear:
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).double()
    pool = LoRAExperts(
        in_features=D_IN, out_features=D_OUT, num_experts=NUM_EXPERTS, rank=RANK, scaling=1.5, share_A=True
    ).double()
    router = build_router(
        "mtl", in_features=D_IN, num_experts=NUM_EXPERTS, num_tasks=NUM_TASKS, temperature=temperature
    ).double()
    layer = MoLELinear(base, experts=pool, router=router, kernel_backend="dense")
    with torch.no_grad():
        pool.lora_B.normal_()
        router.task_transform.normal_()
        router.task_logits.normal_()
    return layer


def run(layer: MoLELinear, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    batch, seq = x.shape[:2]
    layer.context = RoutingContext(batch_size=batch, seq_len=seq)
    layer.context.inputs = {"task_ids": tasks}
    return layer(x)


def test_output_equals_the_formula_in_float64():
    layer = mtl_layer()
    x = torch.randn(3, 4, D_IN, dtype=torch.float64)
    tasks = torch.tensor([2, 0, 2])
    out = run(layer, x, tasks)
    A = layer.experts.lora_A[0]  # [r, in]
    B = layer.experts.lora_B  # [E, r, out]
    lam, w = layer.router.task_transform, layer.router.task_logits
    expected = layer.base_layer(x).clone()
    for b, t in enumerate(tasks.tolist()):
        pi = torch.softmax(w[t] / 0.7, dim=-1)
        low = (x[b] @ A.t()) @ lam[t].t()  # Lambda_t A x, [S, r]
        expected[b] += 1.5 * sum(pi[i] * (low @ B[i]) for i in range(NUM_EXPERTS))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_gradients_reach_only_the_tasks_in_the_batch():
    layer = mtl_layer()
    run(layer, torch.randn(2, 3, D_IN, dtype=torch.float64), torch.tensor([0, 2])).pow(2).sum().backward()
    lam, w = layer.router.task_transform.grad, layer.router.task_logits.grad
    for task in (0, 2):
        assert lam[task].abs().sum() > 0 and w[task].abs().sum() > 0
    for task in (1, 3):
        assert lam[task].abs().sum() == 0 and w[task].abs().sum() == 0


def test_transforms_start_as_identity_and_mixing_even():
    router = build_router("mtl", in_features=D_IN, num_experts=NUM_EXPERTS, num_tasks=NUM_TASKS)
    pool = LoRAExperts(
        in_features=D_IN, out_features=D_OUT, num_experts=NUM_EXPERTS, rank=RANK, scaling=1.0, share_A=True
    )
    MoLELinear(nn.Linear(D_IN, D_OUT), experts=pool, router=router)
    assert torch.equal(router.task_transform, torch.eye(RANK).expand(NUM_TASKS, -1, -1))
    torch.testing.assert_close(router.mixing(), torch.full((NUM_TASKS, NUM_EXPERTS), 1 / NUM_EXPERTS))


def test_bad_task_ids_and_pools_fail_clearly():
    layer = mtl_layer()
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 4\).*raise num_tasks to at least 6"):
        run(layer, torch.randn(1, 2, D_IN, dtype=torch.float64), torch.tensor([5]))
    layer.context = RoutingContext(batch_size=1, seq_len=2)
    with pytest.raises(ValueError, match="needs `task_ids`"):
        layer(torch.randn(1, 2, D_IN, dtype=torch.float64))
    plain = LoRAExperts(in_features=D_IN, out_features=D_OUT, num_experts=NUM_EXPERTS, rank=RANK, scaling=1.0)
    router = build_router("mtl", in_features=D_IN, num_experts=NUM_EXPERTS)
    with pytest.raises(ValueError, match="share_A=True"):
        MoLELinear(nn.Linear(D_IN, D_OUT), experts=plain, router=router)


def test_inject_builds_shared_pools_and_generates_with_task_ids(tmp_path):
    model = tiny_llama(num_layers=2)
    molex.inject(
        model,
        molex.MoLEConfig(
            target_modules=["q_proj", "v_proj"], num_experts=3, router="mtl", router_options={"num_tasks": 2}
        ),
    )
    layers = molex.mole_layers(model)
    assert all(layer.experts.lora_A.shape[0] == 1 for layer in layers.values())
    ids = torch.randint(1, 128, (2, 5))
    model.train()
    out = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 1]))
    out.loss.backward()
    router = next(iter(layers.values())).router
    assert router.task_logits.grad is not None and router.task_transform.grad is not None
    model.eval()
    generated = molex.generate(model, input_ids=ids, task_ids=torch.tensor([1, 0]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 8)
    with torch.no_grad():  # trained-looking weights, so the round trip is not trivially the base model
        for layer in layers.values():
            layer.experts.lora_B.normal_(std=0.1)
            layer.router.task_transform.normal_()
            layer.router.task_logits.normal_()
    molex.save_adapter(model, tmp_path)
    loaded = molex.load_adapter(tiny_llama(num_layers=2), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, task_ids=torch.tensor([1, 1])).logits,
            model(input_ids=ids, task_ids=torch.tensor([1, 1])).logits,
        )
