"""MoLEModule: training step, schedule, adapter-only checkpoints, exact resume, every router."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import pytest
import torch

import molex
from molex.layer.inject import routers_of
from molex.lightning import MoLEModule, warmup_cosine
from tests.helpers.lightning import TARGETS, loader, make_module, synthetic_batches, trainer
from tests.helpers.models import tiny_llama


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, warmup_steps=3, total_steps=13, min_lr_ratio=0.1) for s in range(14)]
    assert lrs[0] == pytest.approx(0.25) and lrs[2] == pytest.approx(0.75)
    assert lrs[3] == pytest.approx(1.0) and lrs[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))


def test_training_lowers_loss_and_trains_only_adapters(tmp_path):
    torch.manual_seed(0)
    # 6 MoLE layers: the default load_balance_coef (20 over the model, sized for 90 layers) would be 3.3 per router
    module = make_module(load_balance_coef=1.0)
    base_before = {k: v.clone() for k, v in module.model.state_dict().items() if "base_layer" in k}
    data = synthetic_batches()
    batch = {k: torch.stack([r[k] for r in data[:8]]) for k in data[0]}
    with torch.no_grad():
        start = module._losses(batch)[1].item()
    trainer(tmp_path, max_steps=30, limit_val_batches=0).fit(module, loader())
    with torch.no_grad():
        end = module._losses(batch)[1].item()
    assert end < start - 0.15
    for k, v in module.model.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k
    opt = module.trainer.optimizers[0]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in molex.trainable_parameters(module.model)
    )


def _fit_one_step_at_router_scale(tmp_path, router: str, num_experts: int, scale: float) -> MoLEModule:
    module = MoLEModule(
        model=lambda: tiny_llama(num_layers=2),
        mole_config=molex.MoLEConfig(target_modules=["q_proj"], num_experts=num_experts, router=router),
        learning_rate=1e-2,
        router_lr_scale=scale,
    )
    trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False).fit(module, loader())
    return module


def test_router_lr_scale_trains_routers_at_their_own_rate(tmp_path):
    module = _fit_one_step_at_router_scale(tmp_path, "topk", 4, 4.0)
    experts, routers = module.trainer.optimizers[0].param_groups
    router_ids = {id(p) for r in routers_of(module.model).values() for p in r.parameters()}
    assert {id(p) for p in routers["params"]} == router_ids and router_ids.isdisjoint(map(id, experts["params"]))
    assert routers["initial_lr"] == pytest.approx(4 * experts["initial_lr"]) == pytest.approx(4e-2)
    with pytest.raises(ValueError, match="router_lr_scale must be a finite number > 0"):
        MoLEModule(model=module.model, router_lr_scale=-1.0)
    # one LoRA behind the parameter-free `fixed` router: one group at the experts' rate
    lora = _fit_one_step_at_router_scale(tmp_path, "fixed", 1, 4.0)
    assert [g["initial_lr"] for g in lora.trainer.optimizers[0].param_groups] == [pytest.approx(1e-2)]


def test_loss_includes_weighted_aux_losses():
    module = make_module(load_balance_coef=0.5, balance_share="slots")
    batch = {k: torch.stack([r[k] for r in synthetic_batches(num=4)]) for k in synthetic_batches(num=1)[0]}
    loss, lm_loss, aux = module._losses(batch)
    assert aux is not None and aux.item() > 0.4  # ~ coef * E * sum f P >= coef (slots: not offset by 1)
    torch.testing.assert_close(loss, lm_loss + aux)


def test_routing_metrics_per_layer():
    module = make_module()
    batch = {k: torch.stack([r[k] for r in synthetic_batches(num=4)]) for k in synthetic_batches(num=1)[0]}
    module(**batch)
    metrics = module.routing_metrics()
    assert "routing/layers.0.self_attn.q_proj/entropy" in metrics
    loads = [metrics[f"routing/layers.1.mlp.down_proj/load_e{e}"] for e in range(4)]
    torch.testing.assert_close(torch.stack(loads).sum(), torch.tensor(1.0))


def test_checkpoint_holds_only_adapter_and_config(tmp_path):
    module = make_module()
    tr = trainer(tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    tr.fit(module, loader())
    tr.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in molex.adapter_state_dict(module.model)}
    assert ckpt["molex"]["mole_config"]["router"]["name"] == "topk"
    assert not any("base_layer" in k or "embed" in k for k in ckpt["state_dict"])


def test_resume_matches_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    full = make_module(jitter_noise=0.1)  # jitter draws random numbers: the RNG must not matter for equality
    L.seed_everything(1)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    trainer(tmp_path, max_steps=8, limit_val_batches=0, callbacks=[ckpt_cb]).fit(full, loader())
    mid = tmp_path / "ck" / "epoch=0-step=4.ckpt"
    assert mid.is_file(), sorted(p.name for p in (tmp_path / "ck").iterdir())

    L.seed_everything(0)
    resumed = make_module(jitter_noise=0.1)
    L.seed_everything(1)
    trainer(tmp_path, max_steps=8, limit_val_batches=0, enable_checkpointing=False).fit(
        resumed, loader(), ckpt_path=mid
    )
    a, b = molex.adapter_state_dict(full.model), molex.adapter_state_dict(resumed.model)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_resume_rejects_other_configuration(tmp_path):
    module = make_module()
    tr = trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    tr.fit(module, loader())
    tr.save_checkpoint(tmp_path / "a.ckpt")
    cfg = molex.MoLEConfig(target_modules=TARGETS, rank=4, num_experts=2)
    other = MoLEModule(model=tiny_llama(num_layers=2), mole_config=cfg)
    with pytest.raises(ValueError, match="num_experts: checkpoint 4, requested 2"):
        trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(other, loader(), ckpt_path=tmp_path / "a.ckpt")


def test_constructor_errors():
    with pytest.raises(ValueError, match="no MoLE layers"):
        MoLEModule(model=tiny_llama(num_layers=1))
    injected = molex.inject(tiny_llama(num_layers=1), molex.MoLEConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has MoLE layers"):
        MoLEModule(model=injected, mole_config=molex.MoLEConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="learning rate must be > 0, got 0"):
        MoLEModule(model=injected, learning_rate=0)


#: options without a default: the feature router needs its features (the batches' three tasks)
REQUIRED_OPTIONS = {"features": {"features": {"task": 3}}}


@pytest.mark.parametrize("router", molex.available_routers())
def test_fast_dev_run_every_router(tmp_path, router):
    module = make_module(router, **REQUIRED_OPTIONS.get(router, {}))
    trainer(tmp_path, fast_dev_run=2).fit(module, loader(), loader())
    assert torch.isfinite(module.trainer.callback_metrics["train/loss"])


def smollm2_shaped_llama():
    """SmolLM2-135M's exact shapes (134.5 M parameters, tied embeddings) on the meta device: no memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def test_default_run_checkpoint_is_under_5_percent_of_the_base_model(tmp_path):
    """The default run's checkpoint = its adapter tensors + small records; measured on the real shapes."""
    from hydra import compose, initialize_config_dir

    from molex.cli.common import build_mole_config

    with initialize_config_dir(config_dir=str(Path(molex.__file__).parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="train")
    assert cfg.checkpoint.save_weights_only
    model = smollm2_shaped_llama()
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 134e6 < base_bytes / 4 < 135e6
    molex.inject(model, build_mole_config(cfg))
    adapter_bytes = sum(v.numel() * v.element_size() for v in molex.adapter_state_dict(model).values())
    assert adapter_bytes < 0.05 * base_bytes, f"adapter {adapter_bytes / 2**20:.1f} MiB of {base_bytes / 2**20:.0f} MiB"


def test_weights_only_checkpoint_file_is_the_adapter_plus_records(tmp_path):
    module = make_module()
    tr = trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    tr.fit(module, loader())
    tr.save_checkpoint(tmp_path / "w.ckpt", weights_only=True)
    adapter_bytes = sum(v.numel() * v.element_size() for v in molex.adapter_state_dict(module.model).values())
    assert tmp_path.joinpath("w.ckpt").stat().st_size < adapter_bytes + 64 * 1024
    ckpt = torch.load(tmp_path / "w.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == module.adapter_keys() and "optimizer_states" not in ckpt
