"""``molex-train``: fine-tune a model with a mixture of LoRA experts, evaluate it before and after.

    molex-train                                     # SmolLM2-135M, built-in tasks, top-k MoLE, CPU
    molex-train router=soft allocation=uniform trainer.max_steps=50
    molex-train -m router=topk,soft                 # one run per router
    molex-train model=tiny_llama trainer.max_steps=5 eval.before=false   # smoke test

The run directory (``run_dir``) receives the resolved config (``config.yaml``), ``summary.txt`` (the MoLE
layers, then their routing health at the end of training), ``metrics.json``, the adapter (``adapter/``,
``molex.save_adapter`` format), routing plots (``plots/``, ``routing_health.png`` among them), logs
(``logger=``: CSV and TensorBoard by default; ``csv``, ``wandb`` offline, ``mlflow`` file store) and
checkpoints (``checkpoints/``, adapter weights only); with ``allocation=auto``,
the decided experts per layer (``allocation.txt``, ``allocation.png``).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from molex.cli.common import report_errors
from molex.cli.plugins import store_registered_routers
from molex.cli.run_outputs import (
    checkpoint_metrics,
    close_trackers,
    evaluate,
    finish,
    fit_metrics,
    routing_analysis,
    trained_model,
    write_health,
    write_run_start,
)
from molex.cli.run_parts import prepare_run

log = logging.getLogger("molex.train")

#: warnings Lightning gives on every run, about itself rather than the run: (message regex, module regex).
#: The model summary cannot size bf16 weights (the summary still prints); Lightning builds a pytree leaf
#: the way torch deprecated.
_LIGHTNING_NOTICES = (
    (r"Precision \S+ is not supported by the model summary", r"lightning\."),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\."),
)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job as configured; returns the metrics written to ``metrics.json``."""
    from lightning.pytorch.utilities import rank_zero_only

    import molex
    from molex.lightning import MoLEModule

    start = time.perf_counter()
    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning prints its own lines: do not repeat them
        logging.getLogger(name).propagate = False
    for message, module in _LIGHTNING_NOTICES:
        warnings.filterwarnings("ignore", message=message, module=module)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = rank_zero_only.rank == 0
    run = prepare_run(cfg)  # every check, then the settings, model, data and trainer
    model, tokenizer, dm, trainer = run.built.model, run.built.tokenizer, run.built.datamodule, run.trainer

    metrics: dict[str, Any] = {"run_dir": str(run_dir)}
    if is_main and cfg.eval.before:
        # the model is freshly injected (every B is zero): it computes exactly what the base model does
        log.info("evaluating the untrained model on %d test examples", len(dm.test_examples()))
        metrics["before"] = evaluate(model, tokenizer, dm, cfg)
        log.info("untrained exact-match accuracy: %.1f%%", 100 * metrics["before"]["accuracy"])
    module = MoLEModule(model=model, optim=run.optim, health=run.health)  # injected once, trained as it is
    table = write_run_start(cfg, run_dir, module.model) if is_main else ""

    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    metrics.update(fit_metrics(trainer, time.perf_counter() - fit_start, run.auto))
    model = trained_model(cfg, module, trainer)
    if model is None:  # FSDP: the other ranks are done once the adapter is gathered
        close_trackers(trainer.loggers)
        return metrics

    if (sizes := checkpoint_metrics(run_dir, model)) is not None:
        metrics["checkpoint"] = sizes
    if cfg.eval.after:
        metrics["after"] = evaluate(model, tokenizer, dm, cfg)
    molex.save_adapter(model, run_dir / "adapter")
    write_health(run_dir, table, module.health_monitor)
    if (routing := routing_analysis(cfg, model, dm, trainer, run_dir)) is not None:
        metrics["routing"] = routing
    finish(metrics, run_dir, start, dm.task_names)
    close_trackers(trainer.loggers)
    return metrics


store_registered_routers()  # routers without a conf file (plug-ins) join the router= group


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@report_errors("molex-train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
