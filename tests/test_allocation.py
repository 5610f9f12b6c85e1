"""MoLA layer-wise allocation schedules."""

import pytest

from molex import AllocationConfig, MoLEConfig, plan_allocation
from molex.allocation.plan import layer_index


def names(num_layers, modules=("self_attn.q_proj", "mlp.down_proj")):
    return [f"model.layers.{i}.{m}" for i in range(num_layers) for m in modules]


def experts_per_layer(plans):
    out = {}
    for p in plans:
        out.setdefault(p.layer_index, set()).add(p.num_experts)
    assert all(len(v) == 1 for v in out.values())
    return [next(iter(out[i])) for i in sorted(out)]


@pytest.mark.parametrize(
    ("num_layers", "schedule", "expected"),
    [
        (12, "mola-increasing", [2] * 3 + [4] * 3 + [6] * 3 + [8] * 3),
        (12, "mola-decreasing", [8] * 3 + [6] * 3 + [4] * 3 + [2] * 3),
        (12, "mola-hourglass", [8] * 3 + [2] * 6 + [8] * 3),
        (32, "mola-increasing", [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8),
        (32, "mola-uniform", [5] * 32),
        # 30 layers do not split evenly: groups of 8, 7, 8, 7 (layer i -> group floor(4 i / 30))
        (30, "mola-increasing", [2] * 8 + [4] * 7 + [6] * 8 + [8] * 7),
        (30, "mola-decreasing", [8] * 8 + [6] * 7 + [4] * 8 + [2] * 7),
    ],
)
def test_schedules(num_layers, schedule, expected):
    cfg = MoLEConfig(target_modules=["q_proj"], allocation=AllocationConfig(schedule=schedule))
    assert experts_per_layer(plan_allocation(names(num_layers), cfg, num_layers=num_layers)) == expected


def test_uniform_uses_num_experts():
    cfg = MoLEConfig(target_modules=["q_proj"], num_experts=3)
    assert experts_per_layer(plan_allocation(names(12), cfg)) == [3] * 12
    cfg = MoLEConfig(target_modules=["q_proj"], allocation=AllocationConfig(num_experts=6))
    assert experts_per_layer(plan_allocation(names(12), cfg)) == [6] * 12


def test_pattern_per_layer_overrides_and_ranks():
    alloc = AllocationConfig(pattern=[1, 3], overrides={r"layers\.0\.mlp": 7}, rank_overrides={"down_proj": 2})
    cfg = MoLEConfig(target_modules=["q_proj"], rank=8, allocation=alloc)
    plans = {p.name: p for p in plan_allocation(names(4), cfg)}
    assert plans["model.layers.0.self_attn.q_proj"].num_experts == 1
    assert plans["model.layers.0.mlp.down_proj"].num_experts == 7
    assert plans["model.layers.3.self_attn.q_proj"].num_experts == 3
    assert plans["model.layers.3.self_attn.q_proj"].rank == 8
    assert plans["model.layers.3.mlp.down_proj"].rank == 2

    alloc = AllocationConfig(per_layer=[1, 2, 3, 4], rank_per_layer=[2, 2, 4, 4])
    plans = plan_allocation(names(4), MoLEConfig(target_modules=["q_proj"], allocation=alloc))
    assert experts_per_layer(plans) == [1, 2, 3, 4]
    assert [p.rank for p in plans[::2]] == [2, 2, 4, 4]


def test_layer_index_from_paths():
    assert layer_index("model.layers.17.self_attn.q_proj") == 17
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("encoder.layer.0.attention.self.query") == 0
    assert layer_index("lm_head") is None


def test_bad_allocations():
    with pytest.raises(ValueError, match="unknown allocation schedule 'mola-up'"):
        AllocationConfig(schedule="mola-up")
    with pytest.raises(ValueError, match="per_layer has 3 entries but the model has 4 layers"):
        plan_allocation(names(4), MoLEConfig(target_modules=["q"], allocation=AllocationConfig(per_layer=[1, 2, 3])))
    with pytest.raises(ValueError, match="experts >= 1"):
        AllocationConfig(pattern=[2, 0])
