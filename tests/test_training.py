"""The shared training core: settings, schedule, clipping, the in-memory loop, the objective, text fitters."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import molex
from molex.training import (
    OptimSettings,
    build_optimizer,
    build_scheduler,
    get_text_fitter,
    register_text_fitter,
    train_dlp_classifier,
    train_steps,
    warmup_cosine,
)
from molex.training.objective import mole_objective
from tests.helpers.models import tiny_llama


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 0.0}, "learning rate must be > 0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"warmup_steps": -1}, "warmup_steps >= 0"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio <= 1"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"router_lr_scale": 0.0}, "router_lr_scale must be a finite number > 0"),
        ({"router_lr_scale": float("nan")}, "router_lr_scale must be a finite number > 0"),
    ],
)
def test_settings_reject_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        OptimSettings(**options)


def test_scheduler_follows_warmup_cosine():
    settings = OptimSettings(lr=0.5, warmup_steps=2, min_lr_ratio=0.2)
    optimizer = build_optimizer([nn.Parameter(torch.zeros(3))], settings)
    scheduler = build_scheduler(optimizer, settings, total_steps=10)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.5 * warmup_cosine(s, warmup_steps=2, total_steps=10, min_lr_ratio=0.2) for s in range(12)]
    assert seen == pytest.approx(expected)
    # the default keeps the rate constant: what the in-memory jobs use
    constant = build_optimizer([nn.Parameter(torch.zeros(1))], OptimSettings(lr=0.1))
    assert build_scheduler(constant, OptimSettings(lr=0.1), total_steps=5).get_last_lr() == [0.1]


def test_router_lr_scale_puts_routers_in_their_own_group_through_the_schedule():
    expert, router = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    settings = OptimSettings(lr=0.5, warmup_steps=2, min_lr_ratio=0.2, router_lr_scale=10.0)
    optimizer = build_optimizer([expert, router], settings, router_params=[router])
    assert [g["params"] for g in optimizer.param_groups] == [[expert], [router]]
    scheduler = build_scheduler(optimizer, settings, total_steps=6)
    for step in range(8):
        factor = warmup_cosine(step, warmup_steps=2, total_steps=6, min_lr_ratio=0.2)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5 * factor, 5.0 * factor])
        optimizer.step()
        scheduler.step()
    # a scale of 1 keeps one group (checkpoints written before the option still resume)
    assert len(build_optimizer([expert, router], OptimSettings(), router_params=[router]).param_groups) == 1


def test_router_lr_scale_needs_the_routers_named_and_a_routerless_model_keeps_one_group():
    with pytest.raises(ValueError, match=r"router_lr_scale=3.0 needs router_params"):
        build_optimizer([nn.Parameter(torch.zeros(1))], OptimSettings(router_lr_scale=3.0))
    # a one-expert `fixed` router has no parameters: its LoRA trains at lr whatever the scale
    optimizer = build_optimizer(
        [nn.Parameter(torch.zeros(1))], OptimSettings(lr=0.1, router_lr_scale=3.0), router_params=[]
    )
    assert [g["lr"] for g in optimizer.param_groups] == [0.1]


def test_optimizer_needs_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([], OptimSettings())


def _grad_norms_at_step(max_grad_norm):
    model = nn.Linear(4, 1)
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        x = torch.full((8, 4), 10.0)
        train_steps(
            model,
            [x],
            lambda batch: model(batch).pow(2).mean(),
            steps=3,
            settings=OptimSettings(lr=1e-3, max_grad_norm=max_grad_norm),
        )
    finally:
        handle.remove()
    return norms


def test_loop_clips_the_gradient_norm():
    assert min(_grad_norms_at_step(None)) > 1.0
    assert max(_grad_norms_at_step(0.5)) <= 0.5 + 1e-5


def test_loop_cycles_batches_restores_mode_and_refuses_empty_input():
    model = nn.Linear(2, 1).eval()
    seen = []

    def loss_fn(batch):
        seen.append(int(batch))
        assert model.training
        return model(torch.full((1, 2), float(batch))).sum()

    history = train_steps(model, [1, 2], loss_fn, steps=5, settings=OptimSettings(lr=1e-2))
    assert seen == [1, 2, 1, 2, 1] and len(history) == 5
    assert not model.training
    assert train_steps(model, [1], loss_fn, steps=0, settings=OptimSettings()) == []
    with pytest.raises(ValueError, match="my_job got no batches"):
        train_steps(model, [], loss_fn, steps=1, settings=OptimSettings(), name="my_job")


def test_objective_adds_lm_aux_and_extra_terms():
    model = tiny_llama(num_layers=1)
    molex.inject(
        model,
        molex.MoLEConfig(
            target_modules=["q_proj"], num_experts=3, rank=2, router="soft", router_options={"load_balance_coef": 0.1}
        ),
    )
    ids = torch.randint(1, 100, (2, 6))
    out = model(input_ids=ids, labels=ids)
    aux = molex.total_aux_loss(model)
    assert aux is not None
    extra = torch.tensor(0.25)
    loss = mole_objective(model, out, extra={"task_ce": extra})
    torch.testing.assert_close(loss.total, out.loss + aux + extra)
    assert loss.lm is out.loss and loss.extra == {"task_ce": extra}

    bare = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="nothing to train on"):
        mole_objective(bare, bare(torch.zeros(1, 2)))


def test_text_fitters_are_looked_up_by_router_name():
    assert get_text_fitter("dlp") is train_dlp_classifier
    assert get_text_fitter("gate") is None
    register_text_fitter("dlp", train_dlp_classifier)  # the same fitter again is fine
    with pytest.raises(ValueError, match="text fitter named .dlp. is already registered"):
        register_text_fitter("dlp", lambda *args, **kwargs: [])
