"""How the ``molex-train`` config travels through molex: which modules receive it, and how often it comes back.

Runs ``molex.cli.train.train`` on the tiny model (``experiment=smoke``, a couple of steps, no evaluation, no
analysis) under ``sys.setprofile`` and records every call into a molex function that gets the composed config,
or any ``DictConfig`` / ``ListConfig`` (a node of it, or a copy Hydra made of one), as an argument. Prints and
writes as JSON:

* ``modules``: the distinct molex modules such calls entered;
* ``returns``: in the sequence of those modules (consecutive repeats collapsed), how many entries are a module
  the config had already left;
* ``rooted_*``: the same counting only nodes of the composed config itself (not Hydra's copies).

    python -m benchmarks.trace_config --label after
    PYTHONPATH=/path/to/older/checkout python benchmarks/trace_config.py --label before   # an older molex

The molex that is imported (``PYTHONPATH``) is the one measured; its ``conf/`` is composed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
OVERRIDES = [
    "experiment=smoke",
    "data.num_per_task=8",
    "data.eval_per_task=2",
    "eval.max_new_tokens=4",
    "eval.before=false",
    "eval.after=false",
    "analysis.enabled=false",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
]


def _config_arguments(frame: Any) -> list[Any]:
    """The values of a frame's parameters (``*args`` and ``**kwargs`` spread out) at its call event."""
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount
    names = list(code.co_varnames[:count])
    flags = code.co_flags
    if flags & 0x04:  # CO_VARARGS
        names.append(code.co_varnames[count])
        count += 1
    if flags & 0x08:  # CO_VARKEYWORDS
        names.append(code.co_varnames[count])
    local = frame.f_locals
    values: list[Any] = []
    for name in names:
        value = local.get(name)
        if isinstance(value, tuple):
            values.extend(value)
        elif isinstance(value, dict) and name == names[-1] and flags & 0x08:
            values.extend(value.values())
        else:
            values.append(value)
    return values


def _collapse(modules: list[str]) -> list[str]:
    return [m for i, m in enumerate(modules) if i == 0 or modules[i - 1] != m]


def _returns(sequence: list[str]) -> int:
    return sum(1 for i, m in enumerate(sequence) if m in sequence[:i])


def trace(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, ListConfig

    import molex
    from molex.cli.train import train

    package = str(Path(molex.__file__).resolve().parent)
    conf = Path(package) / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"run_dir={run_dir}"])

    calls: list[tuple[str, str, bool]] = []  # (module, function, a node of cfg itself)

    def rooted(node: Any) -> bool:
        try:
            return node is cfg or node._get_root() is cfg
        except Exception:  # a detached node
            return False

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call" or not frame.f_code.co_filename.startswith(package):
            return
        configs = [v for v in _config_arguments(frame) if isinstance(v, DictConfig | ListConfig)]
        if configs:
            module = frame.f_globals.get("__name__", "?")
            calls.append((module, frame.f_code.co_qualname, any(rooted(v) for v in configs)))

    start = time.perf_counter()
    sys.setprofile(profile)
    try:
        train(cfg)
    finally:
        sys.setprofile(None)
    seconds = time.perf_counter() - start

    sequence = _collapse([m for m, _, _ in calls])
    rooted_sequence = _collapse([m for m, _, r in calls if r])
    return {
        "molex": package,
        "overrides": overrides,
        "calls": len(calls),
        "modules": len(set(sequence)),
        "returns": _returns(sequence),
        "module_sequence": sequence,
        "functions": sorted({f"{m}.{f}" for m, f, _ in calls}),
        "rooted_modules": len(set(rooted_sequence)),
        "rooted_returns": _returns(rooted_sequence),
        "rooted_module_sequence": rooted_sequence,
        "train_seconds_under_profile": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="current", help="names the JSON file: trace_config_<label>.json")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON file")
    parser.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="molex-trace-") as tmp:
        result = trace([*OVERRIDES, *args.overrides], Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"trace_config_{args.label}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"molex at {result['molex']}: {result['calls']} calls with a config argument")
    print(f"distinct molex modules: {result['modules']}; returns to a module already left: {result['returns']}")
    print(
        f"(nodes of the composed config only: {result['rooted_modules']} modules, {result['rooted_returns']} returns)"
    )
    print("sequence: " + " -> ".join(m.removeprefix("molex.") for m in result["module_sequence"]))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
