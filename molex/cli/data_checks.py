"""The data's task and feature ids against the router that reads them, checked before anything runs.

Routers that take ids from the batch (``features``: one expert per feature value; ``mtl``: one transform
per task; ``gate`` / ``dlp`` with a task loss: one expert per task) are sized by their options, while
the ids come from the data. A mismatch only shows at the first forward pass, deep in the router, after
the model has loaded and possibly been evaluated; :func:`check_routing_data` compares the two as soon
as the data module is set up and names the option to change.
"""

from __future__ import annotations

from typing import Any

from molex.cli.errors import CLIError

__all__ = ["check_routing_data"]


def _ids(count: int) -> str:
    return "id 0" if count == 1 else f"ids 0-{count - 1}"


def _check_features(router: Any, dm: Any) -> None:
    """Every feature the data carries must be a router feature, with at least as many values."""
    sizes = dict(router.features or {})
    values = dm.feature_values
    unknown = [name for name in values if name not in sizes]
    if unknown:
        raise CLIError(
            f"data.columns.features holds {unknown}, which router.options.features={sizes} does not name: add "
            + ", ".join(f"router.options.features.{name}={len(values[name])}" for name in unknown)
        )
    for name, size in sizes.items():
        if name in values:
            needed, what = len(values[name]), f"{name!r} values"
        elif name == "task":  # a feature named task falls back to the batch's task ids
            needed, what = dm.num_tasks, "tasks"
        else:
            raise CLIError(
                f"router.options.features.{name}={size} but the data has no feature {name!r}; name its column in "
                f"data.columns.features (the data's features: {list(values) or 'none'})"
            )
        if size < needed:
            raise CLIError(
                f"router.options.features.{name}={size} but the data has {needed} {what} ({_ids(needed)}): "
                f"set router.options.features.{name}={needed}"
            )


def _min_experts(model: Any) -> int | None:
    """The fewest experts of any MoLE layer of ``model`` (``None``: no MoLE layer)."""
    from molex.layer.inject import mole_layers

    counts = [layer.experts.num_experts for layer in mole_layers(model).values()]
    return min(counts) if counts else None


def check_routing_data(router_name: str, router: Any, dm: Any, model: Any = None) -> None:
    """Raise :class:`~molex.cli.common.CLIError` when the set-up data module ``dm`` holds task or feature ids
    that the router ``router`` (the config dataclass of router ``router_name``) cannot route.

    ``model`` (injected) lets the task losses of ``gate`` and ``dlp`` be checked against the layers' expert
    counts: their targets are task ids, so every layer needs an expert per task.
    """
    if router_name == "features":
        _check_features(router, dm)
    elif router_name == "mtl" and router.num_tasks < dm.num_tasks:
        raise CLIError(
            f"router.options.num_tasks={router.num_tasks} but the data has {dm.num_tasks} tasks "
            f"({_ids(dm.num_tasks)}): set router.options.num_tasks={dm.num_tasks}"
        )
    elif router_name in ("gate", "dlp") and getattr(router, "task_loss_coef", 0) > 0 and model is not None:
        fewest = _min_experts(model)
        if fewest is not None and fewest < dm.num_tasks:
            raise CLIError(
                f"router.options.task_loss_coef={router.task_loss_coef} trains each layer's router to pick the "
                f"example's task as its expert, but the data has {dm.num_tasks} tasks ({_ids(dm.num_tasks)}) and a "
                f"layer has {fewest} experts: give every layer at least {dm.num_tasks} experts "
                f"(mole.num_experts={dm.num_tasks} allocation=uniform) or set router.options.task_loss_coef=0"
            )
