"""Statistics over seeds, the markdown tables and the figure of the study.

Every variant's numbers are mean ± sample standard deviation over its seeds; differences to the
reference variant are paired by seed (the same seed gives every variant the same data and order),
so the spread of a difference excludes what all variants share.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["aggregate", "compact_run", "markdown", "plot"]


def _stats(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values) if values else math.nan,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def _mean_of(runs: list[dict], key: str) -> float | None:
    values = [r["health"]["summary"].get(key) for r in runs if r.get("health")]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def compact_run(run: dict[str, Any]) -> dict[str, Any]:
    """A run as ``study.json`` keeps it: per-layer routing stays in the run's own ``result.json``."""
    out = dict(run)
    if run.get("health"):
        out["health"] = {"summary": run["health"]["summary"]}
    return out


def aggregate(runs: list[dict[str, Any]], *, reference: str, tasks: list[str]) -> dict[str, Any]:
    """Per variant: exact match (overall and per task), validation LM loss, paired differences to
    ``reference``, parameters, active rank, routing health averaged over seeds."""
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)
    ref = {r["seed"]: r for r in by_variant.get(reference, [])}
    out: dict[str, Any] = {}
    for name, group in by_variant.items():
        group = sorted(group, key=lambda r: r["seed"])
        paired = [(r, ref[r["seed"]]) for r in group if r["seed"] in ref]
        health = [r for r in group if r.get("health")]
        out[name] = {
            "description": group[0]["description"],
            "seeds": [r["seed"] for r in group],
            "trainable_params": group[0]["trainable_params"],
            "active_rank": statistics.fmean(r["active_rank"] for r in group),
            "accuracy": _stats([r["accuracy"] for r in group]),
            "per_task": {t: _stats([r["per_task"][t] for r in group if t in r["per_task"]]) for t in tasks},
            "val_lm_loss": _stats([r["val_lm_loss"] for r in group]),
            "vs_reference": {
                "accuracy": _stats([r["accuracy"] - q["accuracy"] for r, q in paired]),
                "val_lm_loss": _stats([r["val_lm_loss"] - q["val_lm_loss"] for r, q in paired]),
            }
            if name != reference and paired
            else None,
            "train_seconds": statistics.fmean(r["train_seconds"] for r in group),
            "health": {
                key: _mean_of(health, key)
                for key in (
                    "experts",
                    "dead_experts",
                    "dead_fraction",
                    "collapsed_layers",
                    "collapsed_layers_4plus",
                    "largest_share_mean",
                    "largest_share_max",
                    "load_entropy_mean",
                    "load_entropy_min",
                    "router_entropy_mean",
                    "specialisation_mean",
                )
            }
            if health
            else None,
        }
    return out


