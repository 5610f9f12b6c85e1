"""MoLEModule's typed settings: the typed form, the earlier flat keywords (turned into the settings once), the
refusals, and checkpoints that keep them as plain values (resumable from before and after the change)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import molex
from molex.cli.common import CLIError
from molex.cli.resume_checks import check_router_lr_scale, trained_router_lr_scale
from molex.lightning import MoLEModule
from molex.lightning.health import CollapseWatch, HealthSettings, RoutingHealthMonitor
from molex.training.optim import OptimSettings
from tests.helpers.models import tiny_llama

TARGETS = ["q_proj", "v_proj"]


def injected():
    """A one-layer random Llama (vocabulary 128, width 32) with two-expert MoLE layers."""
    model = tiny_llama(num_layers=1).train()  # as built, in training mode
    return molex.inject(model, molex.MoLEConfig(target_modules=TARGETS, rank=2, num_experts=2))


def batches(n: int = 4, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    """``input_ids``/``labels`` ``[seq]`` rows of random tokens, full attention."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, 128, (seq,), generator=gen)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids.clone()})
    return rows


def test_typed_settings_are_kept_as_they_are():
    optim = OptimSettings(lr=2e-3, warmup_steps=1, min_lr_ratio=0.5, router_lr_scale=3.0)
    health = HealthSettings(log_every_n_steps=4, collapse_share=0.8, collapse_logs=2)
    module = MoLEModule(model=injected(), optim=optim, health=health)
    assert module.optim is optim and module.health is health
    assert module.health_monitor.settings is health and module.health_monitor.watch.settings is health


def test_the_flat_keywords_become_the_same_settings():
    flat = MoLEModule(
        model=injected(),
        learning_rate=2e-3,
        weight_decay=0.01,
        warmup_steps=1,
        min_lr_ratio=0.5,
        betas=(0.8, 0.9),
        router_lr_scale=3.0,
        log_routing_every_n_steps=4,
        health_collapse_share=0.8,
        health_collapse_logs=2,
    )
    assert flat.optim == OptimSettings(
        lr=2e-3, weight_decay=0.01, warmup_steps=1, min_lr_ratio=0.5, betas=(0.8, 0.9), router_lr_scale=3.0
    )
    assert flat.health == HealthSettings(log_every_n_steps=4, collapse_share=0.8, collapse_logs=2)


def test_the_module_defaults_are_the_earlier_ones():
    module = MoLEModule(model=injected())
    assert module.optim == OptimSettings(lr=1e-3, min_lr_ratio=0.1)
    assert module.health == HealthSettings(log_every_n_steps=50, collapse_share=0.95, collapse_logs=3)
    assert MoLEModule(model=injected(), log_routing_every_n_steps=0).health_monitor is None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"optim": OptimSettings(), "learning_rate": 1e-2}, TypeError, r"optim= and also flat keywords .*lr="),
        ({"health": HealthSettings(), "health_collapse_logs": 2}, TypeError, r"set them in health=HealthSettings"),
        ({"lr": 1e-2}, TypeError, r"unexpected keyword\(s\) \['lr'\].*optim=OptimSettings"),
        ({"optim": "adamw"}, TypeError, "optim= must be a OptimSettings .* got str"),
        ({"optim": OptimSettings(max_grad_norm=1.0)}, ValueError, "gradient_clip_val"),
        ({"health_collapse_share": 2.0}, ValueError, r"collapse_share must be in \(0, 1\]"),
    ],
)
def test_mixed_unknown_or_bad_settings_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        MoLEModule(model=injected(), **kwargs)


def test_a_monitor_needs_a_read_interval():
    with pytest.raises(ValueError, match="log_every_n_steps=0"):
        RoutingHealthMonitor(HealthSettings(log_every_n_steps=0))
    assert CollapseWatch().settings == HealthSettings()


def test_checkpoints_keep_the_settings_as_plain_values_and_load_with_weights_only(tmp_path):
    optim = OptimSettings(lr=1e-2, warmup_steps=1, min_lr_ratio=0.5, router_lr_scale=2.0)
    module = MoLEModule(model=injected(), optim=optim, health=HealthSettings(log_every_n_steps=0))
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0
    )
    trainer.fit(module, DataLoader(batches(), batch_size=2))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["optim"]["router_lr_scale"] == 2.0 and hparams["health"]["log_every_n_steps"] == 0
    assert OptimSettings(**hparams["optim"]) == optim  # the dict rebuilds the same settings
    assert trained_router_lr_scale(checkpoint) == 2.0
    rebuilt = MoLEModule(model=injected(), **hparams)  # what Lightning's load_from_checkpoint passes
    assert rebuilt.optim == optim


def test_the_router_scale_of_checkpoints_from_before_the_typed_settings_is_read():
    legacy = {"hyper_parameters": {"learning_rate": 3e-3, "router_lr_scale": 10.0}}
    assert trained_router_lr_scale(legacy) == 10.0
    assert trained_router_lr_scale({}) == 1.0
    check_router_lr_scale("old.ckpt", legacy, OptimSettings(router_lr_scale=10.0))
    with pytest.raises(CLIError, match=r"trained with optim.router_lr_scale=10.0; resume with that value"):
        check_router_lr_scale("old.ckpt", legacy, OptimSettings(router_lr_scale=1.0))
