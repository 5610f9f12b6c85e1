"""``MoLEModule``: a LightningModule that trains the experts and routers of a MoLE-injected model."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import lightning as L
from torch import Tensor, nn

from molex.layer.config import MoLEConfig
from molex.layer.context import ROUTING_KWARGS
from molex.layer.inject import aux_losses_by_kind, get_config, inject, is_injected, mole_layers, routers_of
from molex.layer.io import adapter_state_dict
from molex.lightning.health import HealthSettings, RoutingHealthMonitor
from molex.lightning.module_settings import module_settings
from molex.lightning.resume import resume_mismatch, training_record
from molex.lightning.rng import TrainingRNG
from molex.lightning.sharding import is_sharded, shard_model
from molex.routers.balance import update_balance_biases
from molex.training import OptimSettings, build_optimizer, build_scheduler, warmup_cosine
from molex.training.objective import mole_objective

__all__ = ["MoLEModule", "warmup_cosine"]

#: batch keys handed to the model's forward; anything else in a batch (task names, ...) stays out
_MODEL_KEYS = ("input_ids", "attention_mask", "labels", *ROUTING_KWARGS)
_CHECKPOINT_KEY = "molex"


class MoLEModule(L.LightningModule):
    """Trains a mixture of LoRA experts; the base model stays frozen.

    Args:
        model: a causal LM (``nn.Module`` whose forward takes ``input_ids``, ``attention_mask``,
            ``labels`` and returns ``.loss``), or a zero-argument factory returning one.
        mole_config: injected into ``model`` here; leave ``None`` when ``model`` is already injected.
        optim: AdamW, warm-up/cosine schedule and the routers' learning-rate scale
            (:class:`~molex.training.OptimSettings`; gradient clipping is the trainer's ``gradient_clip_val``,
            so ``optim.max_grad_norm`` must stay ``None``). Default: ``lr=1e-3``, ``min_lr_ratio=0.1``.
        health: how often per-layer expert load and router entropy are logged and routing health is read
            over the steps since the last read (:class:`~molex.lightning.health.RoutingHealthMonitor`, added by
            :meth:`configure_callbacks`; ``log_every_n_steps=0`` disables both), and the collapse warning's
            thresholds (:class:`~molex.lightning.health.HealthSettings`).
        **flat: the earlier flat keywords, still accepted and turned into the settings once:
            ``learning_rate``, ``weight_decay``, ``warmup_steps``, ``min_lr_ratio``, ``betas``,
            ``router_lr_scale`` (into ``optim``), ``log_routing_every_n_steps``, ``health_collapse_share``,
            ``health_collapse_logs`` (into ``health``). They cannot be mixed with the settings they fill.

    Batches are dicts with ``input_ids [B, S]``, ``attention_mask [B, S]``, ``labels [B, S]``
    (-100 where no loss) and optionally ``task_ids [B]`` / ``prompt_mask [B, S]``, which reach the
    routers through the routing context. Loss = LM loss + the routers' weighted auxiliary losses, each
    kind averaged over the MoLE layers (:func:`molex.total_aux_loss`). The progress bar shows the LM loss
    (``train/lm_loss``, ``val/lm_loss``); ``*/loss`` is the minimised total and ``*/aux_loss`` /
    ``*/aux/<kind>`` its auxiliary part.

    Checkpoints hold only the trainable (adapter) weights plus the MoLE configuration, the layer
    plan and the state of the training steps' random stream (see :mod:`molex.lightning.rng`); the
    frozen base is rebuilt from its own source when resuming. Resuming under another MoLE
    configuration raises ``ValueError`` naming each difference.
    """

    def __init__(
        self,
        *,
        model: nn.Module | Callable[[], nn.Module],
        mole_config: MoLEConfig | None = None,
        optim: OptimSettings | Mapping[str, Any] | None = None,
        health: HealthSettings | Mapping[str, Any] | None = None,
        **flat: Any,
    ) -> None:
        super().__init__()
        self.optim, self.health = module_settings(optim, health, flat)
        if not isinstance(model, nn.Module):
            model = model()
        if mole_config is not None:
            if is_injected(model):
                raise ValueError("the model already has MoLE layers: pass mole_config=None to train them as they are")
            inject(model, mole_config)
        elif not is_injected(model):
            raise ValueError("the model has no MoLE layers: pass mole_config=MoLEConfig(...) to inject them")
        # pretrained models load in eval mode; train mode enables the experts' dropout (the base stays frozen)
        self.model = model.train()
        # plain dicts and numbers: checkpoints stay loadable with torch.load(weights_only=True)
        self.save_hyperparameters({"optim": asdict(self.optim), "health": asdict(self.health)})
        # the base weights are not in our checkpoints: `on_load_checkpoint` checks the adapter keys itself
        self.strict_loading = False
        self._rng = TrainingRNG()  # what dropout and router noise draw from inside training steps
        self.health_monitor: RoutingHealthMonitor | None = None
        if self.health.log_every_n_steps:
            self.health_monitor = RoutingHealthMonitor(self.health)

    @property
    def mole_config(self) -> MoLEConfig:
        return get_config(self.model)

    def forward(self, **batch: Any) -> Any:
        return self.model(**{k: v for k, v in batch.items() if k in _MODEL_KEYS})

    def _losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        if batch.get("labels") is None:
            raise ValueError("MoLEModule batches need `labels` ([B, S], -100 where no loss)")
        loss = mole_objective(self.model, self(**batch), rerun=lambda: self(**batch))
        return loss.total, loss.lm, loss.aux

    def _log_losses(self, stage: str, loss: Tensor, lm_loss: Tensor | None, aux: Tensor | None, size: int) -> None:
        """``<stage>/lm_loss`` (the language-modelling loss alone: the headline, comparable with a plain
        LoRA's), ``<stage>/loss`` (what is minimised), ``<stage>/aux_loss`` and one ``<stage>/aux/<kind>``
        per auxiliary loss kind (as :func:`molex.total_aux_loss` reduces them)."""
        sync = stage == "val"
        self.log(f"{stage}/loss", loss, sync_dist=sync, batch_size=size)
        if lm_loss is not None:
            self.log(f"{stage}/lm_loss", lm_loss, prog_bar=True, sync_dist=sync, batch_size=size)
        if aux is not None:
            self.log(f"{stage}/aux_loss", aux.detach(), sync_dist=sync, batch_size=size)
            for kind, value in aux_losses_by_kind(self.model).items():
                self.log(f"{stage}/aux/{kind}", value.detach(), sync_dist=sync, batch_size=size)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, lm_loss, aux = self._losses(batch)
        size = batch["input_ids"].shape[0]
        self._log_losses("train", loss, lm_loss, aux, size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=size)
        every = self.health.log_every_n_steps
        if every and self.global_step % every == 0:
            self.log_dict(self.routing_metrics(), batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, lm_loss, aux = self._losses(batch)
        self._log_losses("val", loss, lm_loss, aux, batch["input_ids"].shape[0])

    def routing_metrics(self) -> dict[str, Tensor]:
        """Per-layer ``routing/<layer>/load_e<i>`` and ``routing/<layer>/entropy`` of the last forward."""
        metrics: dict[str, Tensor] = {}
        for name, layer in mole_layers(self.model).items():
            stats = layer.routing_stats()
            short = name.removeprefix("model.")
            for expert, value in enumerate(stats.get("load", ())):
                metrics[f"routing/{short}/load_e{expert}"] = value
            if "entropy" in stats:
                metrics[f"routing/{short}/entropy"] = stats["entropy"]
        return metrics

    def configure_model(self) -> None:
        """Under a strategy with a device mesh (:class:`~molex.lightning.fsdp.FullyShardedStrategy`), shard the
        model over its data-parallel dimension with FSDP2 (:func:`molex.lightning.sharding.shard_model`);
        under any other strategy, nothing. Lightning calls it before the optimizer is built."""
        mesh = self._device_mesh
        if mesh is None or is_sharded(self.model):
            return
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"molex shards MoLE models with FSDP only (data parallel); this mesh has tensor_parallel_size="
                f"{mesh['tensor_parallel'].size()}: use trainer=fsdp (molex.lightning.fsdp.FullyShardedStrategy)"
            )
        shard_model(self.model, mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the loss-free balance update of ``balance="bias"`` routers."""
        super().optimizer_step(*args, **kwargs)
        update_balance_biases(self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        settings = self.optim
        routers = [p for router in routers_of(self.model).values() for p in router.parameters()]
        trainable = (p for p in self.model.parameters() if p.requires_grad)
        optimizer = build_optimizer(trainable, settings, router_params=routers)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set trainer max_steps (or max_epochs with a sized dataloader) so the schedule has an end")
        scheduler = build_scheduler(optimizer, settings, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[L.Callback]:
        """The routing health monitor (when ``log_routing_every_n_steps > 0``), and ``AutoAllocation`` when
        the model's allocation is an undecided ``schedule="auto"`` and the trainer has none: it decides the
        experts per layer after the warm-up and re-builds the optimizer."""
        from molex.allocation.auto import pending_auto_allocation
        from molex.lightning.auto_allocation import AutoAllocation

        callbacks: list[L.Callback] = [self.health_monitor] if self.health_monitor is not None else []
        given = any(isinstance(c, AutoAllocation) for c in self.trainer.callbacks)
        if pending_auto_allocation(self.model) is not None and not given:
            callbacks.append(AutoAllocation())
        return callbacks

    # -- checkpoints: adapter weights + configs only ------------------------------------------------
    def adapter_keys(self) -> set[str]:
        """``state_dict`` keys a checkpoint keeps: every expert/router tensor and any trainable parameter."""
        keys = {f"model.{k}" for k in adapter_state_dict(self.model)}
        keys.update(name for name, p in self.named_parameters() if p.requires_grad)
        return keys

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._rng.enter(self.device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._rng.exit(self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.adapter_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        record = training_record(self.model)
        # step-end checkpoints are written inside the step's span: this is the state the next step starts from
        record["train_rng"] = self._rng.state_dict(self.device)
        checkpoint[_CHECKPOINT_KEY] = record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if saved is None:
            raise ValueError("this checkpoint was not written by MoLEModule (no molex record); cannot resume from it")
        mismatch = resume_mismatch(saved, training_record(self.model))
        if mismatch:
            raise ValueError(
                f"the checkpoint was trained with other MoLE settings ({mismatch}); resume with the settings it was "
                "trained with, or start a new run without the checkpoint"
            )
        expected, found = self.adapter_keys(), set(checkpoint["state_dict"])
        if expected != found:
            missing, unexpected = sorted(expected - found), sorted(found - expected)
            raise ValueError(
                f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                "it was written for another molex configuration"
            )
        # checkpoints of earlier versions stored the global CPU state under `torch_rng_state`
        legacy = {"cpu": saved["torch_rng_state"]} if "torch_rng_state" in saved else {}
        self._rng.load_state_dict(saved.get("train_rng", legacy))
