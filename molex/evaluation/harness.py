"""lm-evaluation-harness on a molex model: :func:`run_lm_eval` and its standard table, :func:`lm_eval_table`.

::

    from molex.evaluation.harness import run_lm_eval, lm_eval_table
    results = run_lm_eval(model, tokenizer, ["arc_easy", "hellaswag"], num_fewshot=0, task_id=2)
    print(lm_eval_table(results))

The model (molex-injected or plain) is evaluated in memory through lm-eval's ``HFLM`` wrapper
(:class:`molex.evaluation.harness_model.MolexHFLM`, which adds the molex routing inputs each batch needs). lm-eval is
an optional extra (``pip install 'molex-lora[eval]'``) and is imported only when these functions run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from molex.core.files import atomic_write
from molex.layer.context import find_context
from molex.routers.base import Router

__all__ = ["INSTALL_HINT", "LMEvalRequestError", "lm_eval_table", "require_lm_eval", "run_lm_eval", "write_lm_eval"]

INSTALL_HINT = "pip install 'molex-lora[eval]' (or: pip install 'lm-eval>=0.4.2')"


class LMEvalRequestError(ValueError):
    """A bad argument of :func:`run_lm_eval` (a task, a count, a routing input), found before any evaluation."""


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or an ``ImportError`` saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # the wrapper molex builds on
    except ImportError as err:
        raise ImportError(f"lm-evaluation-harness is not installed ({err}); install it with {INSTALL_HINT}") from err
    return lm_eval


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_arguments(
    tasks: Sequence[str],
    num_fewshot: int | None,
    limit: float | None,
    include_path: str | Path | None,
    batch_size: int | str,
) -> list[str]:
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise LMEvalRequestError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    if num_fewshot is not None and not (_is_count(num_fewshot) and num_fewshot >= 0):
        raise LMEvalRequestError(
            f"num_fewshot must be an integer >= 0 or None (the task's default), got {num_fewshot!r}"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise LMEvalRequestError(
            f"limit must be > 0 (a count of documents, or a fraction below 1) or None, got {limit!r}"
        )
    if include_path is not None and not Path(include_path).is_dir():
        raise LMEvalRequestError(
            f"include_path={str(include_path)!r} is not a folder; point it at a folder of task YAML files"
        )
    if batch_size != "auto" and not (_is_count(batch_size) and batch_size >= 1):
        raise LMEvalRequestError(f"batch_size must be an integer >= 1 or 'auto', got {batch_size!r}")
    return list(tasks)


def _check_routing_inputs(model: nn.Module, task_id: int | None, features: Mapping[str, int]) -> None:
    """The task id and feature ids the model's routers need at evaluation, checked before any work."""
    if task_id is not None and not (_is_count(task_id) and task_id >= 0):
        raise LMEvalRequestError(f"task_id must be an integer >= 0 (the id the task had in training), got {task_id!r}")
    for name, value in features.items():
        if not (_is_count(value) and value >= 0):
            raise LMEvalRequestError(f"features[{name!r}] must be an integer value id >= 0, got {value!r}")
    if find_context(model) is None:
        if task_id is not None or features:
            raise LMEvalRequestError("task_id / features route molex experts, but this model has no molex layers")
        return
    routers = {m.name: m for m in model.modules() if isinstance(m, Router)}
    mtl = routers.get("mtl")
    if mtl is not None:
        num_tasks = mtl.config.num_tasks
        if task_id is None or task_id >= num_tasks:
            raise LMEvalRequestError(
                f"router 'mtl' mixes its experts per task and has {num_tasks} tasks: give task_id= an id in "
                f"0..{num_tasks - 1} (got {task_id!r})"
            )
    flix = routers.get("features")
    if features and flix is None:
        raise LMEvalRequestError(
            f"features={dict(features)} are read only by router 'features', which this model does not have "
            f"(its routers: {sorted(routers)}); leave features out"
        )
    if flix is not None:
        sizes = flix.config.features
        unknown = sorted(set(features) - set(sizes))
        if unknown:
            raise LMEvalRequestError(
                f"features names {unknown}, which router 'features' does not know; its: {list(sizes)}"
            )
        given = {**features, **({"task": task_id} if task_id is not None and "task" not in features else {})}
        missing = [name for name in sizes if name not in given]
        if missing:
            raise LMEvalRequestError(
                f"router 'features' routes by {list(sizes)}: give the value id of {missing} "
                "(features={name: id}; the 'task' feature also takes task_id)"
            )
        bad = {name: value for name, value in given.items() if name in sizes and value >= sizes[name]}
        if bad:
            raise LMEvalRequestError(
                f"router 'features' has {dict(sizes)} values per feature; ids {bad} are out of range"
            )


