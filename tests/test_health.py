"""Routing health: numbers against a hand computation, no host sync in the forward, the collapse warning,
and what ``molex-train`` writes."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import molex
from molex.layer.health import LayerHealth, RoutingHealth
from molex.lightning.health import CollapseWatch, HealthSettings
from tests.helpers.models import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")

# router probabilities of the 2 x 3 tokens; token (0, 0) is padding and would make expert 3 the busiest
PROBS = [
    [[0.01, 0.01, 0.01, 0.97], [0.5, 0.3, 0.1, 0.1], [0.4, 0.38, 0.12, 0.1]],
    [[0.1, 0.2, 0.6, 0.1], [0.35, 0.1, 0.45, 0.1], [0.3, 0.3, 0.2, 0.2]],
]
MASK = [[0, 1, 1], [1, 1, 1]]


class Toy(nn.Module):
    """One linear layer over given embeddings: the router's input is exactly ``inputs_embeds``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 2)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(inputs_embeds)


def toy_model(**options) -> nn.Module:
    """Top-2 of 4 experts with the identity as gate: logits = log(PROBS), so softmax gives PROBS back."""
    model = molex.inject(
        Toy(),
        molex.MoLEConfig(
            target_modules=["proj"],
            num_experts=4,
            router="topk",
            # the raw gate at temperature 1: the hand computation's logits are the inputs
            router_options={"top_k": 2, "input_norm": "none", "temperature": 1.0, **options},
        ),
    )
    with torch.no_grad():
        molex.mole_layers(model)["proj"].router.gate.weight.copy_(torch.eye(4))
    return model


def run_toy(model: nn.Module) -> None:
    model(inputs_embeds=torch.tensor(PROBS).log(), attention_mask=torch.tensor(MASK))


def hand_health() -> dict[str, float | list[float] | int]:
    """The expected numbers, with plain Python over the real tokens."""
    real = [p for row, mask in zip(PROBS, MASK, strict=True) for p, m in zip(row, mask, strict=True) if m]
    load = [0.0] * 4
    entropy = undecided = 0.0
    for p in real:
        first, second = sorted(range(4), key=lambda e: -p[e])[:2]
        for e in (first, second):
            load[e] += p[e] / (p[first] + p[second])
        entropy += -sum(v * math.log(v) for v in p) / math.log(4)
        undecided += math.log(p[first]) - math.log(p[second]) < 0.1
    share = [v / sum(load) for v in load]
    return {
        "load": share,
        "largest": max(share),
        "dead": sum(v < 0.1 / 4 for v in share),
        "entropy": entropy / len(real),
        "margin": undecided / len(real),
        "tokens": len(real),
    }


def check(health: LayerHealth, expected: dict, forwards: int) -> None:
    assert health.load == pytest.approx(expected["load"], abs=1e-6)
    assert health.largest_share == pytest.approx(expected["largest"], abs=1e-6)
    assert health.dead_experts == expected["dead"]
    assert health.entropy == pytest.approx(expected["entropy"], abs=1e-6)
    assert health.tiny_margin == pytest.approx(expected["margin"], abs=1e-9)
    assert (health.tokens, health.forwards) == (expected["tokens"] * forwards, forwards)


def test_health_equals_a_hand_computation_with_padding_excluded():
    expected = hand_health()
    # what the hand computation found: expert 3 is chosen by the padding token only, 2 of 5 tokens undecided
    assert expected["dead"] == 1 and expected["margin"] == pytest.approx(0.4) and expected["tokens"] == 5
    model = toy_model()
    run_toy(model)
    health = molex.routing_health(model)
    assert health.source == "last_forward" and list(health.layers) == ["proj"]
    check(health["proj"], expected, forwards=1)
    # the same definitions as MoLELinear.routing_stats (and so molex.evaluation.analysis)
    stats = molex.mole_layers(model)["proj"].routing_stats()
    assert health["proj"].load == pytest.approx((stats["load"] / stats["load"].sum()).tolist(), abs=1e-6)
    assert health["proj"].entropy == pytest.approx(float(stats["entropy"]), abs=1e-6)

    molex.enable_routing_health(model)
    model.eval()
    run_toy(model)  # eval forwards are not counted unless asked
    model.train()
    run_toy(model)
    run_toy(model)
    window = molex.routing_health(model)
    assert window.source == "window"
    check(window["proj"], expected, forwards=2)
    run_toy(model)
    check(molex.routing_health(model, reset=False)["proj"], expected, forwards=1)  # the read started a new window
    check(molex.routing_health(model)["proj"], expected, forwards=1)
    molex.enable_routing_health(model, training_only=False)
    model.eval()
    run_toy(model)
    check(molex.routing_health(model)["proj"], expected, forwards=1)
    molex.disable_routing_health(model)
    assert molex.routing_health(model).source == "last_forward"


