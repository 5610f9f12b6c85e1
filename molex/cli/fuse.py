"""``molex-fuse``: fuse PEFT LoRA adapters behind a trained router and compare it with each adapter alone.

    molex-fuse adapters=path/to/hub router.name=gate
    molex-fuse adapters=path/to/hub router.name=dlp model.name_or_path=tiny-llama

Every adapter is named by its folder; with the built-in data, adapter names are task names. Writes
the fused model (``fused/``, :func:`molex.save_adapter` format) and ``results.json`` to ``output_dir``
and prints a table: each adapter on its own task vs the fused model, and routing accuracy.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from molex.hub.peft_format import PEFT_CONFIG_NAME

__all__ = ["resolve_adapters", "fuse", "format_table", "main"]


def resolve_adapters(spec: Any) -> dict[str, Path]:
    """``{name: folder}`` from a folder of adapter folders, one adapter folder, a list or a mapping."""
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, Mapping):
        adapters = {str(name): Path(path) for name, path in spec.items()}
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        adapters = {}
        for path in map(Path, spec):
            if path.name in adapters:
                raise ValueError(f"two adapters are named {path.name!r}; pass adapters as {{name: folder}} instead")
            adapters[path.name] = path
    else:
        root = Path(str(spec))
        if not root.is_dir():
            raise ValueError(f"adapters={str(spec)!r} is not a folder")
        if (root / PEFT_CONFIG_NAME).is_file():
            adapters = {root.name: root}
        else:
            adapters = {p.name: p for p in sorted(root.iterdir()) if (p / PEFT_CONFIG_NAME).is_file()}
            if not adapters:
                raise ValueError(f"no PEFT adapter (a folder with {PEFT_CONFIG_NAME}) in {root}")
    if not adapters:
        raise ValueError("adapters is empty")
    return adapters


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"data file {path!r} does not exist")
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    missing = [i for i, row in enumerate(rows) if "task" not in row or "output" not in row]
    if missing:
        raise ValueError(f"{path}: rows {missing[:5]} lack 'task' or 'output' (every row names its adapter)")
    return rows


def _examples(cfg: DictConfig, names: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    data = cfg.data
    if data.source == "builtin":
        from molex.data import TASKS, make_builtin_dataset

        unknown = sorted(set(names) - set(TASKS))
        if unknown:
            raise ValueError(
                f"adapters {unknown} are not built-in tasks {TASKS}; name adapter folders after tasks or give "
                "data.source=<file.jsonl> with a 'task' field naming the adapter"
            )
        train = make_builtin_dataset("train", data.num_per_task, cfg.seed + 1, tasks=names)
        test = make_builtin_dataset("test", data.eval_per_task, cfg.seed, tasks=names)
        return train, test
    if data.eval_source is None:
        raise ValueError("data.source is a file: also give data.eval_source=<test file.jsonl>")
    return _read_jsonl(data.source), _read_jsonl(data.eval_source)


def format_table(singles: Mapping[str, float], fused: Mapping[str, Any], router: str) -> str:
    lines = [f"| task | adapter alone | fused ({router}) | difference |", "|---|---:|---:|---:|"]
    for task, alone in singles.items():
        together = fused["per_task"].get(task, 0.0)
        lines.append(f"| {task} | {alone:.3f} | {together:.3f} | {together - alone:+.3f} |")
    lines.append(f"| routing accuracy | | {fused['routing_accuracy']:.3f} | |")
    return "\n".join(lines)


def fuse(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole command for a composed config; returns the results written to ``results.json``."""
    import torch

    import molex
    from molex.files import atomic_write
    from molex.hub.evaluate import evaluate_fused, evaluate_single_adapters, fit_router
    from molex.models import load_model

    torch.manual_seed(cfg.seed)
    adapters = resolve_adapters(cfg.adapters)
    names = list(adapters)
    train, test = _examples(cfg, names)
    molex.hub.load_adapters(adapters)  # read and check every adapter before loading the model
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(cfg.model.name_or_path, dtype=cfg.model.dtype)
    options = OmegaConf.to_container(cfg.router.options, resolve=True) or {}
    eval_options = {
        "template": cfg.data.template,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "batch_size": cfg.eval.batch_size,
    }
    singles = {}
    if cfg.eval.enabled:
        singles = evaluate_single_adapters(model, tokenizer, adapters, test, **eval_options)
    fused = molex.fuse_adapters(model, adapters, router=cfg.router.name, **options)
    history = fit_router(
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
    evaluation = evaluate_fused(fused, tokenizer, test, generation=cfg.eval.enabled, **eval_options)
    molex.save_adapter(fused, out / "fused")
    results = {
        "adapters": {name: str(path) for name, path in adapters.items()},
        "router": cfg.router.name,
        "router_loss": [history[0], history[-1]],
        "single": singles,
        "fused": evaluation,
    }
    text = json.dumps(results, indent=2)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    if cfg.eval.enabled:
        print(format_table(singles, evaluation, cfg.router.name))
    else:
        print(f"routing accuracy ({cfg.router.name}): {evaluation['routing_accuracy']:.3f}")
    print(f"fused model written to {out / 'fused'}")
    return results


@hydra.main(config_path="../conf", config_name="fuse", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        fuse(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"molex-fuse: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
