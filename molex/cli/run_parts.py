"""What ``molex-train`` builds from its config before fitting (:func:`prepare_run`): the typed settings
(``optim``, ``health``), the callbacks (``callbacks``), the loggers (``logger``), the injected model and data
(after the resume and auto-allocation checks) and the trainer.

Every node is a ``_target_`` node; a bad value stops here with one line naming it
(``optim.lr: the learning rate must be > 0, got 0``), before the model is loaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from molex.cli.common import (
    CLIError,
    TrainingObjects,
    build_training,
    check_cpu_devices,
    check_generation,
    check_trainer,
    instantiate,
)
from molex.cli.precision import resolve_precision
from molex.cli.resume_checks import check_resumable, check_resume_matches, check_router_lr_scale

__all__ = [
    "PreparedRun",
    "auto_allocation_callback",
    "build_callbacks",
    "build_loggers",
    "build_settings",
    "check_auto_allocation",
    "mlflow_logger",
    "prepare_run",
    "progress_bar",
    "step_checkpoints",
]

log = logging.getLogger("molex.train")

#: what to install when a logger's package is missing
_LOGGER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny", "tensorboard": "tensorboard"}


def _build(node: DictConfig, what: str) -> Any:
    """``hydra.utils.instantiate`` with the user's mistake in one line. A message that starts with one of the
    node's field names gets the node's path in front of it (``optim.router_lr_scale must be ...``); any other
    reads ``<what>: ...``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node)
    except (InstantiationException, ValueError, TypeError) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        text = str(cause)
        fields = [str(k) for k in node if not str(k).startswith("_")]
        named = any(text.startswith((f"{k} ", f"{k}:", f"{k}=")) for k in fields)
        raise CLIError(f"{what}.{text}" if named else f"{what}: {text}") from None


def build_settings(node: DictConfig, group: str) -> Any:
    """The settings dataclass of a ``_target_`` group node (``optim``, ``health``), checked once by its
    ``__post_init__``; a bad value raises :class:`CLIError` naming ``<group>.<field>``."""
    return _build(node, group)


def progress_bar(*, enable_progress_bar: bool, log_every_n_steps: int) -> list[Any]:
    """:func:`molex.cli.progress.progress_callbacks` from the two trainer options it reads."""
    from molex.cli.progress import progress_callbacks

    return progress_callbacks({"enable_progress_bar": enable_progress_bar, "log_every_n_steps": log_every_n_steps})


def step_checkpoints(*, dirpath: str | Path, every_n_train_steps: int | None, save_weights_only: bool) -> Any:
    """``checkpoints/last.ckpt`` at the end, plus ``step-<n>.ckpt`` every ``every_n_train_steps`` steps
    (``None``: the last one only); ``save_weights_only``: adapter weights and configs, no optimizer state."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if every_n_train_steps is not None and (isinstance(every_n_train_steps, bool) or every_n_train_steps < 1):
        raise ValueError(
            f"checkpoint.every_n_train_steps={every_n_train_steps!r}: need a step count >= 1, or null for "
            "one checkpoint at the end"
        )
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="step-{step}",
        auto_insert_metric_name=False,
        every_n_train_steps=every_n_train_steps,
        save_top_k=-1 if every_n_train_steps else 0,
        save_last=True,
        save_weights_only=save_weights_only,
    )


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """The callbacks of ``cfg.callbacks``, in order; an entry may give one callback or a list (``null`` entries,
    e.g. ``callbacks.progress=null``, are left out)."""
    callbacks: list[Any] = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        built = _build(node, f"callbacks.{name}")
        callbacks.extend(built if isinstance(built, list | tuple) else [built])
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    """The loggers of ``cfg.logger``. A missing package stops the run naming what to install; only the default's
    TensorBoard logger is left out instead (the run logs to CSV), as before the logger group existed."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    loggers: list[Any] = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        try:
            loggers.append(hydra_instantiate(node))
        except (InstantiationException, ModuleNotFoundError, ImportError) as err:
            cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
            # Lightning's own message may not name the package: the entry's name and target do
            named = f"{name} {node.get('_target_', '')} {cause}".lower()
            missing = next((pkg for key, pkg in _LOGGER_PACKAGES.items() if key in named), None)
            if not isinstance(cause, ModuleNotFoundError | ImportError) or missing is None:
                raise CLIError(f"logger.{name}: {cause}") from None
            if name == "tensorboard":
                log.info("tensorboard is not installed: logging to CSV only")
                continue
            raise CLIError(
                f"logger.{name} needs the {missing} package, which is not installed: pip install 'molex-lora[loggers]' "
                "(or pick another logger: logger=tensorboard | csv | wandb | mlflow)"
            ) from None
        except (ValueError, TypeError) as err:
            raise CLIError(f"logger.{name}: {err}") from None
    return loggers