def test_shared_routers_report_once_per_router():
    model = tiny_llama(num_layers=2)
    cfg = molex.MoLEConfig(
        target_modules=["q_proj", "v_proj"], num_experts=2, router="milora", router_options={"top_k": 1}
    )
    molex.inject(model, cfg)
    molex.enable_routing_health(model)
    model.train()
    model(input_ids=torch.randint(4, 100, (2, 5)), attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5]))
    health = molex.routing_health(model)
    assert list(health.layers) == ["model.layers.0.self_attn.mole_router", "model.layers.1.self_attn.mole_router"]
    for unit in health:  # the block router chooses between the block's two MoLE modules, top-1 per sequence
        assert unit.scope == "block" and unit.num_experts == 2 and unit.tokens == 9
        assert sum(unit.load) == pytest.approx(1.0)


# ------------------------------------------------------------------ no host synchronisation


class SyncWatch(TorchDispatchMode):
    """Records the ops that make the host wait for the device: reading a value (``.item()``, ``bool()``,
    ``float()``: ``_local_scalar_dense``) or producing a data-dependent shape (boolean indexing, nonzero)."""

    SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name.startswith("aten::index") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for arg in args
            for a in (arg if isinstance(arg, (list, tuple)) else [arg])
        )
        if name in self.SYNCING or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_the_sync_watch_catches_host_syncs():
    x = torch.randn(4)
    for sync in (lambda: x.sum().item(), lambda: x[x > 0], lambda: bool(x.sum() > 0), lambda: float(x.max())):
        with SyncWatch() as watch:
            sync()
        assert watch.seen, "the check must be able to fail"


