"""Automatic layer-wise allocation: the exact split, the config checks, the warm-start, save/load, both training paths."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import molex
from molex.allocation.auto import decide_allocation, reallocate, snapshot_experts
from molex.allocation.budget import apportion
from molex.allocation.plan import AllocationConfig, plan_allocation
from molex.layer.health import has_routing_reads
from molex.training import OptimSettings
from tests.helpers.cli import compose_train
from tests.helpers.models import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def auto_config(total: int = 14, **alloc) -> molex.MoLEConfig:
    return molex.MoLEConfig(
        target_modules=TARGETS, allocation=AllocationConfig(schedule="auto", total_experts=total, **alloc)
    )


def batches(seed: int = 0, count: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, 128, (4, 12), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def counts(model) -> dict[str, int]:
    return {name: layer.experts.num_experts for name, layer in molex.mole_layers(model).items()}


# -- the split --------------------------------------------------------------------------------------------------


@st.composite
def split_cases(draw):
    n = draw(st.integers(1, 24))
    signals = draw(st.lists(st.floats(0, 1e6, allow_nan=False) | st.just(0.0), min_size=n, max_size=n))
    low = draw(st.integers(0, 4))
    high = draw(st.integers(max(low, 1), 12))
    total = draw(st.integers(low * n, high * n))
    return signals, total, low, high


@settings(max_examples=300, deadline=None)
@given(split_cases())
def test_split_holds_the_budget_and_bounds_exactly(case):
    signals, total, low, high = case
    n = apportion(signals, total, low=low, high=high)
    assert sum(n) == total and all(low <= c <= high for c in n)
    for i, si in enumerate(signals):  # more signal never means fewer experts
        for j, sj in enumerate(signals):
            if si > sj:
                assert n[i] >= n[j], (signals, n)
    if not any(signals):  # no signal: the even split
        assert max(n) - min(n) <= 1
    assert apportion(signals, total, low=low, high=high) == n  # deterministic


def test_split_is_proportional_and_uses_largest_remainder():
    assert apportion([1, 2, 3, 4], 20, low=1, high=8) == [2, 4, 6, 8]
    # quotas 10/3 each: one leftover unit goes to the first (ties to the lower index)
    assert apportion([1, 1, 1], 10, low=1) == [4, 3, 3]
    # quotas 1.5, 3.5, 5.0 -> floors 1, 3, 5 plus one unit: the larger remainder ties, the lower index wins
    assert apportion([3, 7, 10], 10, low=1) == [2, 3, 5]
    # the cap passes the excess on in proportion; a zero signal gets the floor
    assert apportion([0, 1, 100], 12, low=1, high=8) == [1, 3, 8]
    with pytest.raises(ValueError, match="between 4 and 32"):
        apportion([1, 1, 1, 1], 3, low=1, high=8)
    with pytest.raises(ValueError, match="finite"):
        apportion([1.0, float("nan")], 4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.data())
def test_the_warmup_split_of_a_config_holds_its_budget(layers, data):
    total = data.draw(st.integers(layers, 6 * layers))
    config = molex.MoLEConfig(
        target_modules=["q"],
        router="soft",
        allocation=AllocationConfig(schedule="auto", total_experts=total, max_experts=6),
    )
    plans = plan_allocation([f"layers.{i}.q" for i in range(layers)], config, num_layers=layers)
    assert sum(p.num_experts for p in plans) == total and max(p.num_experts for p in plans) <= 6


def test_budget_schedule_gives_the_total_of_that_schedule():
    config = molex.MoLEConfig(
        target_modules=["q"], allocation=AllocationConfig(schedule="auto", budget_schedule="mola-increasing")
    )
    plans = plan_allocation([f"layers.{i}.q" for i in range(8)], config, num_layers=8)
    assert sum(p.num_experts for p in plans) == 2 * (2 + 4 + 6 + 8)


# -- clear errors where the values enter ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "auto"}, "needs total_experts=N"),
        ({"schedule": "auto", "total_experts": 8, "warmup_steps": 0}, "warmup_steps must be an integer >= 1"),
        ({"schedule": "auto", "total_experts": 0}, "total_experts must be an integer >= 1"),
        ({"schedule": "auto", "total_experts": 8, "min_experts": 3, "max_experts": 2}, "max_experts=2 is below"),
        ({"schedule": "auto", "total_experts": 8, "num_experts": 4}, "drop \\['num_experts'\\]"),
        ({"schedule": "auto", "total_experts": 8, "per_layer": [4, 3]}, "holds 7 experts but total_experts=8"),
        ({"schedule": "auto", "budget_schedule": "nope"}, "unknown allocation schedule 'nope'"),
        ({"schedule": "mola-increasing", "total_experts": 8}, "apply to schedule='auto' only"),
    ],
)
def test_bad_auto_configs_fail_at_config_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AllocationConfig(**kwargs)


def test_bounds_the_router_or_the_layers_cannot_meet_fail_before_training(llama):
    with pytest.raises(ValueError, match="min_experts=1 is below the 2 experts router 'topk' needs"):
        auto_config(min_experts=1)
    assert auto_config().allocation.min_experts == 2  # the default follows the router's top-k
    with pytest.raises(ValueError, match="does not take per-layer expert counts"):
        molex.MoLEConfig(
            target_modules=TARGETS, router="features", router_options={"features": {"task": 2}},
            allocation=AllocationConfig(schedule="auto", total_experts=8),
        )  # fmt: skip
    with pytest.raises(ValueError, match="between 8 and 24"):  # 4 layers x [2, 6]
        molex.inject(llama, auto_config(total=7, max_experts=6))
    with pytest.raises(ValueError, match="between 8 and 24"):
        molex.inject(llama, auto_config(total=25, max_experts=6))


# -- the decision, the re-build and its warm start --------------------------------------------------------------


def test_the_layer_whose_experts_moved_most_gets_most(llama):
    molex.inject(llama, auto_config(total=12, max_experts=6))
    snapshot = snapshot_experts(llama)
    with torch.no_grad():
        for name, layer in molex.mole_layers(llama).items():
            layer.experts.lora_B.normal_(std=1.0 if ".3." in name else 0.01)
    decision = decide_allocation(llama, snapshot)
    assert decision.warmup == [3, 3, 3, 3] and sum(decision.per_layer) == 12
    assert decision.per_layer[3] == 6 and decision.per_layer[:3] == [2, 2, 2]
    assert "total" in decision.table() and "per_layer=[2,2,2,6]" in decision.reuse_hint()


def test_reallocate_keeps_the_surviving_experts_and_router_rows(llama):
    molex.inject(llama, auto_config(total=12, max_experts=6))
    with torch.no_grad():
        for layer in molex.mole_layers(llama).values():
            layer.experts.lora_B.normal_()
    before = {k: v.clone() for k, v in molex.adapter_state_dict(llama).items()}
    old = counts(llama)
    reallocate(llama, [2, 4, 2, 4])
    new = counts(llama)
    assert molex.get_config(llama).allocation.per_layer == [2, 4, 2, 4]
    for name, layer in molex.mole_layers(llama).items():
        keep = min(old[name], new[name])
        experts = layer.experts
        torch.testing.assert_close(experts.lora_A[:keep], before[f"{name}.experts.lora_A"][:keep])
        torch.testing.assert_close(experts.lora_B[:keep], before[f"{name}.experts.lora_B"][:keep])
        torch.testing.assert_close(layer.router.gate.weight[:keep], before[f"{name}.router.gate.weight"][:keep])
        assert not experts.lora_B[keep:].any()  # new experts start as inject starts them: adding nothing
    assert sum(1 for p in molex.trainable_parameters(llama) if p.requires_grad) > 0


def test_routing_health_keeps_collecting_on_the_rebuilt_pools(llama):
    molex.inject(llama, auto_config(total=12, max_experts=6))
    molex.enable_routing_health(llama, margin_threshold=0.2)
    reallocate(llama, [2, 4, 2, 4])
    assert not has_routing_reads(llama)  # what the health monitor checks before a read
    with pytest.raises(ValueError, match="no MoLE layer has run a forward yet"):
        molex.routing_health(llama)
    llama.train()
    batch = batches(count=1)[0]
    llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert has_routing_reads(llama)
    health = molex.routing_health(llama)
    new = counts(llama)
    assert health.source == "window" and health.layers, "no window was collected"
    for layer in health.layers.values():
        assert layer.forwards == 1 and layer.tokens == batch["input_ids"].numel()  # a window, not a last-forward
        owner = next(name for name in new if layer.name.startswith(name))
        assert len(layer.load) == new[owner]


def _decide(seed: int):
    torch.manual_seed(seed)
    model = molex.inject(tiny_llama(), auto_config(total=12, max_experts=6))
    decision = molex.auto_allocate(model, batches(seed), warmup_steps=4, settings=OptimSettings(lr=5e-2))
    return model, decision


def test_auto_allocate_is_deterministic_and_the_adapter_rebuilds_its_pools(tmp_path):
    model, decision = _decide(0)
    again_model, again = _decide(0)
    assert decision == again
    for (key, value), other in zip(
        molex.adapter_state_dict(model).items(), molex.adapter_state_dict(again_model).values(), strict=True
    ):
        torch.testing.assert_close(value, other, msg=key)
    assert sum(decision.per_layer) == 12 and decision.signals[0] > 0
    assert molex.get_config(model).allocation.per_layer == decision.per_layer

    molex.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["mole_config"]["allocation"]["per_layer"] == decision.per_layer
    loaded = molex.load_adapter(tiny_llama(), tmp_path / "adapter")  # no warm-up: the stored counts
    assert counts(loaded) == counts(model)
    ids = batches(1, 1)[0]["input_ids"]
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="not decided yet"):
        molex.auto_allocate(model, batches())


# -- Lightning and molex-train ----------------------------------------------------------------------------------


def test_lightning_rebuilds_the_optimizer_and_continues_the_schedule(tmp_path):
    import lightning as L

    from molex.lightning import MoLEModule
    from molex.lightning.auto_allocation import AutoAllocation

    torch.manual_seed(0)
    module = MoLEModule(
        model=tiny_llama(),
        mole_config=auto_config(total=12, max_experts=6, warmup_steps=2),
        warmup_steps=1,
        router_lr_scale=4.0,
    )
    trainer = L.Trainer(
        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(count=4), batch_size=None))
    auto = next(c for c in trainer.callbacks if isinstance(c, AutoAllocation))  # added by the module itself
    assert auto.decision is not None and molex.get_config(module.model).allocation.per_layer == auto.decision.per_layer
    trained = {id(p) for p in molex.trainable_parameters(module.model)}
    assert {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]} == trained
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4  # the schedule went on from step 2, not from 0
    expected = molex.training.warmup_cosine(4, warmup_steps=1, total_steps=4, min_lr_ratio=0.1) * 1e-3
    experts, routers = trainer.optimizers[0].param_groups  # the rebuilt optimizer keeps the routers' own rate
    assert experts["lr"] == pytest.approx(expected) and routers["lr"] == pytest.approx(4 * expected)


def test_molex_train_allocation_auto_end_to_end(tmp_path):
    from molex.cli.common import CLIError
    from molex.cli.train import train
    from molex.lightning.auto_allocation import PLOT_NAME, TABLE_NAME
    from molex.models import load_model

    with pytest.raises(CLIError, match="allocation.warmup_steps=20 leaves no training"):
        train(compose_train(tmp_path / "bad", "allocation=auto", "trainer.max_steps=5"))
    run = tmp_path / "run"
    cfg = compose_train(
        run, "allocation=auto", "allocation.warmup_steps=2", "allocation.total_experts=7", "trainer.max_steps=4",
        "eval.before=false", "eval.after=false", "analysis.enabled=false",
        "log_routing_every_n_steps=2",  # a health read at the very step the pools are re-built
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["train"]["steps"] == 4 and sum(metrics["allocation"]["per_layer"]) == 7
    table = (run / TABLE_NAME).read_text()
    assert "warm-up" in table and "allocation.per_layer=[" in table
    assert (run / PLOT_NAME).stat().st_size > 1000
    model, _ = load_model("tiny-llama")
    loaded = molex.load_adapter(model, run / "adapter")
    per_layer = molex.get_config(loaded).allocation.per_layer
    assert per_layer == metrics["allocation"]["per_layer"]
    assert [
        layer.experts.num_experts for name, layer in molex.mole_layers(loaded).items() if "q_proj" in name
    ] == per_layer


def test_default_budget_is_the_mola_total_on_the_model(tmp_path):
    from molex.cli.common import build_mole_config

    alloc = build_mole_config(compose_train(tmp_path, "allocation=auto")).allocation
    assert alloc.schedule == "auto" and alloc.budget_schedule == "mola-increasing" and alloc.total_experts is None
    layers = 30
    total = sum(
        p.num_experts
        for p in plan_allocation(
            [f"layers.{i}.q" for i in range(layers)],
            molex.MoLEConfig(target_modules=["q"], allocation=AllocationConfig(schedule="mola-increasing")),
            num_layers=layers,
        )
    )
    assert total == sum(
        p.num_experts
        for p in plan_allocation(
            [f"layers.{i}.q" for i in range(layers)],
            molex.MoLEConfig(target_modules=["q"], allocation=alloc),
            num_layers=layers,
        )
    )
    assert total == 148  # SmolLM2-135M's 30 layers: 8, 7, 8, 7 layers of 2, 4, 6, 8 experts


def test_the_study_variant_shares_the_2468_total():
    from benchmarks.study_measure import compose_config, mole_config_of
    from benchmarks.study_variants import VARIANTS, variant_overrides

    assert VARIANTS["mola_auto"].mixture
    config = mole_config_of(compose_config(variant_overrides("mola_auto")))
    alloc = config.allocation
    assert config.router_name == "topk" and alloc.schedule == "auto" and alloc.total_experts is None
    assert alloc.budget_schedule == "mola-increasing" and alloc.min_experts == 2