def mlflow_logger(*, tracking_uri: str, **options: Any) -> Any:
    """Lightning's ``MLFlowLogger``. MLflow 3 refuses a ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE`` is set;
    the offline default (a file store in the run directory) is chosen on purpose, so it is allowed here, for
    ``file:`` URIs only and unless the variable is already set."""
    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(tracking_uri=tracking_uri, **options)


def auto_allocation_callback(model: Any, run_dir: Path) -> Any:
    """``allocation=auto``: the callback that decides the experts per layer after the warm-up and writes the
    decision into ``run_dir``; ``None`` for any other allocation."""
    from molex.allocation.auto import pending_auto_allocation

    if pending_auto_allocation(model) is None:
        return None
    from molex.lightning.auto_allocation import AutoAllocation

    return AutoAllocation(output_dir=run_dir)


def check_auto_allocation(max_steps: int | None, mole_config: Any) -> None:
    """``allocation=auto`` decides after its warm-up: the run (``trainer.max_steps``) must train past it."""
    alloc = mole_config.allocation
    if alloc is None or alloc.schedule != "auto" or alloc.per_layer is not None or max_steps is None or max_steps < 0:
        return
    if alloc.warmup_steps >= max_steps:
        raise CLIError(
            f"allocation.warmup_steps={alloc.warmup_steps} leaves no training after the automatic allocation "
            f"(trainer.max_steps={max_steps}); lower allocation.warmup_steps or raise trainer.max_steps"
        )


@dataclass(frozen=True)
class PreparedRun:
    """Everything ``molex-train`` fits with, built and checked from the config."""

    optim: Any  # molex.training.optim.OptimSettings
    health: Any  # molex.lightning.health.HealthSettings
    built: TrainingObjects  # the injected model, tokenizer, MoLE config and data module
    trainer: Any  # lightning.Trainer
    auto: Any  # the AutoAllocation callback with allocation=auto, else None


def prepare_run(cfg: DictConfig) -> PreparedRun:
    """Check every option, then build the settings, callbacks, loggers, the injected model and data, and the
    trainer. Raises :class:`CLIError` for any bad option, source or ``ckpt_path``, before anything is trained.

    The groups that need no model come first (a bad ``optim.lr`` fails before the model loads); the
    config then goes to :mod:`molex.cli.common` once, for the model, the data and the trainer.
    """
    from lightning.pytorch.callbacks import ProgressBar

    from molex.lightning.checkpoint_io import AtomicCheckpointIO

    check_cpu_devices(cfg.trainer)  # first: a run that cannot start must not build anything
    run_dir = Path(cfg.run_dir)
    optim, health = build_settings(cfg.optim, "optim"), build_settings(cfg.health, "health")
    callbacks, loggers = build_callbacks(cfg), build_loggers(cfg)
    checkpoint = check_resumable(cfg.ckpt_path) if cfg.ckpt_path is not None else None
    precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
    if precision != cfg.trainer.get("precision"):
        log.info("trainer.precision=auto: %s on this machine", precision)
        with open_dict(cfg):
            cfg.trainer.precision = precision  # config.yaml records what ran
    check_trainer(cfg.trainer)
    if cfg.eval.before or cfg.eval.after:
        check_generation(cfg.eval, "eval.")
    built = build_training(cfg)
    check_auto_allocation(cfg.trainer.get("max_steps", -1), built.mole_config)
    if checkpoint is not None:
        check_resume_matches(cfg.ckpt_path, checkpoint, built)
        check_router_lr_scale(cfg.ckpt_path, checkpoint, optim)
    auto = auto_allocation_callback(built.model, run_dir)
    if auto is not None:
        callbacks.append(auto)
    trainer = instantiate(
        cfg.trainer,
        "trainer",
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=run_dir,
        # plain progress lines replace the bar when the output is not a terminal: Lightning must not add its own
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        plugins=[AtomicCheckpointIO()],  # a kill while a checkpoint is written leaves the previous one intact
    )
    return PreparedRun(optim=optim, health=health, built=built, trainer=trainer, auto=auto)