def _task_manager(manager_class: Any, tasks: Sequence[str], include_path: str | Path | None) -> Any:
    """lm-eval's task index; only the ``include_path`` folder when it defines every task (indexing
    lm-eval's own thousands of task files takes tens of seconds)."""
    if include_path is not None:
        local = manager_class(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    return manager_class(include_path=None if include_path is None else str(include_path))


def run_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | Path | None = None,
    batch_size: int | str = 8,
    max_length: int | None = None,
    task_id: int | None = None,
    features: Mapping[str, int] | None = None,
    log_samples: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model`` in memory and return lm-eval's results dict.

    Args:
        tasks: lm-eval task (or group) names, e.g. ``["arc_easy", "hellaswag"]``; tasks defined by YAML
            files under ``include_path`` count too (local data: ``dataset_path: json`` with
            ``dataset_kwargs: {data_files: ...}``).
        num_fewshot: few-shot examples per prompt (``None``: each task's default).
        limit: documents per task (a fraction of them below 1); ``None``: all.
        batch_size: sequences per forward, or ``"auto"``.
        max_length: longest input in tokens (``None``: from the model config, as lm-eval reads it).
        task_id: molex task id of every sequence (``task_ids [B]``), for routers that route or mix by task
            (``mtl``, ``features`` with a ``task`` feature); ``None`` passes none.
        features: ``{feature: value id}`` of every sequence, for the ``features`` router.
        log_samples: keep lm-eval's per-document records under ``"samples"``.
        seed: lm-eval's random, numpy, torch and few-shot seeds.

    Returns:
        lm-eval's ``simple_evaluate`` dict: ``"results"`` ({task: {metric,filter: value}}), ``"groups"``,
        ``"versions"``, ``"n-shot"``, ``"configs"``, ... (and ``"samples"`` with ``log_samples=True``).
    """
    tasks = _check_arguments(tasks, num_fewshot, limit, include_path, batch_size)
    features = dict(features or {})
    _check_routing_inputs(model, task_id, features)
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from molex.evaluation.harness_model import MolexHFLM

    manager = _task_manager(TaskManager, tasks, include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" nor in include_path={str(include_path)!r}" if include_path is not None else ""
        raise LMEvalRequestError(
            f"unknown lm-eval task(s) {unknown}: not among lm-eval's tasks{where}; "
            "list them with `lm-eval ls tasks`, or give include_path= a folder of task YAML files"
        )
    lm = MolexHFLM(model, tokenizer, task_id=task_id, features=features, batch_size=batch_size, max_length=max_length)
    was_training = model.training
    model.eval()
    try:
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    if results is None:  # simple_evaluate returns None on the non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results (a non-zero rank of a distributed run?)")
    return results


def lm_eval_table(results: Mapping[str, Any]) -> str:
    """lm-eval's standard markdown table(s) of ``results`` (``lm_eval.utils.make_table``): tasks, then groups."""
    require_lm_eval()
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_lm_eval(results: Mapping[str, Any], run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``lm_eval.json`` (the results, per-document samples left out) and ``lm_eval.md`` (the table)
    into ``run_dir``, atomically; returns both paths."""
    require_lm_eval()
    from lm_eval.utils import handle_non_serializable

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    kept = {key: value for key, value in results.items() if key != "samples"}
    text = json.dumps(kept, indent=2, default=handle_non_serializable) + "\n"
    table = lm_eval_table(results)
    paths = run_dir / "lm_eval.json", run_dir / "lm_eval.md"
    for path, content in zip(paths, (text, table), strict=True):
        atomic_write(path, lambda tmp, content=content: Path(tmp).write_text(content, encoding="utf-8"))
    return paths
