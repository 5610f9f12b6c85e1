"""What ``molex-train`` writes and prints around the fit: the run directory's files, ``metrics.json`` and
the final lines.

* before fitting: ``config.yaml`` (the resolved config) and ``summary.txt`` (the MoLE layers);
* after fitting: the trained model (unsharded after FSDP), the fit's metrics, the checkpoint's size, the
  adapter, the routing-health table and plot, the routing analysis, ``predictions.json``,
  ``metrics.json`` and the printed before/after table, validation loss and run directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from molex.cli.common import write_json
from molex.core.files import atomic_write

__all__ = [
    "checkpoint_metrics",
    "close_trackers",
    "evaluate",
    "finish",
    "fit_metrics",
    "routing_analysis",
    "trained_model",
    "write_health",
    "write_run_start",
]

log = logging.getLogger("molex.train")


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def evaluate(model: Any, tokenizer: Any, dm: Any, cfg: DictConfig) -> dict[str, Any]:
    """Exact-match generation on the data module's test examples, as ``cfg.eval`` says."""
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


def write_run_start(cfg: DictConfig, run_dir: Path, model: Any) -> str:
    """``config.yaml`` and ``summary.txt``; returns the summary table (the health table joins it at the end)."""
    import molex

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    table = molex.summary(model)
    _write_text(run_dir / "summary.txt", table + "\n")
    log.info("%s", table.splitlines()[-1])
    return table


def fit_metrics(trainer: Any, fit_seconds: float, auto: Any) -> dict[str, Any]:
    """``train`` (steps, seconds, the logged ``train/`` and ``val/`` values, LM losses first), ``allocation``
    (with ``allocation=auto``) and ``val_lm_loss`` (without the routers' auxiliary losses)."""
    logged = sorted(k for k in trainer.callback_metrics if k.startswith(("train/", "val/")))
    logged.sort(key=lambda k: not k.endswith("/lm_loss"))  # the LM losses first: they are the headline
    metrics: dict[str, Any] = {
        "train": {
            "steps": trainer.global_step,
            "seconds": round(fit_seconds, 2),
            **{k: round(float(trainer.callback_metrics[k]), 5) for k in logged},
        }
    }
    if auto is not None and auto.decision is not None:
        metrics["allocation"] = auto.decision.to_dict()
    if "val/lm_loss" in metrics["train"]:
        metrics["val_lm_loss"] = metrics["train"]["val/lm_loss"]
    return metrics


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


def trained_model(cfg: DictConfig, module: Any, trainer: Any) -> Any:
    """The trained model rank 0 evaluates and saves (``None`` on the other ranks). After FSDP every rank
    gathers the adapter (a collective) and rank 0 rebuilds an unsharded model with it."""
    from molex.lightning.sharding import gather_adapter, is_sharded

    model = module.model
    if is_sharded(model):
        adapter = gather_adapter(model)
        model = _unsharded(cfg, model, adapter) if trainer.is_global_zero else None
    return model if trainer.is_global_zero else None


def checkpoint_metrics(run_dir: Path, model: Any) -> dict[str, Any] | None:
    """Size of ``checkpoints/last.ckpt`` against the frozen base's (``None`` without a last checkpoint)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {
        "last_mib": round(last.stat().st_size / 2**20, 2),
        "base_model_mib": round(base_bytes / 2**20, 2),
        "share_of_base": round(last.stat().st_size / base_bytes, 4),
    }


def write_health(run_dir: Path, table: str, monitor: Any) -> None:
    """The routing-health table after the layer summary in ``summary.txt``, and ``plots/routing_health.png``
    (nothing when health was never read)."""
    if monitor is None or not monitor.history:
        return
    _write_text(run_dir / "summary.txt", f"{table}\n\n{monitor.summary_text()}\n")
    monitor.plot(run_dir / "plots" / "routing_health.png")


def routing_analysis(cfg: DictConfig, model: Any, dm: Any, trainer: Any, run_dir: Path) -> dict[str, Any] | None:
    """Routing plots (``plots/``), ``routing.json`` and the loggers' routing scalars; returns the
    ``routing`` metrics (mean specialisation), ``None`` when off or without tasks."""
    if not cfg.analysis.enabled:
        return None
    from molex.evaluation.analysis import collect_routing, log_routing_report, plot_routing
    from molex.evaluation.health_summary import mixture_health

    report = collect_routing(
        model, dm.val_dataloader(), max_batches=cfg.analysis.max_batches, task_names=list(dm.task_names)
    )
    paths = plot_routing(report, run_dir / "plots")
    log_routing_report(report, paths, trainer.loggers, step=trainer.global_step)
    write_json(run_dir / "routing.json", report.to_dict())
    out: dict[str, Any] = {}
    spec = report.specialisation()
    if spec:
        out["mean_specialisation"] = round(sum(spec) / len(spec), 4)
    health = mixture_health(report)
    if health.experts:
        log.info("routing on the validation data: %s", health.line())
        out["health"] = health.to_dict()
    return out or None


def finish(metrics: dict[str, Any], run_dir: Path, start: float, task_names: Any) -> None:
    """``predictions.json`` (taken out of the evaluations), ``metrics.json`` (with ``wall_seconds``) and the
    printed before/after table, validation LM loss and run directory."""
    metrics["wall_seconds"] = round(time.perf_counter() - start, 2)
    predictions = {k: metrics[k].pop("predictions") for k in ("before", "after") if "predictions" in metrics.get(k, {})}
    if predictions:
        write_json(run_dir / "predictions.json", predictions)
    write_json(run_dir / "metrics.json", metrics)
    if "before" in metrics or "after" in metrics:
        from molex.evaluation.generation import format_table

        print(format_table(metrics.get("before", {}), metrics.get("after", {}), tasks=task_names))
    if "val_lm_loss" in metrics:
        print(f"validation LM loss: {metrics['val_lm_loss']:.4f} (auxiliary losses not included)")
    print(f"run directory: {run_dir}  (wall time {metrics['wall_seconds']:.0f} s)")


def close_trackers(loggers: Any) -> None:
    """End the W&B run the loggers opened, so its local files are complete when ``train`` returns and the next
    run in this process (``-m`` sweeps) opens its own instead of logging into this one."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
