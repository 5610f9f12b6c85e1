"""Does a mixture of LoRA experts beat one LoRA? Variants at matched budgets, several seeds, any data.

    python -m benchmarks.study                       # default variants (one LoRA x2, the default mixture), 3 seeds
    python -m benchmarks.study --quick               # tiny random model, 1 seed, 2 variants: a wiring check
    python -m benchmarks.study --data my_tasks/ --variants lora_r16 mola_increasing --seeds 5
    python -m benchmarks.study --data conflicting    # the built-in set of 16 conflicting tasks
    python -m benchmarks.study --set optim.lr=1e-3   # any molex-train override, applied to every run
    python -m benchmarks.study --jobs 1              # one run at a time (default: 2 at once on 2+ cores)

Each run is one ``molex-train`` process (``python -m molex.cli.train`` with overrides: molex's own
training loop, evaluation and adapter format); the study then loads the run's adapter and measures the
validation LM loss, the active rank and the routing health itself (``benchmarks/study_measure.py``).
Results go to ``--out``: ``runs/<variant>/seed<k>/`` (molex-train's run folder plus ``result.json``),
``study.json`` (every run's numbers and configuration, per-layer routing left in the runs' own
``result.json``), ``study.md`` (tables) and ``study.png``. Variants named ``*_tuned`` first choose their
learning rate on validation data (``benchmarks/study_tuning.py``). Training is pinned to ``32-true``
(``--train-precision``) so that a table reproduces on a machine with other bf16 support.
A run whose ``result.json`` exists with the same overrides is not trained again, so an interrupted
study resumes where it stopped; the report is rebuilt from all results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

import molex
from benchmarks import study_measure as measure
from benchmarks.machine import machine_record
from benchmarks.study_report import aggregate, compact_run, markdown, plot
from benchmarks.study_runs import run_all, train_run
from benchmarks.study_tuning import chosen_run_dir, tune_variants
from benchmarks.study_variants import (
    DEFAULT_VARIANTS,
    MATCH_TARGET,
    QUICK_VARIANTS,
    REFERENCE,
    VARIANTS,
    variant_overrides,
)
from molex.data.builtin import SHIPPED_SETS
from molex.evaluation.generation import PRECISIONS

#: defaults of the full study (see benchmarks/RESULTS.md for how they were sized to the time budget)
STEPS = 60
SEEDS = 3
TEST_PER_TASK = 40
#: --quick: a tiny random model, small data, few steps
QUICK = {"steps": 6, "seeds": 1, "test_per_task": 4}
# the tiny model's byte-level tokenizer makes long sequences: 160 tokens keep every built-in example whole
QUICK_OVERRIDES = ["data.max_length=160", "eval.max_new_tokens=8"]
#: --quick on built-in data also makes the training split small (a data file keeps its own size)
QUICK_BUILTIN_OVERRIDES = ["data.num_per_task=16"]
#: the reference of the paired differences: the tuned LoRA when the study runs it
TUNED_REFERENCE = "lora_r16_tuned"
MODEL_GROUPS = {"smollm2-135m": "smollm2_135m", "tiny-llama": "tiny_llama"}
TUNING = (
    "molex's defaults, changed only where the variant says so; *_tuned variants chose optim.lr on the validation "
    "LM loss of seed 0 (see 'lr_tuning'); earlier defaults chosen with this study: optim.router_lr_scale=10 over 1"
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 seed, few steps, 2 variants")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per variant (default {SEEDS}; quick 1)")
    parser.add_argument(
        "--data", default=None, help=f"a built-in set ({', '.join(SHIPPED_SETS)}; default multitask), a data file "
        "or a folder of train/validation/test files",
    )  # fmt: skip
    parser.add_argument(
        "--train-precision", default="32-true", help="trainer.precision of every run (default 32-true, so the "
        "numbers do not depend on the machine's bf16 support; auto: molex-train's choice)",
    )  # fmt: skip
    parser.add_argument("--model", default=None, help="smollm2-135m, tiny-llama, a local path or a hub name")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/study)")
    parser.add_argument(
        "--variants", nargs="+", default=None, help=f"'all' or any of: {' '.join(VARIANTS)} (default: "
        f"{' '.join(DEFAULT_VARIANTS)})",
    )  # fmt: skip
    parser.add_argument(
        "--peft-check", action="store_true", help="also run the first one-LoRA adapter through PEFT and compare "
        "logits and exact match (costs two evaluations of the test split)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {STEPS})")
    parser.add_argument(
        "--test-per-task", type=int, default=None, help=f"built-in data: test examples per task "
        f"(default {TEST_PER_TASK}; every built-in task has at least 40)",
    )  # fmt: skip
    parser.add_argument(
        "--val-per-task", type=int, default=None, help="built-in data: validation examples per task "
        "(default: as --test-per-task)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="float32", help="evaluation forwards (generation, routing, "
        "loss): float32, or bf16 autocast, faster on accelerators and CPUs with bfloat16 units (several times "
        "slower on AVX2-only CPUs); training is unchanged",
    )  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra molex-train override")
    parser.add_argument("--run-timeout", type=float, default=3600.0, help="seconds one training run may take")
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="training runs at once, each with "
        "cpu_count / jobs threads (default: 2 on a machine with 2 or more cores)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {"steps": STEPS, "seeds": SEEDS, "test_per_task": TEST_PER_TASK}
    args.seeds = quick["seeds"] if args.seeds is None else args.seeds
    args.steps = quick["steps"] if args.steps is None else args.steps
    args.test_per_task = quick["test_per_task"] if args.test_per_task is None else args.test_per_task
    args.val_per_task = args.test_per_task if args.val_per_task is None else args.val_per_task
    args.variants = args.variants or list(QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS)
    if args.variants == ["all"]:
        args.variants = list(VARIANTS)
    args.model = args.model or ("tiny-llama" if args.quick else "smollm2-135m")
    args.out = args.out or Path("benchmarks/results") / ("study-quick" if args.quick else "study")
    for name, value in (
        ("--seeds", args.seeds), ("--steps", args.steps),
        ("--test-per-task", args.test_per_task), ("--val-per-task", args.val_per_task), ("--jobs", args.jobs),
    ):  # fmt: skip
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {' '.join(VARIANTS)}")
    bad = [s for s in args.set if "=" not in s]
    if bad:
        parser.error(f"--set takes KEY=VALUE (a molex-train override), got {bad}")
    args.builtin_set = None
    if args.data in SHIPPED_SETS and not Path(args.data).exists():
        args.builtin_set, args.data = args.data, None
    if args.data is not None and not Path(args.data).exists():
        parser.error(
            f"--data {args.data!r}: no such file or folder, and not a built-in set ({', '.join(SHIPPED_SETS)})"
        )
    return args


def common_overrides(args: argparse.Namespace) -> list[str]:
    """Overrides every run shares: model, data, steps; one validation over the whole validation split at
    the last step (its ``val/lm_loss`` is the study's loss), no before-training evaluation, no routing plots."""
    group = MODEL_GROUPS.get(args.model)
    out = [f"model={group}"] if group else ["model=hf", f"model.name_or_path={args.model}"]
    if args.data is None:
        out += [f"data.val_per_task={args.val_per_task}", f"data.test_per_task={args.test_per_task}"]
        out += [f"data.builtin_set={args.builtin_set}"] if args.builtin_set else []
        out += QUICK_BUILTIN_OVERRIDES if args.quick else []
    else:
        out += ["data=jsonl", f"data.source={Path(args.data).resolve()}"]
    out += [
        f"trainer.precision={args.train_precision}",
        f"trainer.max_steps={args.steps}",
        "trainer.limit_val_batches=1.0",
        f"trainer.val_check_interval={args.steps}",
        "++trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "eval.before=false",
        "analysis.enabled=false",
        f"eval.precision={args.precision}",
    ]
    if args.quick:
        out += QUICK_OVERRIDES
    return out + list(args.set)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


class Study:
    """Holds the base model and the data modules across runs; runs, measures and reports."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.common = common_overrides(args)
        cfg = measure.compose_config(self.common)
        self.base, self.tokenizer = measure.load_base(cfg)
        self.eval_kwargs = {
            "max_new_tokens": cfg.eval.max_new_tokens,
            "batch_size": cfg.eval.batch_size,
            "precision": cfg.eval.precision,
        }
        self._data: dict[int, Any] = {}
        # runs train in parallel processes; measuring uses this process's one base model, one run at a time
        self._measuring = threading.Lock()
        self.threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        self.tasks = list(self.datamodule(0).task_names)
        self.lr_tuning: dict[str, dict[str, Any]] = {}  # the tuned variants' choices (tune() fills it)
        self.matched_rank = self.matched_params = None
        if "lora_matched" in args.variants:
            target = measure.mole_config_of(measure.compose_config(self.common + variant_overrides(MATCH_TARGET)))
            lora = measure.mole_config_of(measure.compose_config(self.common + variant_overrides(REFERENCE)))
            self.matched_rank, self.matched_params = measure.matched_rank(self.base, target, lora)
        for name in args.variants:  # every configuration must compose and validate before anything trains
            measure.mole_config_of(measure.compose_config(self.overrides(name, 0)))

    def datamodule(self, seed: int) -> Any:
        if seed not in self._data:
            self._data[seed] = measure.make_datamodule(
                measure.compose_config([*self.common, f"seed={seed}"]), self.tokenizer
            )
        return self._data[seed]

    def overrides(self, variant: str, seed: int) -> list[str]:
        filled = variant_overrides(variant, matched_rank=self.matched_rank, num_tasks=len(self.tasks))
        chosen = self.lr_tuning.get(variant)
        tuned = [f"{chosen['key']}={chosen['chosen']:g}"] if chosen else []
        return [*self.common, *filled, *tuned, f"seed={seed}"]

    def tune(self) -> None:
        """Choose the tuned variants' values on seed 0's validation loss (``benchmarks/study_tuning.py``)."""
        self.lr_tuning = tune_variants(
            self.args.variants,
            lambda variant: self.overrides(variant, 0),
            out=self.args.out,
            jobs=self.args.jobs,
            timeout=self.args.run_timeout,
            threads=self.threads,
        )

    def run(self, variant: str, seed: int) -> dict[str, Any]:
        run_dir = self.args.out / "runs" / variant / f"seed{seed}"
        overrides = self.overrides(variant, seed)
        done = _read_json(run_dir / "result.json")
        if done is not None:
            if done["overrides"] != overrides:
                raise SystemExit(
                    f"{run_dir} holds a result made with other settings ({done['overrides']}); "
                    "use another --out or delete that folder"
                )
            return done
        start = time.perf_counter()
        trained = self._tuning_run_of(variant, seed)
        if trained is not None:  # seed 0 of a tuned variant: its tuning run, scored on the test split here
            with self._measuring:
                metrics = json.loads((trained / "metrics.json").read_text(encoding="utf-8"))
                metrics["after"] = self._test_scores(overrides, seed, trained / "adapter")
                return self._measure(variant, seed, overrides, metrics, run_dir, start, trained=trained)
        metrics = train_run(overrides, run_dir, self.args.run_timeout, threads=self.threads)
        with self._measuring:
            return self._measure(variant, seed, overrides, metrics, run_dir, start)

    def _tuning_run_of(self, variant: str, seed: int) -> Path | None:
        """The chosen tuning run's folder when it trained exactly this (variant, seed), else None."""
        choice = self.lr_tuning.get(variant)
        if choice is None or seed != 0:
            return None
        trained = chosen_run_dir(self.args.out, variant, choice)
        return trained if (trained / "adapter").is_dir() and (trained / "metrics.json").is_file() else None

    def _test_scores(self, overrides: list[str], seed: int, adapter: Path) -> dict[str, Any]:
        """Exact match on the test split, as ``molex-train`` scores it at the end of a run."""
        from molex.cli.run_outputs import evaluate

        model = molex.load_adapter(self.base, adapter).eval()
        try:
            return evaluate(model, self.tokenizer, self.datamodule(seed), measure.compose_config(overrides))
        finally:
            molex.unload(model)

    def _measure(
        self,
        variant: str,
        seed: int,
        overrides: list[str],
        metrics: dict[str, Any],
        run_dir: Path,
        start: float,
        *,
        trained: Path | None = None,
    ) -> dict[str, Any]:
        """``trained``: the folder the run trained in, when it is not ``run_dir`` (a tuning run)."""
        dm = self.datamodule(seed)
        adapter = (trained or run_dir) / "adapter"
        result = {
            "variant": variant,
            "description": VARIANTS[variant].description,
            "seed": seed,
            "overrides": overrides,
            "accuracy": metrics["after"]["accuracy"],
            "per_task": metrics["after"]["per_task"],
            "counts": metrics["after"]["counts"],
            "train": metrics["train"],
            "train_seconds": metrics["train"]["seconds"],
            **measure.measure_run(self.base, dm, adapter, logged=metrics["train"], precision=self.args.precision),
        }
        if trained is not None:
            result["trained_in"] = str(trained.relative_to(self.args.out))
        result["seconds"] = round(time.perf_counter() - start, 1)
        _write_json(run_dir / "result.json", result)
        return result

    def base_reference(self) -> dict[str, Any]:
        """The untrained model on the first seed's data: how much headroom the tasks leave."""
        path = self.args.out / "base.json"
        done = _read_json(path)
        if done is not None and done["overrides"] == self.common:
            return done
        from molex.evaluation.generation import evaluate_generation, evaluate_loss

        start = time.perf_counter()
        dm = self.datamodule(0)
        ev = evaluate_generation(self.base, self.tokenizer, dm.test_examples(), task_names=None, **self.eval_kwargs)
        result = {
            "overrides": self.common,
            "accuracy": ev["accuracy"],
            "per_task": ev["per_task"],
            "val_lm_loss": round(evaluate_loss(self.base, dm.val_dataloader(), precision=self.args.precision), 5),
        }
        result["seconds"] = round(time.perf_counter() - start, 1)
        _write_json(path, result)
        return result

    def peft_check(self, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Once per study: the first one-expert run, run again by PEFT from the same weights."""
        from benchmarks.study_peft import peft_equivalence

        lora = [r for r in runs if not VARIANTS[r["variant"]].mixture]
        if not lora:
            return None
        path = self.args.out / "peft_check.json"
        run = lora[0]
        done = _read_json(path)
        if done is not None and done.get("run") == [run["variant"], run["seed"]]:
            return done
        trained_in = run.get("trained_in") or f"runs/{run['variant']}/seed{run['seed']}"
        adapter = self.args.out / trained_in / "adapter"
        check = peft_equivalence(
            self.base, self.tokenizer, self.datamodule(run["seed"]), adapter, eval_kwargs=self.eval_kwargs
        )
        check["run"] = [run["variant"], run["seed"]]
        _write_json(path, check)
        return check


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    if args.jobs > 1:  # measuring shares the cores with the runs still training
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    study = Study(args)
    base = study.base_reference()
    print(
        f"base model: exact match {100 * base['accuracy']:.1f}%, validation LM loss {base['val_lm_loss']:.3f} "
        f"({base['seconds']:.0f} s)",
        flush=True,
    )
    study.tune()
    # seed-major: an interrupted study still has every variant on the first seeds
    order = [(variant, seed) for seed in range(args.seeds) for variant in args.variants]
    runs = run_all(study.run, order, jobs=args.jobs)
    peft = study.peft_check(runs) if args.peft_check else None
    reference = TUNED_REFERENCE if TUNED_REFERENCE in args.variants else REFERENCE
    report = {
        "command": "python -m benchmarks.study " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "data": args.data or f"builtin ({args.builtin_set or 'multitask'})",
        "steps": args.steps,
        "seeds": list(range(args.seeds)),
        "variants": args.variants,
        "reference": reference,
        "tasks": study.tasks,
        # exact match is scored on every test example (molex-train's evaluation), as counted there
        "test_counts": {t: runs[0]["counts"].get(t, 0) for t in study.tasks},
        "matched_rank": study.matched_rank,
        "matched_params": study.matched_params,
        "tuning": TUNING + ("; extra overrides: " + " ".join(args.set) if args.set else ""),
        "lr_tuning": study.lr_tuning,
        "environment": machine_record(threads=study.threads, precision=args.train_precision),
        "common_overrides": study.common,
        "base": base,
        "peft_check": peft,
        "aggregate": aggregate(runs, reference=reference, tasks=study.tasks),
        "runs": [compact_run(r) for r in runs],
        "run_minutes": round(sum(r["seconds"] for r in runs) / 60, 2),
        "jobs": args.jobs,
    }
    report["wall_minutes"] = round((time.perf_counter() - start) / 60, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_json(args.out / "study.json", report)
    (args.out / "study.md").write_text(markdown(report), encoding="utf-8")
    plot(report, args.out / "study.png")
    print(markdown(report))
    print(f"written: {args.out / 'study.json'}, {args.out / 'study.md'}, {args.out / 'study.png'}")
    return report


if __name__ == "__main__":
    main()
