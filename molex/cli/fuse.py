"""``molex-fuse``: fuse PEFT LoRA adapters behind a trained router and compare it with each adapter alone.

    molex-fuse adapters=path/to/hub router=gate
    molex-fuse adapters=path/to/hub router=dlp model=tiny_llama
    molex-fuse adapters=path/to/hub data.source=train.jsonl data.eval_source=test.jsonl

Every adapter is named by its folder; with the built-in data, adapter names are task names. Writes
the fused model (``fused/``, :func:`molex.save_adapter` format) and ``results.json`` to ``output_dir``
and prints a Markdown table (:func:`molex.evaluation.generation.format_table`): each adapter alone on its own task vs
the fused model, then the routing accuracy. The model and the router (with its options) come from the
``model`` and ``router`` config groups shared with ``molex-train``; data files are read by
:mod:`molex.data.readers`, like ``molex-train``'s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from molex.cli.common import (
    CLIError,
    build_model,
    check_generation,
    check_router_choice,
    check_sources,
    instantiate,
    report_errors,
    write_json,
)
from molex.cli.plugins import store_registered_routers
from molex.hub.peft_format import PEFT_CONFIG_NAME

__all__ = ["fuse", "main", "resolve_adapters"]


def resolve_adapters(spec: Any) -> dict[str, Path]:
    """``{name: folder}`` from a folder of adapter folders, one adapter folder, a list or a mapping.

    Raises :class:`~molex.cli.common.CLIError` (a ``ValueError``) naming the problem.
    """
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, Mapping):
        adapters = {str(name): Path(path) for name, path in spec.items()}
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        adapters = {}
        for path in map(Path, spec):
            if path.name in adapters:
                raise CLIError(f"two adapters are named {path.name!r}; pass adapters as {{name: folder}} instead")
            adapters[path.name] = path
    else:
        root = Path(str(spec))
        if not root.is_dir():
            raise CLIError(f"adapters={str(spec)!r} is not a folder")
        if (root / PEFT_CONFIG_NAME).is_file():
            adapters = {root.name: root}
        else:
            adapters = {p.name: p for p in sorted(root.iterdir()) if (p / PEFT_CONFIG_NAME).is_file()}
            if not adapters:
                raise CLIError(f"no PEFT adapter (a folder with {PEFT_CONFIG_NAME}) in {root}")
    if not adapters:
        raise CLIError("adapters is empty")
    return adapters


def _read_rows(source: str, names: list[str]) -> list[dict[str, Any]]:
    """The examples of one data file, read by :mod:`molex.data.readers`; every row's task must name an adapter."""
    from molex.data.readers import DEFAULT_TASK, read_source

    try:
        splits = read_source(source)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(f"data: {err}") from None
    if len(splits) != 1:
        raise CLIError(f"data: {source!r} holds several splits {sorted(splits)}; give one file per option")
    rows = next(iter(splits.values())).to_list()
    unknown = sorted({row["task"] for row in rows} - set(names))
    if unknown:
        untagged = f" ('{DEFAULT_TASK}' is the task of rows without one)" if DEFAULT_TASK in unknown else ""
        raise CLIError(
            f"data: {source!r} has tasks {unknown} that name no adapter of {names}{untagged}; every row needs a "
            "'task' naming the adapter that should answer it"
        )
    return rows