def test_health_and_the_balance_bias_add_no_host_sync_to_the_forward():
    batch = {"input_ids": torch.randint(4, 100, (2, 6)), "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])}
    seen = {}
    for enabled in (False, True):
        model = tiny_llama(num_layers=2)
        options = {"balance": "bias"} if enabled else {"balance": "none"}
        molex.inject(
            model,
            molex.MoLEConfig(
                target_modules=["q_proj", "v_proj"], num_experts=4, router_options=options, kernel_backend="dense"
            ),
        )
        model.train()
        if enabled:
            molex.enable_routing_health(model)
        model(**batch)  # warm-up (lazy initialisations)
        with SyncWatch() as watch:
            model(**batch)
            if enabled:
                molex.update_balance_biases(model)
        seen[enabled] = watch.seen
        if enabled:  # the forwards were counted, and reading is where the one transfer happens
            assert molex.routing_health(model)["model.layers.0.self_attn.q_proj"].forwards == 2
    assert seen[True] == seen[False]  # whatever the model itself does, health and the bias add nothing


def test_the_window_update_itself_never_syncs():
    model = toy_model()
    run_toy(model)
    layer = molex.mole_layers(model)["proj"]
    molex.enable_routing_health(model)
    hook = next(iter(layer._forward_hooks.values()))
    with SyncWatch() as watch:
        hook(layer.train(), (), None)
    assert watch.seen == []


@pytest.mark.gpu
@pytest.mark.parametrize("router", ["topk", "switch", "dynmole"])
def test_no_host_sync_on_cuda(router):
    """On a GPU, CUDA's own sync detector: the layer forward with health and the bias on, and the update."""
    from molex.layer.experts import LoRAExperts
    from molex.layer.linear import MoLELinear

    pool = LoRAExperts(in_features=32, out_features=32, num_experts=4, rank=4, scaling=1.0)
    opts = {"balance": "bias", "balance_gamma": 0.01}
    layer = MoLELinear(
        nn.Linear(32, 32),
        experts=pool,
        router=molex.build_router(router, in_features=32, num_experts=4, **opts),
        kernel_backend="dense",
    )
    holder = nn.ModuleDict({"layer": layer}).cuda().train()
    molex.enable_routing_health(holder)
    x = torch.randn(64, 32, device="cuda")
    layer(x).sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
        molex.update_balance_biases(holder)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert molex.routing_health(holder)["layer"].forwards == 2


# ------------------------------------------------------------------ the collapse warning


def health_of(shares: list[float], dead: int = 0) -> RoutingHealth:
    layers = {
        f"model.layers.{i}.q_proj": LayerHealth(
            f"model.layers.{i}.q_proj", "linear", 4, (s, 1 - s, 0.0, 0.0), s, dead, None, None, 10, 1
        )
        for i, s in enumerate(shares)
    }
    return RoutingHealth(layers, "window")


def test_the_collapse_warning_fires_after_n_consecutive_collapsed_logs_and_not_before():
    watch = CollapseWatch(HealthSettings(collapse_share=0.95, collapse_logs=3))
    assert watch.observe(10, health_of([0.99, 0.5])) is None
    assert watch.observe(20, health_of([0.99, 0.96])) is None
    line = watch.observe(30, health_of([0.99, 0.96]))
    assert line is not None and "\n" not in line
    assert "step 30" in line and "layers.0.q_proj (0.990)" in line and "layers.1" not in line
    assert watch.observe(40, health_of([0.99, 0.96])) is not None  # layer 1's third collapsed log
    assert watch.observe(50, health_of([0.99, 0.96])) is None  # each collapse is reported once
    assert watch.observe(60, health_of([0.95, 0.5])) is None  # 0.95 is not above 0.95: the count restarts
    assert watch.observe(70, health_of([0.99, 0.5])) is None
    assert watch.observe(80, health_of([0.99, 0.5])) is None
    assert "layers.0.q_proj" in watch.observe(90, health_of([0.99, 0.5]))
    assert watch.collapsed_at == {"model.layers.0.q_proj": 30, "model.layers.1.q_proj": 40}


def test_a_single_expert_layer_is_never_called_collapsed():
    """A plain LoRA through molex-train (one expert per layer) routes everything to its one expert."""
    watch = CollapseWatch(HealthSettings(collapse_share=0.95, collapse_logs=1))
    lora = RoutingHealth({"lora": LayerHealth("lora", "linear", 1, (1.0,), 1.0, 0, None, None, 10, 1)}, "window")
    assert watch.observe(10, lora) is None and watch.observe(20, lora) is None
    assert lora.collapsed(0.95) == []
    assert watch.observe(30, health_of([0.99])) is not None  # a pool of 4 at 0.99 still is


def test_dead_experts_are_warned_about_when_their_number_grows():
    watch = CollapseWatch(HealthSettings(collapse_share=0.95, collapse_logs=3))
    line = watch.observe(5, health_of([0.5], dead=2))
    assert "dead experts" in line and "layers.0.q_proj 2/4" in line
    assert watch.observe(10, health_of([0.5], dead=2)) is None
    assert watch.observe(15, health_of([0.5], dead=1)) is None
    assert watch.observe(20, health_of([0.5], dead=2)) is not None


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"collapse_share": 1.5}, r"collapse_share must be in \(0, 1\].*got 1.5"),
        ({"collapse_logs": 0}, "collapse_logs must be >= 1.*got 0"),
        ({"log_every_n_steps": -1}, "log_every_n_steps must be >= 0.*got -1"),
        ({"collapse_logs": 2.5}, "collapse_logs must be a whole number, got 2.5"),
    ],
)
def test_bad_health_settings_fail_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        HealthSettings(**bad)


# ------------------------------------------------------------------ molex-train


def test_molex_train_logs_health_warns_and_writes_summary_and_plot(tmp_path, caplog):
    from hydra import compose, initialize_config_dir

    from molex.cli.train import train
    from tests.helpers.cli import CONF, SMOKE

    overrides = [
        *SMOKE,
        f"run_dir={tmp_path}",
        "trainer.max_steps=4",
        "log_routing_every_n_steps=1",
        "eval.before=false",
        "eval.after=false",
        "analysis.enabled=false",
        "health.collapse_share=0.01",  # every layer "collapses": the warning must come at the second log
        "health.collapse_logs=2",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with caplog.at_level(logging.WARNING, logger="molex.layer.health"):
        train(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.name == "molex.layer.health"]
    assert len(warnings) == 1 and warnings[0].startswith("routing health at step 2: collapsed")
    summary = (tmp_path / "summary.txt").read_text()
    assert "6 MoLE layers" in summary and "routing health at step 4" in summary
    assert "layers.1.mlp.down_proj" in summary.split("routing health at step 4")[1]
    png = Path(tmp_path / "plots" / "routing_health.png")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    header = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0]
    for column in (
        "health/layers.0.self_attn.q_proj/largest_share",
        "health/layers.0.self_attn.q_proj/dead_experts",
        "health/layers.0.self_attn.q_proj/tiny_margin",
        "health/collapsed_layers",
    ):
        assert column in header
