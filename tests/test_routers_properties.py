"""Properties every router must keep, whatever the logits: valid distinct indices, weights >= 0,
finite values (logits up to +-1e4, bfloat16 inputs); gradients reach the gates."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import molex
from molex.layer.context import RoutingContext
from molex.routers import available_routers, build_router, get_router_class

TOKEN_ROUTERS = ("topk", "soft", "dynmole", "gate", "switch")
ALL_ROUTERS = (*TOKEN_ROUTERS, "milora", "dlp", "mtl")
#: routers without trainable scoring (constant, random or feature-given mixing)
PARAMETER_FREE = ("fixed", "stochastic", "features")
#: routers that decide from their pool's factors, so they route only inside a layer (tests/test_router_arrow.py)
POOL_BOUND = ("arrow",)

# options that make every loss of a router active, so the properties cover them too
LOSS_OPTIONS = {
    "topk": {"z_loss_coef": 0.1},
    "soft": {"load_balance_coef": 0.1},
    "dynmole": {},
    "gate": {"task_loss_coef": 1.0},
    "switch": {"capacity_factor": 1.0, "z_loss_coef": 0.1},
    "milora": {"load_balance_coef": 0.1},
    "dlp": {"dropout": 0.0},
    "fixed": {},
    "stochastic": {},
    "features": {},
    "mtl": {},
}


def make_router(name: str, num_experts: int, in_features: int):
    options = dict(LOSS_OPTIONS[name])
    if name in ("topk", "gate", "milora"):
        options["top_k"] = min(2, num_experts)
    if name == "dynmole":
        options["keep_top_k"] = min(2, num_experts)
    if name == "features":  # one feature, "task", read from task_ids
        options["features"] = {"task": num_experts}
    if name == "mtl":
        options["num_tasks"] = num_experts
    router = build_router(name, in_features=in_features, num_experts=num_experts, **options)
    if name == "mtl":  # its task transforms are sized by the pool's rank
        router.bind_pool(
            molex.layer.experts.LoRAExperts(
                in_features=in_features, out_features=3, num_experts=num_experts, rank=2, scaling=1.0, share_A=True
            )
        )
    if hasattr(router, "gate") and in_features == num_experts:
        with torch.no_grad():
            router.gate.weight.copy_(torch.eye(num_experts))  # x are the logits
    return router


def check_decision(decision, num_experts: int, rows: int) -> None:
    indices, weights = decision.indices, decision.weights
    assert indices.shape[0] == rows and weights.shape == indices.shape
    assert ((indices >= 0) & (indices < num_experts)).all()
    assert all(len(set(row)) == len(row) for row in indices.tolist()), "expert ids repeat within a row"
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    if decision.probs is not None:
        assert torch.isfinite(decision.probs).all()
    for key, loss in decision.aux_losses.items():
        assert torch.isfinite(loss).all(), key


@st.composite
def routing_inputs(draw):
    num_experts = draw(st.integers(1, 6))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    values = draw(
        st.lists(
            st.floats(-1e4, 1e4, allow_nan=False, width=32),
            min_size=batch * seq * num_experts,
            max_size=batch * seq * num_experts,
        )
    )
    mask = draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    x = torch.tensor(values).view(batch * seq, num_experts).to(dtype)
    attention = torch.tensor(mask).view(batch, seq).long()
    context = RoutingContext(attention_mask=attention, batch_size=batch, seq_len=seq)
    context.inputs = {"task_ids": torch.randint(0, num_experts, (batch,))}
    return num_experts, x, context


@pytest.mark.parametrize("name", ALL_ROUTERS + PARAMETER_FREE)
@settings(max_examples=25, deadline=None)
@given(data=routing_inputs())
def test_router_properties(name, data):
    num_experts, x, context = data
    if name == "milora" and num_experts < 2:
        num_experts = 1
    router = make_router(name, num_experts, x.shape[-1]).train()
    decision = router(x, context)
    rows = context.batch_size if decision.is_per_sequence else x.shape[0]
    check_decision(decision, num_experts, rows)
    assert decision.num_tokens == x.shape[0]
    assert set(decision.aux_losses) <= set(router.emits), f"{name} emits undeclared losses"


def test_every_registered_router_is_covered():
    assert set(available_routers()) == set(ALL_ROUTERS + PARAMETER_FREE + POOL_BOUND)
    for name in ALL_ROUTERS + PARAMETER_FREE + POOL_BOUND:
        assert isinstance(get_router_class(name).emits, tuple)


@pytest.mark.parametrize("name", ALL_ROUTERS)
def test_gradients_reach_the_gate(name):
    torch.manual_seed(0)
    router = make_router(name, 4, 8).train()
    context = RoutingContext(attention_mask=torch.ones(2, 3, dtype=torch.long), batch_size=2, seq_len=3)
    context.inputs = {"task_ids": torch.tensor([1, 3])}
    decision = router(torch.randn(6, 8), context)
    objective = (decision.weights * torch.randn_like(decision.weights)).sum()
    objective = objective + sum(decision.aux_losses.values(), torch.zeros(()))
    objective.backward()
    if name == "mtl":  # its scoring is the per-task mixing logits (the transforms act in the kernel)
        scoring = [router.task_logits]
    else:
        scoring = list((router.gate if hasattr(router, "gate") else router.classifier).parameters())
    grads = [p.grad for p in scoring]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["topk", "dynmole", "gate", "switch"])
def test_contrastive_loss_in_the_layer_path(name):
    from tests.helpers.models import tiny_llama

    model = tiny_llama(num_layers=1)
    options = {"contrastive_coef": 0.5}
    molex.inject(model, molex.MoLEConfig(target_modules=["q_proj"], num_experts=3, router=name, router_options=options))
    for layer in molex.mole_layers(model).values():
        torch.nn.init.normal_(layer.experts.lora_B, std=0.1)
    ids = torch.randint(1, 128, (2, 5))
    model.train()
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    losses = molex.aux_losses(model)
    key = "model.layers.0.self_attn.q_proj/contrastive"
    assert key in losses and torch.isfinite(losses[key])
    losses[key].backward()
    experts = molex.mole_layers(model)["model.layers.0.self_attn.q_proj"].experts
    assert experts.lora_A.grad.abs().sum() > 0
    model.eval()
    model(input_ids=ids)
    assert key not in molex.aux_losses(model)  # opt-in and training only