def _examples(cfg: DictConfig, names: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(router training examples, test examples)``, each labelled by the adapter that should answer it."""
    data = cfg.data
    if data.source == "builtin":
        from molex.data import TASKS, make_builtin_dataset

        unknown = sorted(set(names) - set(TASKS))
        if unknown:
            raise CLIError(
                f"adapters {unknown} are not built-in tasks {TASKS}; name adapter folders after tasks or give "
                "data.source=<data file> with a 'task' field naming the adapter"
            )
        train = make_builtin_dataset("train", data.num_per_task, cfg.seed + 1, tasks=names)
        test = make_builtin_dataset("test", data.eval_per_task, cfg.seed, tasks=names)
        return train, test
    if data.eval_source is None:
        raise CLIError("data.source is a file: also give data.eval_source=<test data file>")
    return _read_rows(str(data.source), names), _read_rows(str(data.eval_source), names)


def _result(per_task: Mapping[str, float], counts: Mapping[str, int]) -> dict[str, Any]:
    """``per_task`` accuracies shaped like :func:`molex.evaluation.generation.evaluate_generation`'s result."""
    total = sum(counts[task] for task in per_task)
    overall = sum(per_task[task] * counts[task] for task in per_task) / total if total else None
    return {"per_task": dict(per_task), "counts": dict(counts), "accuracy": overall, "num_examples": total}


def fuse(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole command for a composed config; returns the results written to ``results.json``.

    Raises :class:`~molex.cli.common.CLIError` for bad adapters, model, data or router options.
    """
    import torch

    import molex
    from molex.evaluation.generation import format_table
    from molex.evaluation.hub import evaluate_fused, evaluate_single_adapters, fit_router

    torch.manual_seed(cfg.seed)
    adapters = resolve_adapters(cfg.adapters)
    names = list(adapters)
    check_sources(cfg.model, cfg.data)
    check_generation(cfg.eval, "eval.")
    check_router_choice(cfg)
    # an unknown router or option fails now, not after the adapters alone have been evaluated
    instantiate(cfg.router, f"router={cfg.router.name}")
    train, test = _examples(cfg, names)
    try:
        molex.hub.load_adapters(adapters)  # read and check every adapter before loading the model
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(f"adapters: {err}") from None
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(cfg.model)
    options = OmegaConf.to_container(cfg.router.options, resolve=True) or {}
    eval_options = {
        "template": cfg.data.template,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "batch_size": cfg.eval.batch_size,
    }
    singles = {}
    if cfg.eval.enabled:
        singles = evaluate_single_adapters(model, tokenizer, adapters, test, **eval_options)
    general = resolve_adapters(cfg.general_adapters) if cfg.get("general_adapters") else None
    try:
        fused = molex.fuse_adapters(model, adapters, router=cfg.router.name, general_adapters=general, **options)
    except (ValueError, TypeError, KeyError) as err:  # unknown router, bad option, top_k above the adapters
        raise CLIError(f"router={cfg.router.name}, router.options={options}: {err}") from None
    trains = bool(molex.trainable_parameters(fused)) or cfg.router.name == "dlp"
    history = (
        [float("nan")]
        if not trains
        else fit_router(
            fused,
            tokenizer,
            train,
            template=cfg.data.template,
            steps=cfg.train.steps,
            lr=cfg.train.lr,
            task_loss_coef=cfg.train.task_loss_coef,
            dlp_epochs=cfg.train.dlp_epochs,
            batch_size=cfg.train.batch_size,
            seed=cfg.seed,
        )
    )
    molex.save_adapter(fused, out / "fused")
    mask = list(cfg.get("mask") or [])
    if mask:
        try:
            molex.mask_experts(fused, mask)
        except (ValueError, TypeError) as err:
            raise CLIError(f"mask={mask}: {err}") from None
    evaluation = evaluate_fused(fused, tokenizer, test, generation=cfg.eval.enabled, **eval_options)
    results = {
        "adapters": {name: str(path) for name, path in adapters.items()},
        "router": cfg.router.name,
        "mask": mask,
        "router_loss": [history[0], history[-1]],
        "single": singles,
        "fused": evaluation,
    }
    write_json(out / "results.json", results)
    if cfg.eval.enabled:
        counts = Counter(example["task"] for example in test)
        print(
            format_table(
                _result(singles, counts),
                _result(evaluation["per_task"], counts),
                tasks=names,
                labels=("adapter alone", f"fused ({cfg.router.name})"),
                markdown=True,
            )
        )
    print(f"routing accuracy ({cfg.router.name}): {evaluation['routing_accuracy']:.3f}")
    print(f"fused model written to {out / 'fused'}")
    return results


store_registered_routers()  # routers without a conf file (plug-ins) join the router= group


@hydra.main(config_path="../conf", config_name="fuse", version_base="1.3")
@report_errors("molex-fuse")
def main(cfg: DictConfig) -> None:
    fuse(cfg)


if __name__ == "__main__":
    main()
