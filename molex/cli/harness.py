"""``molex-eval lm_eval.tasks=[...]``: lm-evaluation-harness tasks on a model (and its trained adapter).

    molex-eval adapter=<run>/adapter lm_eval.tasks=[arc_easy,hellaswag] lm_eval.num_fewshot=0
    molex-eval model=tiny_llama lm_eval.tasks=[my_task] lm_eval.include_path=tasks/   # local task YAMLs

Prints lm-eval's standard table and writes it as ``lm_eval.md``, with the results as ``lm_eval.json``,
into ``run_dir``. ``lm_eval.task_id`` / ``lm_eval.features`` give task-routed adapters their routing
inputs: ids, or names looked up in the ``data`` config's tasks and feature values (the ids training used).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from molex.cli.common import CLIError, build_eval_model, check_sources, instantiate

__all__ = ["evaluate_harness"]


def _routing_ids(cfg: DictConfig, tokenizer: Any) -> tuple[int | None, dict[str, int]]:
    """``lm_eval.task_id`` and ``lm_eval.features`` as ids; names are looked up in the ``data`` config."""
    node = cfg.lm_eval
    task_id = node.task_id
    features = OmegaConf.to_container(node.features, resolve=True) if node.features is not None else {}
    if not isinstance(features, Mapping):
        raise CLIError(f"lm_eval.features={features!r} must be a mapping {{feature: value}}, e.g. {{lang: de}}")
    named = isinstance(task_id, str) or any(isinstance(v, str) for v in features.values())
    dm = instantiate(cfg.data, "data", tokenizer=tokenizer) if named else None
    if isinstance(task_id, str):
        names = list(dm.task_names)
        if task_id not in names:
            raise CLIError(f"lm_eval.task_id={task_id!r} is not a task of the data config; its tasks: {names}")
        task_id = names.index(task_id)
    ids: dict[str, int] = {}
    for name, value in features.items():
        if isinstance(value, str):
            known = dm.feature_values.get(str(name))
            if known is None or value not in known:
                raise CLIError(
                    f"lm_eval.features.{name}={value!r} is not a value of feature {name!r} in the data config "
                    f"(its feature values: {dm.feature_values}); give a value id instead"
                )
            value = known.index(value)
        ids[str(name)] = value
    return task_id, ids


def evaluate_harness(cfg: DictConfig) -> dict[str, Any]:
    """Load the model (and adapter), run ``cfg.lm_eval.tasks`` through lm-eval, write and return the results."""
    from molex.evaluation.harness import LMEvalRequestError, lm_eval_table, require_lm_eval, run_lm_eval, write_lm_eval

    node = cfg.lm_eval
    try:
        require_lm_eval()
    except ImportError as err:
        raise CLIError(str(err)) from None
    tasks = OmegaConf.to_container(node.tasks, resolve=True) if OmegaConf.is_list(node.tasks) else node.tasks
    if isinstance(tasks, str):  # lm_eval.tasks=arc_easy
        tasks = [tasks]
    check_sources(cfg.model, cfg.data)
    model, tokenizer = build_eval_model(cfg.model, cfg.adapter)
    task_id, features = _routing_ids(cfg, tokenizer)
    try:
        results = run_lm_eval(
            model,
            tokenizer,
            tasks,
            num_fewshot=node.num_fewshot,
            limit=node.limit,
            include_path=node.include_path,
            batch_size=node.batch_size,
            max_length=node.max_length,
            task_id=task_id,
            features=features,
            seed=cfg.seed,
        )
    except LMEvalRequestError as err:
        raise CLIError(f"lm_eval: {err}") from None
    results["molex"] = {"adapter": cfg.adapter, "task_id": task_id, "features": features}
    json_path, table_path = write_lm_eval(results, Path(cfg.run_dir))
    print(lm_eval_table(results))
    print(f"results: {json_path} (table: {table_path})")
    return results
