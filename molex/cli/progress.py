"""Training progress for ``molex-train``: a step bar on a terminal, plain lines everywhere else.

Training is bounded by ``trainer.max_steps`` (``max_epochs=-1``), so progress is counted in optimizer
steps against ``max_steps``, across epochs and from the resumed step, never "batch i of this epoch".
When standard output is not a terminal (a CI log, ``nohup``, a pipe), a redrawn bar would write one
carriage-return fragment per refresh into the file; there the run prints one self-contained line every
``trainer.log_every_n_steps`` steps instead: step, epoch, loss, rate and time left.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from molex.cli.common import CLIError

__all__ = ["LineProgress", "StepProgressBar", "progress_callbacks"]

#: Lightning's default ``log_every_n_steps``, used when a trainer config does not set it
_LIGHTNING_LOG_EVERY = 50


def _step_total(trainer: Any) -> int | None:
    """``max_steps`` when training is bounded by steps, else ``None`` (bounded by epochs)."""
    max_steps = trainer.max_steps
    return max_steps if max_steps is not None and max_steps > 0 else None


def _loss(trainer: Any, outputs: Any) -> float | None:
    """The step's LM loss (``train/lm_loss``, the headline: no auxiliary losses) if logged, else the
    minimised ``train/loss``, else the loss ``training_step`` returned."""
    metrics = trainer.callback_metrics
    value = metrics.get("train/lm_loss", metrics.get("train/loss"))
    if value is None:
        value = outputs.get("loss") if isinstance(outputs, dict) else outputs
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps out of ``max_steps`` (``Epoch k`` in the label).

    Lightning's own bars count batches of the current epoch (``max_epochs=-1`` shows as epoch ``0/-2``
    in the rich bar); with ``max_steps`` the bar's total is ``max_steps`` and it starts at the resumed
    step. Training bounded by epochs keeps Lightning's per-epoch count.
    """

    def on_train_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        total = _step_total(trainer)
        if total is not None:  # one bar for the whole run; a resumed run starts at its step
            bar = self.train_progress_bar
            bar.reset(total=total)
            bar.initial = bar.n = trainer.global_step

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        if _step_total(trainer) is None:
            super().on_train_epoch_start(trainer, *args)
        else:
            self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if _step_total(trainer) is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and (step % max(self.refresh_rate, 1) == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()


class LineProgress(Callback):
    """One plain line every ``every_n_steps`` optimizer steps (and at the last), for logs that are files.

    ``step 20/60  epoch 1  loss 2.4512  1.35 steps/s  ~30 s left``; the rate is measured over the
    steps since the previous line. Only the global-zero process prints.
    """

    def __init__(self, *, every_n_steps: int, stream: IO[str] | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: need a positive number of steps between lines")
        self.every_n_steps = every_n_steps
        self._stream = stream
        self._last: tuple[float, int] = (0.0, 0)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, total = trainer.global_step, _step_total(trainer)
        last_time, last_step = self._last
        if not trainer.is_global_zero or step == last_step:
            return  # a gradient-accumulation micro-batch: the step has not advanced
        if step % self.every_n_steps != 0 and step != total:
            return
        now = time.perf_counter()
        rate = (step - last_step) / max(now - last_time, 1e-9)
        self._last = (now, step)
        parts = [f"step {step}/{total}" if total else f"step {step}", f"epoch {trainer.current_epoch}"]
        loss = _loss(trainer, outputs)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts.append(f"{rate:.2f} steps/s")
        if total and rate > 0 and step < total:
            parts.append(f"~{(total - step) / rate:.0f} s left")
        print("  ".join(parts), file=self._stream or sys.stdout, flush=True)


def progress_callbacks(trainer_cfg: Any, *, interactive: bool | None = None) -> list[Callback]:
    """The progress callbacks for a ``trainer`` config node: none if ``enable_progress_bar`` is false.

    ``interactive`` (default: is standard output a terminal?) picks :class:`StepProgressBar` or
    :class:`LineProgress` every ``trainer.log_every_n_steps`` steps. Without a bar among the callbacks
    the trainer must be built with ``enable_progress_bar=False`` (else Lightning adds its own).
    """
    if not trainer_cfg.get("enable_progress_bar", True):
        return []
    if interactive is None:
        interactive = sys.stdout.isatty()
    if interactive:
        return [StepProgressBar(refresh_rate=1)]
    every = trainer_cfg.get("log_every_n_steps", _LIGHTNING_LOG_EVERY)
    try:
        return [LineProgress(every_n_steps=int(every))]
    except (TypeError, ValueError) as err:
        raise CLIError(f"trainer.log_every_n_steps={every!r}: {err}") from None
