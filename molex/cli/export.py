"""``molex-export``: a trained molex adapter as plain PEFT adapters or a plain ``transformers`` model.

    molex-export adapter=run/adapter mode=routes out=exported/        # dlp / milora / fixed / mtl: exact
    molex-export adapter=run/adapter mode=single out=single/ rank=16  # any router: one approximating LoRA
    molex-export adapter=run/adapter mode=merged out=merged/ task=add # one route merged into the base weights

``routes`` decides the routes from prompts (``prompts=file``, one per line), explicit per-expert weights
(``weights=[...]``), the ``fixed`` router's mixture, or else the data's tasks (one set of routes per task,
from ``per_task`` validation examples). ``single`` averages the routing over ``calibration_batches``
validation batches and truncates to ``rank``. The model and data come from the ``model`` and ``data``
config groups shared with ``molex-train`` and ``molex-eval``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from molex.cli.common import CLIError, build_datamodule, build_model, check_sources, report_errors

__all__ = ["MODES", "export", "main"]

MODES = ("routes", "single", "merged")


def _positive(cfg: DictConfig, key: str, *, optional: bool = False) -> int | None:
    value = cfg.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CLIError(f"{key}={value}: give a positive integer" + (" (or null)" if optional else ""))
    return value


def _check(cfg: DictConfig) -> dict[str, Any]:
    """Every option checked before the model loads; returns the parsed ones."""
    if cfg.mode not in MODES:
        raise CLIError(f"mode={cfg.mode}: choose one of {', '.join(MODES)}")
    if cfg.adapter is None:
        raise CLIError("adapter= is required: the molex adapter folder to export (a run's adapter/)")
    if not (Path(cfg.adapter) / "adapter_config.json").is_file():
        raise CLIError(f"adapter={cfg.adapter!r} is not an adapter folder (no adapter_config.json)")
    if cfg.out is None:
        raise CLIError("out= is required: the folder to write the export to")
    parsed: dict[str, Any] = {"batch_size": _positive(cfg, "batch_size"), "per_task": _positive(cfg, "per_task")}
    if cfg.mode == "single":
        parsed["rank"] = _positive(cfg, "rank")
        parsed["calibration_batches"] = _positive(cfg, "calibration_batches", optional=True)
        for key in ("prompts", "weights", "task"):
            if cfg.get(key) is not None:
                raise CLIError(f"{key}= is an option of mode=routes / mode=merged; mode=single calibrates on the data")
        return parsed
    given = [key for key in ("prompts", "weights", "task") if cfg.get(key) is not None]
    if len(given) > 1:
        raise CLIError(f"give one of {' / '.join(given)}, not several: each decides the routes on its own")
    if cfg.task is not None and cfg.mode != "merged":
        raise CLIError("task= picks the one route of mode=merged; mode=routes exports every task's routes")
    if cfg.prompts is not None:
        path = Path(str(cfg.prompts))
        if not path.is_file():
            raise CLIError(f"prompts={str(cfg.prompts)!r}: no such file (give a text file, one prompt per line)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            where = f"{err.reason} at byte {err.start}"
            raise CLIError(f"prompts={str(cfg.prompts)!r} is not UTF-8 text ({where})") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise CLIError(f"prompts={str(cfg.prompts)!r} holds no prompt")
        parsed["prompts"] = {path.stem: lines}
    if cfg.weights is not None:
        weights = OmegaConf.to_container(cfg.weights) if isinstance(cfg.weights, ListConfig) else cfg.weights
        if not isinstance(weights, list) or not all(isinstance(w, (int, float)) for w in weights):
            raise CLIError(f"weights={cfg.weights}: give one number per expert, e.g. weights=[0.5,0.5,0]")
        parsed["weights"] = {"weights": [float(w) for w in weights]}
    return parsed


def _task_routes(cfg: DictConfig, tokenizer: Any, per_task: int, only: str | None) -> dict[str, Any]:
    """``{task: RoutePrompts}`` from the first ``per_task`` validation examples of each task."""
    from molex.data.templates import encode_prompt, format_prompt, resolve_template
    from molex.export import RoutePrompts

    dm = build_datamodule(cfg.data, tokenizer, "fit")
    if only is not None and only not in dm.task_names:
        raise CLIError(f"task={only}: not a task of the data; its tasks are {', '.join(dm.task_names)}")
    template = resolve_template(tokenizer, dm.template)
    examples: dict[str, list[dict[str, Any]]] = {}
    for example in dm.examples("validation"):
        task = str(example.get("task") or "default")
        if (only is None or task == only) and len(examples.setdefault(task, [])) < per_task:
            examples[task].append(example)
    if not examples:
        raise CLIError("data: the validation split holds no examples to decide routes from")
    index = {name: i for i, name in enumerate(dm.task_names)}
    return {
        task: RoutePrompts(
            texts=[format_prompt(tokenizer, ex, template, dm.system_prompt) for ex in rows],
            token_ids=[encode_prompt(tokenizer, ex, template, dm.system_prompt) for ex in rows],
            task_ids=[index.get(task, 0)] * len(rows),
        )
        for task, rows in examples.items()
    }


def _routes(cfg: DictConfig, model: Any, tokenizer: Any, parsed: dict[str, Any]) -> Any:
    """The routes spec of mode=routes / mode=merged (``None``: the fixed router's mixture)."""
    from molex.export.capture import layer_router
    from molex.layer.inject import mole_layers

    if "prompts" in parsed:
        return parsed["prompts"]
    if "weights" in parsed:
        return parsed["weights"]
    routers = {layer_router(layer).name for layer in mole_layers(model).values()}
    if routers == {"fixed"} and cfg.task is None:
        return None
    return _task_routes(cfg, tokenizer, parsed["per_task"], cfg.task)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Check the options, load the model with its adapter, write the export; returns a summary."""
    import molex
    from molex.export import save_merged

    parsed = _check(cfg)
    check_sources(cfg.model, cfg.data)
    model, tokenizer = build_model(cfg.model)
    try:
        model = molex.load_adapter(model, cfg.adapter)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(f"adapter={cfg.adapter}: {err}") from None
    out = Path(str(cfg.out))
    try:
        if cfg.mode == "routes":
            spec = _routes(cfg, model, tokenizer, parsed)
            result = molex.export_routes(
                model, out, spec, tokenizer=tokenizer, batch_size=parsed["batch_size"], overwrite=cfg.overwrite
            )
            summary = {"mode": "routes", "out": str(result.path), "routes": {}}
            for name, entry in result.index["routes"].items():
                ranks = entry["rank"].values()
                summary["routes"][name] = {"covers": entry["covers"], "prompts": len(entry["prompts"])}
                print(
                    f"{name}: {len(entry['prompts'])} prompt(s) of {', '.join(entry['covers'])}; "
                    f"rank {min(ranks)}-{max(ranks)} over {len(entry['rank'])} layers"
                )
        elif cfg.mode == "single":
            dm = build_datamodule(cfg.data, tokenizer, "fit")
            batches = itertools.islice(dm.val_dataloader(), parsed["calibration_batches"])
            result = molex.export_single(model, out, batches, rank=parsed["rank"], overwrite=cfg.overwrite)
            summary = {"mode": "single", "out": str(result.path), **result.report()}
            print(
                f"rank {parsed['rank']}: mean relative Frobenius error {result.mean_error:.4f} over "
                f"{len(result.errors)} layers ({result.calibration_tokens} calibration tokens)"
            )
        else:
            spec = _routes(cfg, model, tokenizer, parsed)
            if isinstance(spec, dict) and len(spec) == 1:
                spec = next(iter(spec.values()))
            elif isinstance(spec, dict):
                raise CLIError(f"mode=merged merges one route; the data has {len(spec)} tasks: pick one with task=")
            merged = molex.merge_route(model, spec, tokenizer=tokenizer)
            route = cfg.task or (str(cfg.prompts) if cfg.prompts is not None else None)
            route = route or ("weights" if cfg.weights is not None else "fixed")
            info = {"adapter": str(cfg.adapter), "route": route}
            path = save_merged(merged, out, tokenizer=tokenizer, info=info, overwrite=cfg.overwrite)
            summary = {"mode": "merged", "out": str(path)}
    except (ValueError, FileExistsError, NotADirectoryError) as err:
        if isinstance(err, CLIError):
            raise
        raise CLIError(f"mode={cfg.mode}: {err}") from None
    print(f"written: {summary['out']}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@report_errors("molex-export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
