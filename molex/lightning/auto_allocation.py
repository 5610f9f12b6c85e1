"""``AutoAllocation``: the Lightning side of ``AllocationConfig(schedule="auto")``.

When training starts it snapshots the experts; once ``warmup_steps`` optimizer steps are done it
decides the experts per layer (:func:`molex.allocation.auto.decide_allocation`), re-builds the pools
(:func:`molex.allocation.auto.reallocate`) and re-creates the optimizer and learning-rate schedule
for the new parameters, the schedule continuing at the step it had reached. ``MoLEModule`` adds it by
itself when its model's allocation is an undecided ``"auto"`` (``configure_callbacks``); pass your own
instance to the ``Trainer`` to choose where the table and the PNG are written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from molex.allocation.auto import (
    AllocationDecision,
    decide_allocation,
    pending_auto_allocation,
    plot_allocation,
    reallocate,
    snapshot_experts,
)
from molex.core.files import atomic_write

__all__ = ["PLOT_NAME", "TABLE_NAME", "AutoAllocation"]

log = logging.getLogger(__name__)

TABLE_NAME = "allocation.txt"
PLOT_NAME = "allocation.png"


class AutoAllocation(Callback):
    """Decide the experts per layer after the warm-up, then train on with the re-built pools.

    Args:
        output_dir: where ``allocation.txt`` (the per-layer table) and ``allocation.png`` go once the
            allocation is decided; ``None`` writes neither (the table is still logged).

    After the decision, :attr:`decision` holds it and the model's config holds ``allocation.per_layer``,
    so the adapter saved at the end rebuilds the same pools. One process only: under DDP the wrapped
    model would keep the warm-up's parameters.
    """

    def __init__(self, *, output_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.decision: AllocationDecision | None = None
        self._snapshot: dict[str, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pending_auto_allocation(pl_module.model) is not None and trainer.world_size > 1:
            raise ValueError(
                f"allocation schedule='auto' re-builds the experts after the warm-up, which needs one process "
                f"(this run has {trainer.world_size}); decide on one device, then train with allocation.per_layer"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pending_auto_allocation(pl_module.model) is not None:
            self._snapshot = snapshot_experts(pl_module.model)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        alloc = pending_auto_allocation(pl_module.model)
        if self._snapshot is None or alloc is None or trainer.global_step < alloc.warmup_steps:
            return
        decision = decide_allocation(pl_module.model, self._snapshot)
        self._snapshot = None
        reallocate(pl_module.model, decision.per_layer)
        _rebuild_optimizers(trainer)
        self.decision = decision
        log.info(
            "automatic allocation after %d steps:\n%s\n%s", trainer.global_step, decision.table(), decision.reuse_hint()
        )
        if self.output_dir is not None and trainer.is_global_zero:
            self.write(self.output_dir)

    def write(self, output_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write the decision's table (with the reuse hint) and PNG into ``output_dir``; returns their paths."""
        if self.decision is None:
            raise ValueError("no allocation decided yet: the warm-up has not finished")
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        text = f"{self.decision.table()}\n{self.decision.reuse_hint()}\n"

        def write_table(tmp: str) -> None:
            Path(tmp).write_text(text, encoding="utf-8")

        atomic_write(output_dir / TABLE_NAME, write_table)
        return output_dir / TABLE_NAME, plot_allocation(self.decision, output_dir / PLOT_NAME)


def _rebuild_optimizers(trainer: L.Trainer) -> None:
    """New optimizer and schedule from ``configure_optimizers``; each schedule resumes where the old one was.

    Lightning has already stepped the schedule for this batch, so the old scheduler's state is the one
    the next step starts from; the new optimizer's groups take its current learning rates.
    """
    old = [(config.scheduler.state_dict(), config.scheduler.get_last_lr()) for config in trainer.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)
    for config, (state, rates) in zip(trainer.lr_scheduler_configs, old, strict=False):
        config.scheduler.load_state_dict(state)
        for group, rate in zip(config.scheduler.optimizer.param_groups, rates, strict=False):
            group["lr"] = rate