def _pm(stats: dict[str, Any] | None, scale: float = 1.0, digits: int = 1, signed: bool = False) -> str:
    if stats is None or not stats["n"]:
        return "-"
    sign = "+" if signed else ""
    text = f"{stats['mean'] * scale:{sign}.{digits}f}"
    return text + (f" ± {stats['sd'] * scale:.{digits}f}" if stats["sd"] is not None else "")


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(study: dict[str, Any]) -> str:
    """The study's tables: results, per-task exact match, routing health; then the setup."""
    agg, tasks, ref = study["aggregate"], study["tasks"], study["reference"]
    order = [v for v in study["variants"] if v in agg]
    lines = [
        f"Exact match (%) on the test split and LM loss per answer token on the validation split (no auxiliary "
        f"losses); mean ± sd over seeds {study['seeds']}; Δ: paired by seed against `{ref}`.",
        "",
        "| variant | trainable | active rank | EM % | Δ EM | val LM loss | Δ loss | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = study.get("base")
    if base:
        lines.append(
            f"| base model (untrained) | 0 | 0 | {100 * base['accuracy']:.1f} | | {base['val_lm_loss']:.3f} | | |"
        )
    for name in order:
        a = agg[name]
        vs = a["vs_reference"] or {}
        lines.append(
            f"| `{name}` | {a['trainable_params'] / 1e6:.2f} M | {a['active_rank']:.1f} | {_pm(a['accuracy'], 100)} | "
            f"{_pm(vs.get('accuracy'), 100, signed=True)} | {_pm(a['val_lm_loss'], digits=3)} | "
            f"{_pm(vs.get('val_lm_loss'), digits=3, signed=True)} | {a['train_seconds']:.0f} |"
        )
    lines += ["", "Exact match (%) per task, mean ± sd over seeds:", ""]
    lines.append("| variant | " + " | ".join(tasks) + " | overall |")
    lines.append("|---|" + "---:|" * (len(tasks) + 1))
    for name in order:
        a = agg[name]
        cells = [_pm(a["per_task"][t], 100, digits=0) for t in tasks]
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {_pm(a['accuracy'], 100)} |")
    lines += [
        "",
        "Routing health on the test split (mean over seeds): experts with under 1/(10 E) of their layer's load "
        "are dead; a layer whose largest expert share is ≥ 0.9 is collapsed; entropies are divided by log E "
        "(load: how evenly the layer's experts are used; router: per-token certainty); specialisation is "
        "I(task; expert) normalised to [0, 1].",
        "",
        "| variant | dead / experts | dead % | collapsed layers (all / E ≥ 4) | largest share mean / max "
        "| load entropy mean / min | router entropy | specialisation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in order:
        h = agg[name]["health"]
        if not h:
            continue
        dead_pct = None if h.get("dead_fraction") is None else 100 * h["dead_fraction"]
        lines.append(
            f"| `{name}` | {_num(h['dead_experts'], 1)} / {_num(h['experts'], 0)} | {_num(dead_pct, 1)} | "
            f"{_num(h['collapsed_layers'], 1)} / {_num(h.get('collapsed_layers_4plus'), 1)} | "
            f"{_num(h['largest_share_mean'])} / {_num(h['largest_share_max'])} | "
            f"{_num(h['load_entropy_mean'])} / {_num(h['load_entropy_min'])} | {_num(h['router_entropy_mean'])} | "
            f"{_num(h['specialisation_mean'], 3)} |"
        )
    counts = ", ".join(f"{t} {n}" for t, n in study["test_counts"].items())
    lines += [
        "",
        "Variants: " + "; ".join(f"`{n}`: {agg[n]['description']}" for n in order) + ".",
        "",
        f"Setup: `{study['command']}`; model {study['model']}; {study['steps']} steps; test examples per task: "
        f"{counts}; tuning: {study['tuning']}. Machine: {_machine(study)}; wall time {study['wall_minutes']:.1f} "
        f"min (this invocation; {study['run_minutes']:.1f} min of training and measurement over all runs).",
    ]
    for variant, choice in (study.get("lr_tuning") or {}).items():
        losses = ", ".join(
            f"{v}: {'diverged' if loss is None else f'{loss:.4f}'}" for v, loss in choice["losses"].items()
        )
        lines.append(
            f"\n`{variant}`: {choice['key']}={choice['chosen']:g} chosen on seed 0's validation LM loss ({losses})."
        )
    return "\n".join(lines) + "\n"


def _machine(study: dict[str, Any]) -> str:
    env = study.get("environment")
    if not env:  # reports written before the environment was recorded
        return study.get("machine", "unknown")
    return (
        f"{env['cpu']}, {env['cores']} cores (native bf16: {'yes' if env['cpu_native_bf16'] else 'no'}), "
        f"{env['threads']} threads per run, training precision {env['precision']}, torch {env['torch']}, "
        f"commit {env['commit']}"
    )


def plot(study: dict[str, Any], path: Path) -> Path:
    """One panel for overall exact match and one per task: bars at the mean, error bars ± sd, dots per seed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image  # a matplotlib dependency

    agg, tasks = study["aggregate"], study["tasks"]
    order = [v for v in study["variants"] if v in agg]
    panels = [("overall", lambda a: a["accuracy"])] + [(t, lambda a, t=t: a["per_task"][t]) for t in tasks]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 0.6 + 0.28 * len(order) * rows + 0.8 * rows), squeeze=False
    )
    for ax, (title, pick) in zip(axes.flat, panels, strict=False):
        for y, name in enumerate(order):
            s = pick(agg[name])
            if not s["n"]:
                continue
            color = "tab:gray" if not agg[name]["health"] else "tab:blue"
            ax.barh(y, 100 * s["mean"], xerr=100 * (s["sd"] or 0), color=color, alpha=0.6, capsize=3)
            ax.plot([100 * v for v in s["values"]], [y] * s["n"], "k.", ms=4)
        ax.set_yticks(range(len(order)), order if ax in axes[:, 0] else [], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("exact match %", fontsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{study['model']}, {study['steps']} steps, seeds {study['seeds']} (grey: one LoRA)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110)
    plt.close(fig)
    # a 64-colour palette keeps the committed plot a third of its RGBA size (bars, dots and text only)
    image = Image.open(buffer).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)
    return path
