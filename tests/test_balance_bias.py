"""Loss-free bias balancing (``balance="bias"``, DeepSeek-V3) and the ``balance`` option of token-choice routers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import molex
from molex.layer.experts import LoRAExperts
from molex.layer.linear import MoLELinear
from molex.training import OptimSettings, train_steps
from tests.helpers.models import tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")

TOKEN_CHOICE = ["topk", "switch", "dynmole"]


def injected(router: str = "topk", seed: int = 0, **options) -> nn.Module:
    model = tiny_llama(num_layers=2, seed=seed)
    opts = {"top_k": 2, **options} if router == "topk" else options
    return molex.inject(
        model, molex.MoLEConfig(target_modules=["q_proj", "v_proj"], num_experts=4, router=router, router_options=opts)
    )


def lm_batches(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 120, (2, 8), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def lm_loss(model: nn.Module):
    def loss(batch):
        out = model(**batch).loss
        aux = molex.total_aux_loss(model)
        return out if aux is None else out + aux

    return loss


def biases(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("balance_bias")}


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_bad_balance_options_fail_at_config_time(router):
    with pytest.raises(ValueError, match=r"balance='foo'.*aux, bias, none"):
        molex.MoLEConfig(target_modules=["q_proj"], router=router, router_options={"balance": "foo"})
    for gamma in (-0.1, math.inf, math.nan, True):
        with pytest.raises(ValueError, match=rf"balance_gamma must be a finite number >= 0.*got {gamma!r}"):
            molex.MoLEConfig(target_modules=["q_proj"], router=router, router_options={"balance_gamma": gamma})


def test_bad_balance_option_from_the_command_line_config():
    from hydra import compose, initialize_config_dir

    from molex.cli.common import CLIError, build_mole_config
    from tests.helpers.cli import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["router.options.balance=foo"])
    with pytest.raises(CLIError, match="balance='foo'"):
        build_mole_config(cfg)


def test_only_bias_mode_has_a_bias_and_only_aux_mode_a_balance_loss():
    x = torch.randn(6, 8)
    for balance, has_bias, has_loss in (("aux", False, True), ("bias", True, False), ("none", False, False)):
        router = molex.build_router("topk", in_features=8, num_experts=4, balance=balance)
        assert ("balance_bias" in router.state_dict()) == has_bias
        assert ("load_balance" in router(x).aux_losses) == has_loss


# ------------------------------------------------------------------ the rule


def test_bias_chooses_the_experts_and_the_unbiased_probabilities_weigh_them():
    # the raw gate at temperature 1, so that the logits are x itself
    router = molex.build_router(
        "topk", in_features=4, num_experts=4, top_k=2, balance="bias", input_norm="none", temperature=1.0
    )
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
        router.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 always chosen
    x = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    probs = x.softmax(-1)[0]
    decision = router(x)
    assert decision.indices.tolist() == [[3, 0]]
    expected = torch.stack([probs[3], probs[0]]) / (probs[3] + probs[0])
    torch.testing.assert_close(decision.weights[0], expected)
    torch.testing.assert_close(decision.probs[0], probs)  # statistics see the unbiased distribution


def test_the_update_counts_real_tokens_only_and_moves_by_gamma():
    from molex.layer.context import RoutingContext

    router = molex.build_router("switch", in_features=4, num_experts=4, balance="bias", balance_gamma=0.5).train()
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    # sequence 0: two padding tokens that pick expert 3, then experts 0 and 0; sequence 1: experts 0, 1, 2, 2
    x = torch.eye(4)[[3, 3, 0, 0, 0, 1, 2, 2]] * 4
    ctx = RoutingContext(attention_mask=torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), batch_size=2, seq_len=4)
    router(x, ctx)
    counts = [3.0, 1.0, 2.0, 0.0]  # padding not counted: expert 3 was chosen by padding only
    assert router._balance_counts.tolist() == counts
    assert molex.update_balance_biases(nn.ModuleDict({"r": router})) == 1
    mean = sum(counts) / 4  # 1.5: over-loaded experts go down by gamma, under-loaded ones up
    assert router.balance_bias.tolist() == [-0.5, 0.5, -0.5, 0.5]
    assert mean == 1.5 and router._balance_counts.tolist() == [0.0] * 4
    router.eval()
    router(x, ctx)  # inference: nothing is counted, the bias is frozen
    assert molex.update_balance_biases(nn.ModuleDict({"r": router})) == 0
    assert router.balance_bias.tolist() == [-0.5, 0.5, -0.5, 0.5]


def test_dynmole_counts_the_kept_experts_only():
    router = molex.build_router(
        "dynmole", in_features=4, num_experts=4, balance="bias", tau=1.0, top_p=0.5, keep_top_k=1
    ).train()
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4) * 8)
    router(torch.eye(4)[[0, 0, 1]])  # confident tokens: top-p keeps one expert each
    assert router._balance_counts.tolist() == [2.0, 1.0, 0.0, 0.0]


# ------------------------------------------------------------------ training


def test_the_bias_never_receives_gradients():
    model = injected(balance="bias", balance_gamma=0.01)
    names = [n for n, _ in model.named_parameters()]
    assert not any("balance_bias" in n for n in names)
    losses = train_steps(model, lm_batches(), lm_loss(model), steps=3, settings=OptimSettings(lr=1e-2))
    assert len(losses) == 3
    for name, buffer in model.named_buffers():
        if name.endswith("balance_bias"):
            assert buffer.grad is None and not buffer.requires_grad
            assert buffer.abs().sum() > 0  # moved by the update after each step, not by autograd


@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_gamma_zero_trains_exactly_like_no_balancing(router):
    outputs = {}
    for balance, gamma in (("bias", 0.0), ("none", 1e-3)):
        model = injected(router, balance=balance, balance_gamma=gamma)
        torch.manual_seed(1)
        train_steps(model, lm_batches(), lm_loss(model), steps=3, settings=OptimSettings(lr=1e-2))
        model.eval()
        with torch.no_grad():
            outputs[balance] = model(**lm_batches(1, seed=5)[0]).logits
    assert torch.equal(outputs["bias"], outputs["none"])


def _collapsed_layer(balance: str, gamma: float, *, d: int = 16, experts: int = 4, seed: int = 0):
    """A MoLE layer over a linear map whose router gives expert 0 a logit ~8 for every token (p_0 ~ 0.99)."""
    torch.manual_seed(seed)
    router = molex.build_router(
        "topk",
        in_features=d,
        num_experts=experts,
        top_k=2,
        balance=balance,
        balance_gamma=gamma,
        input_norm="none",  # the raw gate, so that the logit of expert 0 is 4 x_0
        temperature=1.0,
    )
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.1)
        router.gate.weight[0, 0] = 4.0  # inputs have x_0 ~ N(2, 1)
    pool = LoRAExperts(in_features=d, out_features=d, num_experts=experts, rank=4, scaling=1.0)
    return MoLELinear(nn.Linear(d, d), experts=pool, router=router)


def test_bias_balancing_undoes_a_collapsed_router_and_no_balancing_does_not():
    """The bounds docs/concepts/layer.md states: E = 4, top-2, 200 AdamW steps (lr 1e-2) of 64 tokens, gamma = 1e-2,
    largest share of the routed weight over the last 50 steps."""
    d, steps, window = 16, 200, 50
    gen = torch.Generator().manual_seed(1)
    offset = torch.zeros(d)
    offset[0] = 2.0
    batches = [torch.randn(64, d, generator=gen) + offset for _ in range(8)]
    torch.manual_seed(2)
    target = nn.Linear(d, d).requires_grad_(False)
    result = {}
    for balance, gamma in (("bias", 1e-2), ("none", 0.0)):
        layer = _collapsed_layer(balance, gamma)
        holder = nn.ModuleDict({"layer": layer})

        def loss(x, layer=layer, holder=holder):
            mse = (layer(x) - target(x)).pow(2).mean()
            aux = molex.total_aux_loss(holder)  # of the forward just run (none here: no loss with bias / none)
            return mse if aux is None else mse + aux

        with torch.no_grad():
            layer(batches[0])
        before = molex.routing_health(holder)["layer"]
        settings = OptimSettings(lr=1e-2)
        train_steps(layer, batches, loss, steps=steps - window, settings=settings)
        molex.enable_routing_health(holder)
        train_steps(layer, batches, loss, steps=window, settings=settings)
        after = molex.routing_health(holder)["layer"]
        assert after.forwards == window
        result[balance] = (before, after)
    assert result["bias"][0].largest_share > 0.9 and result["none"][0].largest_share > 0.9  # collapsed at start
    assert result["bias"][1].largest_share < 0.45  # 1/E = 0.25; measured 0.35
    assert result["bias"][1].dead_experts == 0
    assert result["none"][1].largest_share > 0.9  # measured 0.96
    assert result["none"][1].dead_experts >= 2


def test_lightning_applies_the_update_after_each_optimiser_step(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from molex.lightning import MoLEModule

    model = injected(balance="bias", balance_gamma=0.25)
    module = MoLEModule(model=model, learning_rate=1e-3, log_routing_every_n_steps=0)
    rows = [{k: v[i] for k, v in b.items()} for b in lm_batches(2) for i in range(2)]
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        accumulate_grad_batches=2,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(rows, batch_size=1))
    for value in biases(module.model).values():
        # two optimiser steps of +-gamma (four batches: accumulated in pairs), never more
        assert value.abs().max() <= 0.5 and set(value.abs().tolist()) <= {0.0, 0.5}


# ------------------------------------------------------------------ adapters


def test_adapter_round_trip_keeps_the_bias_and_old_adapters_load(tmp_path):
    model = injected(balance="bias", balance_gamma=0.05)
    train_steps(model, lm_batches(), lm_loss(model), steps=3, settings=OptimSettings(lr=1e-2))
    saved = biases(model)
    assert len(saved) == 4 and all(v.abs().sum() > 0 for v in saved.values())
    molex.save_adapter(model, tmp_path / "bias")
    loaded = molex.load_adapter(tiny_llama(num_layers=2), tmp_path / "bias")
    for key, value in biases(loaded).items():
        assert torch.equal(value, saved[key])
    batch = lm_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, loaded.eval()(**batch).logits)

    # an adapter written without the option (router_options without `balance`) loads as before: no bias
    old = molex.inject(tiny_llama(num_layers=2), molex.MoLEConfig(target_modules=["q_proj"], num_experts=4))
    molex.save_adapter(old, tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    written = json.loads(path.read_text())
    for option in ("balance", "balance_gamma"):  # as an adapter saved before the option existed
        del written["mole_config"]["router"]["options"][option]
    path.write_text(json.dumps(written))
    assert not biases(molex.load_adapter(tiny_llama(num_layers=2), tmp_path / "old"))


def test_the_study_variant_selects_bias_balancing():
    from benchmarks.study_measure import compose_config, mole_config_of
    from benchmarks.study_variants import variant_overrides

    config = mole_config_of(compose_config(variant_overrides("mola_bias")))
    assert config.router_name == "topk" and config.allocation.schedule == "mola-increasing"
    assert config.router_options["balance"] == "bias" and config.router_options["balance_gamma"] == 1e-3
