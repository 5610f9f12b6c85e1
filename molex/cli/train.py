"""``molex-train``: fine-tune a model with a mixture of LoRA experts, evaluate it before and after.

    molex-train                                     # SmolLM2-135M, built-in tasks, top-k MoLE, CPU
    molex-train router=soft allocation=uniform trainer.max_steps=50
    molex-train -m router=topk,soft                 # one run per router
    molex-train model=tiny_llama trainer.max_steps=5 eval.before=false   # smoke test

The run directory (``run_dir``) receives the resolved config (``config.yaml``), ``summary.txt`` (the MoLE
layers, then their routing health at the end of training), ``metrics.json``, the adapter (``adapter/``,
``molex.save_adapter`` format), routing plots (``plots/``, ``routing_health.png`` among them), logs
(CSV and TensorBoard) and checkpoints (``checkpoints/``, adapter weights only); with ``allocation=auto``,
the decided experts per layer (``allocation.txt``, ``allocation.png``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from molex.cli.common import (
    CLIError,
    TrainingObjects,
    build_training,
    check_trainer,
    instantiate,
    report_errors,
    write_json,
)
from molex.cli.precision import resolve_precision
from molex.core.files import atomic_write

log = logging.getLogger("molex.train")


def _loggers(run_dir: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list[Any] = [CSVLogger(run_dir, name="logs", version="")]
    try:
        import tensorboard  # noqa: F401 - optional: only its presence matters

        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False))
    except ImportError:
        log.info("tensorboard is not installed: logging to CSV only")
    return loggers


def _callbacks(cfg: DictConfig, run_dir: Path) -> list[Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from molex.cli.progress import progress_callbacks

    every = cfg.checkpoint.every_n_train_steps
    return [
        *progress_callbacks(cfg.trainer),
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step-{step}",
            auto_insert_metric_name=False,
            every_n_train_steps=every,
            save_top_k=-1 if every else 0,
            save_last=True,
            save_weights_only=cfg.checkpoint.save_weights_only,
        ),
    ]


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _evaluate(model: Any, tokenizer: Any, dm: Any, cfg: DictConfig) -> dict[str, Any]:
    from molex.evaluation.generation import evaluate_generation

    return evaluate_generation(
        model,
        tokenizer,
        dm.test_examples(),
        template=dm.template,
        system_prompt=dm.system_prompt,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        task_names=dm.task_names,
        feature_values=dm.feature_values,
        precision=cfg.eval.get("precision", "float32"),
    )


def _unsharded(cfg: DictConfig, sharded: Any, adapter: dict[str, Any]) -> Any:
    """A fresh, unsharded copy of the trained model: the base loaded again from ``cfg.model``, the MoLE layers
    of ``sharded`` injected, and its gathered expert and router tensors loaded. It is what rank 0 evaluates,
    analyses and saves after an FSDP run; a base too large for one device wants eval.after=false and
    analysis.enabled=false."""
    import molex
    from molex.cli.common import build_model

    model, _ = build_model(cfg.model)
    molex.inject(model, molex.get_config(sharded))
    _, unexpected = model.load_state_dict(adapter, strict=False)
    expected = set(molex.adapter_state_dict(model))
    if expected - set(adapter) or unexpected:
        raise RuntimeError(f"gathered adapter does not fit the rebuilt model: {sorted(expected - set(adapter))[:3]}")
    return model.train()


def check_resumable(path: str) -> dict[str, Any]:
    """``ckpt_path`` must be a full MoLEModule checkpoint (weights, optimizer and schedule); returns it."""
    import torch

    if not Path(path).is_file():
        raise CLIError(f"ckpt_path={path!r}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CLIError(f"ckpt_path={path!r} is not a readable checkpoint ({err.__class__.__name__}: {err})") from None
    if "molex" not in checkpoint:
        raise CLIError(f"ckpt_path={path!r} was not written by molex-train / MoLEModule")
    if "optimizer_states" not in checkpoint:
        raise CLIError(
            f"ckpt_path={path!r} holds weights only (written with checkpoint.save_weights_only=true), so training "
            "cannot resume exactly; train with checkpoint.save_weights_only=false to get resumable checkpoints, "
            "or use the run's adapter/ with molex.load_adapter"
        )
    return checkpoint


def check_resume_matches(path: str, checkpoint: dict[str, Any], built: TrainingObjects) -> None:
    """The run must resume under the MoLE settings and data layout its checkpoint was trained with."""
    from molex.lightning.resume import resume_mismatch, training_record

    mismatch = resume_mismatch(checkpoint["molex"], training_record(built.model))
    if mismatch:
        raise CLIError(
            f"ckpt_path={path!r} was trained with other MoLE settings ({mismatch}); resume with the router, "
            "allocation and mole.* values it was trained with (its run's config.yaml lists them), or drop ckpt_path "
            "to start a new run"
        )
    data_state = checkpoint.get(type(built.datamodule).__qualname__)
    if data_state:
        try:
            built.datamodule.load_state_dict(data_state)
        except ValueError as err:
            raise CLIError(f"ckpt_path={path!r}: {err}") from None


def check_auto_allocation(cfg: DictConfig, built: TrainingObjects) -> None:
    """``allocation=auto`` decides after its warm-up: the run must train past it."""
    alloc = built.mole_config.allocation
    max_steps = cfg.trainer.get("max_steps", -1)
    if alloc is None or alloc.schedule != "auto" or alloc.per_layer is not None or max_steps is None or max_steps < 0:
        return
    if alloc.warmup_steps >= max_steps:
        raise CLIError(
            f"allocation.warmup_steps={alloc.warmup_steps} leaves no training after the automatic allocation "
            f"(trainer.max_steps={max_steps}); lower allocation.warmup_steps or raise trainer.max_steps"
        )


def setup(cfg: DictConfig) -> TrainingObjects:
    """Check the training options, then build the injected model, MoLE config, data and tokenizer once.

    Raises :class:`CLIError` for any bad option or source, before anything is evaluated or trained.
    """
    check_trainer(cfg.trainer)
    checkpoint = check_resumable(cfg.ckpt_path) if cfg.ckpt_path is not None else None
    try:
        from molex.lightning.health import CollapseWatch

        CollapseWatch(collapse_share=cfg.health.collapse_share, collapse_logs=cfg.health.collapse_logs)
    except ValueError as err:
        raise CLIError(str(err)) from None
    optim = cfg.optim
    if optim.lr <= 0 or optim.warmup_steps < 0 or not 0 <= optim.min_lr_ratio <= 1:
        raise CLIError(f"optim: need lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1; got {dict(optim)}")
    if not optim.router_lr_scale > 0:
        raise CLIError(
            f"optim.router_lr_scale must be > 0 (1.0: routers train at optim.lr), got {optim.router_lr_scale}"
        )
    built = build_training(cfg)
    check_auto_allocation(cfg, built)
    if checkpoint is not None:
        check_resume_matches(cfg.ckpt_path, checkpoint, built)
        trained_scale = checkpoint.get("hyper_parameters", {}).get("router_lr_scale", 1.0)
        if trained_scale != cfg.optim.router_lr_scale:  # another value regroups the optimizer's saved state
            raise CLIError(
                f"ckpt_path={cfg.ckpt_path!r} was trained with optim.router_lr_scale={trained_scale}; resume with "
                f"that value (requested {cfg.optim.router_lr_scale})"
            )
    return built


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job as configured; returns the metrics written to ``metrics.json``."""
    from lightning.pytorch.utilities import rank_zero_only

    import molex
    from molex.evaluation.analysis import collect_routing, log_routing_report, plot_routing
    from molex.allocation.auto import pending_auto_allocation
    from molex.lightning import MoLEModule
    from molex.lightning.checkpoint_io import AtomicCheckpointIO
    from molex.lightning.sharding import gather_adapter, is_sharded

    start = time.perf_counter()
    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning prints its own lines: do not repeat them
        logging.getLogger(name).propagate = False
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = rank_zero_only.rank == 0
    built = setup(cfg)
    model, tokenizer, dm = built.model, built.tokenizer, built.datamodule
    from lightning.pytorch.callbacks import ProgressBar

    callbacks = _callbacks(cfg, run_dir)
    auto = None
    if pending_auto_allocation(model) is not None:  # allocation=auto: decided after the warm-up, into run_dir
        from molex.lightning.auto_allocation import AutoAllocation

        auto = AutoAllocation(output_dir=run_dir)
        callbacks.append(auto)
    precision = resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator"))
    if precision != cfg.trainer.get("precision"):
        log.info("trainer.precision=auto: %s on this machine", precision)
        with open_dict(cfg):
            cfg.trainer.precision = precision  # config.yaml records what ran
    trainer = instantiate(
        cfg.trainer,
        "trainer",
        logger=_loggers(run_dir),
        callbacks=callbacks,
        default_root_dir=run_dir,
        # plain progress lines replace the bar when the output is not a terminal: Lightning must not add its own
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        plugins=[AtomicCheckpointIO()],  # a kill while a checkpoint is written leaves the previous one intact
    )
    metrics: dict[str, Any] = {"run_dir": str(run_dir)}
    if is_main and cfg.eval.before:
        # the model is freshly injected (every B is zero): it computes exactly what the base model does
        log.info("evaluating the untrained model on %d test examples", len(dm.test_examples()))
        metrics["before"] = _evaluate(model, tokenizer, dm, cfg)
        log.info("untrained exact-match accuracy: %.1f%%", 100 * metrics["before"]["accuracy"])
    module = MoLEModule(
        model=model,  # already injected by setup: the module trains its MoLE layers as they are
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps,
        min_lr_ratio=cfg.optim.min_lr_ratio,
        router_lr_scale=cfg.optim.router_lr_scale,
        log_routing_every_n_steps=cfg.log_routing_every_n_steps,
        health_collapse_share=cfg.health.collapse_share,
        health_collapse_logs=cfg.health.collapse_logs,
    )
    if is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        table = molex.summary(module.model)
        _write_text(run_dir / "summary.txt", table + "\n")
        log.info("%s", table.splitlines()[-1])
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    logged = sorted(k for k in trainer.callback_metrics if k.startswith(("train/", "val/")))
    logged.sort(key=lambda k: not k.endswith("/lm_loss"))  # the LM losses first: they are the headline
    metrics["train"] = {
        "steps": trainer.global_step,
        "seconds": round(time.perf_counter() - fit_start, 2),
        **{k: round(float(trainer.callback_metrics[k]), 5) for k in logged},
    }
    if auto is not None and auto.decision is not None:
        metrics["allocation"] = auto.decision.to_dict()
    if "val/lm_loss" in metrics["train"]:  # without the routers' auxiliary losses (val/aux_loss, val/aux/*)
        metrics["val_lm_loss"] = metrics["train"]["val/lm_loss"]
    model = module.model
    if is_sharded(model):  # FSDP: every rank gathers the adapter, rank 0 rebuilds an unsharded model with it
        adapter = gather_adapter(model)  # a collective: outside the rank-0 branch
        model = _unsharded(cfg, model, adapter) if trainer.is_global_zero else None
    if not trainer.is_global_zero:
        return metrics
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        metrics["checkpoint"] = {
            "last_mib": round(last.stat().st_size / 2**20, 2),
            "base_model_mib": round(base_bytes / 2**20, 2),
            "share_of_base": round(last.stat().st_size / base_bytes, 4),
        }
    if cfg.eval.after:
        metrics["after"] = _evaluate(model, tokenizer, dm, cfg)
    molex.save_adapter(model, run_dir / "adapter")
    monitor = module.health_monitor
    if monitor is not None and monitor.history:
        _write_text(run_dir / "summary.txt", f"{table}\n\n{monitor.summary_text()}\n")
        monitor.plot(run_dir / "plots" / "routing_health.png")
    if cfg.analysis.enabled:
        report = collect_routing(
            model, dm.val_dataloader(), max_batches=cfg.analysis.max_batches, task_names=list(dm.task_names)
        )
        paths = plot_routing(report, run_dir / "plots")
        log_routing_report(report, paths, trainer.loggers, step=trainer.global_step)
        write_json(run_dir / "routing.json", report.to_dict())
        spec = report.specialisation()
        if spec:
            metrics["routing"] = {"mean_specialisation": round(sum(spec) / len(spec), 4)}
    metrics["wall_seconds"] = round(time.perf_counter() - start, 2)
    predictions = {k: metrics[k].pop("predictions") for k in ("before", "after") if "predictions" in metrics.get(k, {})}
    if predictions:
        write_json(run_dir / "predictions.json", predictions)
    write_json(run_dir / "metrics.json", metrics)
    if "before" in metrics or "after" in metrics:
        from molex.evaluation.generation import format_table

        print(format_table(metrics.get("before", {}), metrics.get("after", {}), tasks=dm.task_names))
    if "val_lm_loss" in metrics:
        print(f"validation LM loss: {metrics['val_lm_loss']:.4f} (auxiliary losses not included)")
    print(f"run directory: {run_dir}  (wall time {metrics['wall_seconds']:.0f} s)")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@report_errors("molex-train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
