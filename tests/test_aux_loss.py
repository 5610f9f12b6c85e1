"""Auxiliary losses: each kind averaged over the layers that emit it, the sum kept as an option, and
the LM loss logged apart from them."""

from __future__ import annotations

import pytest
import torch

import molex
from tests.helpers.lightning import loader, make_module, trainer
from tests.helpers.models import tiny_llama


def _uniform_topk(num_layers: int, **options) -> torch.nn.Module:
    """``q_proj`` and ``v_proj`` of every block (2 MoLE layers per block), top-2 of 4 experts, every
    router's scores zero: every layer routes alike, so every layer's auxiliary losses are equal."""
    cfg = molex.MoLEConfig(
        target_modules=["q_proj", "v_proj"], rank=2, num_experts=4, router="topk", router_options=options
    )
    model = molex.inject(tiny_llama(num_layers=num_layers), cfg)
    for layer in molex.mole_layers(model).values():
        torch.nn.init.zeros_(layer.router.gate.weight)
    return model


def _forward(model: torch.nn.Module) -> None:
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids)


def test_mean_does_not_grow_with_the_number_of_layers_and_sum_does():
    totals, sums = {}, {}
    for blocks in (1, 3):  # 2 and 6 MoLE layers
        model = _uniform_topk(blocks, load_balance_coef=0.01, z_loss_coef=0.001, balance_share="slots")
        _forward(model)
        layers = len(molex.mole_layers(model))
        losses = molex.aux_losses(model)
        assert len(losses) == 2 * layers  # load_balance and z_loss per layer
        totals[layers] = molex.total_aux_loss(model)
        sums[layers] = molex.total_aux_loss(model, reduction="sum")
        # the sum option is the earlier convention: every layer's weighted losses added up
        torch.testing.assert_close(sums[layers], torch.stack(list(losses.values())).sum())
    torch.testing.assert_close(totals[2], totals[6])
    torch.testing.assert_close(sums[6], 3 * sums[2])
    # zero scores: the load-balance term is exactly 1 per layer, z-loss is log(4)^2
    expected = 0.01 * 1.0 + 0.001 * torch.log(torch.tensor(4.0)) ** 2
    torch.testing.assert_close(totals[2], expected)


def test_each_kind_is_averaged_over_the_layers_that_emit_it():
    cfg = molex.MoLEConfig(
        target_modules=["q_proj", "down_proj"],
        rank=2,
        num_experts=4,
        router="dynmole",
        router_options={"entropy_coef": 0.1, "load_balance_coef": 0.05},
    )
    model = molex.inject(tiny_llama(num_layers=2), cfg)
    for layer in molex.mole_layers(model).values():  # layers route differently: the losses differ
        torch.nn.init.normal_(layer.router.gate.weight, std=2.0)
    model.train()
    _forward(model)
    losses = molex.aux_losses(model)
    kinds = molex.aux_losses_by_kind(model)
    assert set(kinds) == {"entropy", "load_balance"}
    for kind, value in kinds.items():
        per_layer = torch.stack([v for k, v in losses.items() if k.endswith("/" + kind)])
        assert per_layer.numel() == 4 and per_layer.std() > 0
        torch.testing.assert_close(value, per_layer.mean())
    torch.testing.assert_close(molex.total_aux_loss(model), kinds["entropy"] + kinds["load_balance"])


def test_bad_reduction_names_the_value_and_no_losses_give_none():
    model = _uniform_topk(1, load_balance_coef=0.01)
    _forward(model)
    with pytest.raises(ValueError, match="reduction must be one of \\['mean', 'sum'\\], got 'max'"):
        molex.total_aux_loss(model, reduction="max")
    quiet = _uniform_topk(1, load_balance_coef=0.0)
    _forward(quiet)
    assert molex.total_aux_loss(quiet) is None and molex.aux_losses_by_kind(quiet) == {}


def test_lm_loss_is_the_headline_and_aux_losses_are_logged_apart(tmp_path):
    module = make_module(load_balance_coef=0.5, balance_share="slots")  # the slot share is not offset by 1
    tr = trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, enable_checkpointing=False)
    tr.fit(module, loader(), loader())
    logged = tr.callback_metrics
    for stage in ("train", "val"):
        total, lm, aux = logged[f"{stage}/loss"], logged[f"{stage}/lm_loss"], logged[f"{stage}/aux_loss"]
        torch.testing.assert_close(total, lm + aux)
        torch.testing.assert_close(aux, logged[f"{stage}/aux/load_balance"])
        assert aux > 0.4  # 0.5 x (E sum f P >= 1 ... averaged over layers, not multiplied by them)
    shown = tr.progress_bar_metrics
    assert "val/lm_loss" in shown and "train/lm_loss" in shown
    assert "val/loss" not in shown and "train/loss" not in shown
