"""``molex-eval``: evaluate a base model, or a base model with a trained MoLE adapter, per task.

    molex-eval adapter=outputs/train/2025-06-01/12-00-00/adapter   # the run directory molex-train printed
    molex-eval model=tiny_llama data.eval_per_task=4
    molex-eval adapter=<run>/adapter lm_eval.tasks=[arc_easy,hellaswag]   # lm-evaluation-harness tasks

Writes ``eval.json`` (accuracy per task, overall, loss) and ``predictions.json`` to ``run_dir``; with
``lm_eval.tasks``, lm-eval's results and table instead (:mod:`molex.cli.harness`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from molex.cli.common import (
    CLIError,
    build_datamodule,
    build_eval_model,
    check_generation,
    check_sources,
    report_errors,
    write_json,
)

log = logging.getLogger("molex.evaluation.generation")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Load the model (and adapter), evaluate the test split (or the ``lm_eval.tasks``), write and return
    the metrics."""
    from molex.evaluation.generation import evaluate_generation, evaluate_loss

    if cfg.lm_eval.tasks is not None:  # lm-evaluation-harness tasks instead of the data's test split
        from molex.cli.harness import evaluate_harness

        return evaluate_harness(cfg)
    check_sources(cfg.model, cfg.data)
    check_generation(cfg)
    adapter = cfg.adapter
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_eval_model(cfg.model, adapter)
    mask = list(cfg.get("mask") or [])
    if mask:
        import molex

        if adapter is None:
            raise CLIError(f"mask={mask} removes experts of an adapter: give adapter=<folder> too")
        try:
            molex.mask_experts(model, mask)
        except (ValueError, TypeError) as err:
            raise CLIError(f"mask={mask}: {err}") from None
    dm = build_datamodule(cfg.data, tokenizer, "test")
    result = evaluate_generation(
        model,
        tokenizer,
        dm.test_examples(),
        template=dm.template,
        system_prompt=dm.system_prompt,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        task_names=dm.task_names,
        feature_values=dm.feature_values,
    )
    write_json(run_dir / "predictions.json", {"predictions": result.pop("predictions")})
    if cfg.loss:
        result["loss"] = round(evaluate_loss(model, dm.test_dataloader()), 5)
    result["adapter"] = adapter
    result["mask"] = mask
    write_json(run_dir / "eval.json", result)
    width = max(len("overall"), *(len(t) for t in result["per_task"]))
    for task in [t for t in dm.task_names if t in result["per_task"]] + ["overall"]:
        accuracy = result["accuracy"] if task == "overall" else result["per_task"][task]
        count = result["num_examples"] if task == "overall" else result["counts"][task]
        print(f"{task:<{width}}  {count:>5}  {100 * accuracy:6.1f}%")
    if "loss" in result:
        print(f"test loss per label token: {result['loss']:.4f}")
    print(f"results: {run_dir / 'eval.json'}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@report_errors("molex-eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
