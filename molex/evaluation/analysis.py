"""Routing analytics: per-layer expert load, router entropy and per-task expert usage, with plots.

``collect_routing`` runs a MoLE model over a dataloader and aggregates every MoLE layer's routing
(the gate matrix ``[T, E]`` of its last forward) over real tokens, overall and per task
(``task_ids`` in the batches). ``plot_routing`` draws the pictures that show whether experts
specialised; matplotlib is imported only there (Agg backend, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from molex.core.files import atomic_write
from molex.evaluation.generation import eval_autocast
from molex.layer.context import ROUTING_KWARGS
from molex.layer.inject import mole_layers

__all__ = ["RoutingReport", "collect_routing", "log_routing_report", "plot_routing"]

_FORWARD_KEYS = ("input_ids", "attention_mask", *ROUTING_KWARGS)


def _to_device(value: object, device: torch.device) -> object:
    """A tensor, or a dict of tensors (``features``), on ``device``; ``None`` for anything else."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict) and all(isinstance(v, Tensor) for v in value.values()):
        return {k: v.to(device) for k, v in value.items()}
    return None


@dataclass
class RoutingReport:
    """Routing aggregated over many tokens.

    Attributes:
        layers: MoLE layer names, in module order.
        load: per layer, ``[E_l]`` mean gate weight per expert over real tokens (sums to ~1 for
            normalised routers).
        entropy: per layer, mean router entropy normalised by ``log E_l`` (NaN when unknown).
        task_usage: per layer, ``[num_tasks, E_l]`` mean gate weight per expert for each task's tokens.
        task_tokens: ``[num_tasks]`` real tokens seen per task.
        task_names: display names of the task ids.
        active: per layer, mean number of experts with a non-zero gate per real token (a layer's
            active rank per token is this times its experts' rank; empty when not collected).
    """

    layers: list[str]
    load: list[Tensor]
    entropy: list[float]
    task_usage: list[Tensor] = field(default_factory=list)
    task_tokens: Tensor | None = None
    task_names: list[str] = field(default_factory=list)
    active: list[float] = field(default_factory=list)

    def specialisation(self) -> list[float]:
        """Per layer, the mutual information ``I(task; expert)`` over the gate weights, normalised
        to [0, 1] by ``min(log num_tasks, log E)``: 0 = every task uses the experts alike,
        1 = each task has its own experts."""
        if not self.task_usage or self.task_tokens is None:
            return []
        present = self.task_tokens > 0
        p_task = self.task_tokens[present].double() / self.task_tokens[present].sum()
        out = []
        for usage in self.task_usage:
            cond = usage[present].double()
            cond = cond / cond.sum(-1, keepdim=True).clamp_min(1e-12)  # p(e | t)
            marginal = (p_task[:, None] * cond).sum(0)  # p(e)
            ratio = (cond.clamp_min(1e-12) / marginal.clamp_min(1e-12)).log()
            mi = (p_task[:, None] * cond * ratio).sum().item()
            bound = min(math.log(max(int(present.sum()), 1)), math.log(usage.shape[1]))
            out.append(mi / bound if bound > 0 else 0.0)
        return out

    def to_dict(self) -> dict[str, Any]:
        spec = self.specialisation()
        return {
            "task_names": self.task_names,
            "layers": {
                name: {
                    "load": [round(v, 6) for v in self.load[i].tolist()],
                    "entropy": None if math.isnan(self.entropy[i]) else round(self.entropy[i], 6),
                    **({"active_experts": round(self.active[i], 6)} if self.active else {}),
                    **({"specialisation": round(spec[i], 6)} if spec else {}),
                    **(
                        {"task_usage": [[round(v, 6) for v in row] for row in self.task_usage[i].tolist()]}
                        if self.task_usage
                        else {}
                    ),
                }
                for i, name in enumerate(self.layers)
            },
        }


def _covering(batches: Iterable[Mapping[str, Any]], num_tasks: int, per_task: int) -> Iterator[Mapping[str, Any]]:
    """The batches that bring some task (``task_ids [B]``) closer to ``per_task`` examples, until every
    task has them: a cheap sample that covers every task whether the data is shuffled or grouped by task.
    Batches without ``task_ids`` count toward ``per_task * num_tasks`` examples in all."""
    seen = torch.zeros(max(num_tasks, 1), dtype=torch.long)
    for batch in batches:
        tasks = batch.get("task_ids")
        if tasks is None:
            yield batch
            seen[0] += batch["input_ids"].shape[0]
            if int(seen[0]) >= per_task * max(num_tasks, 1):
                return
            continue
        tasks = tasks.reshape(-1).long().cpu()
        top = int(tasks.max()) if tasks.numel() else -1
        if seen.numel() <= top:  # a task id beyond task_names: track it too
            seen = torch.cat([seen, seen.new_zeros(top + 1 - seen.numel())])
        counts = torch.bincount(tasks, minlength=seen.numel())
        if bool(((seen < per_task) & (counts > 0)).any()):
            seen += counts
            yield batch
        if bool((seen >= per_task).all()):
            return


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    max_batches: int | None = None,
    task_names: list[str] | None = None,
    per_task: int | None = None,
    precision: str = "float32",
) -> RoutingReport:
    """Run ``model`` over ``batches`` (dicts with ``input_ids [B, S]``, ``attention_mask [B, S]``
    and optionally ``task_ids [B]``) and aggregate each MoLE layer's routing over real tokens.

    ``per_task``: use only the batches that bring some task closer to ``per_task`` examples, and stop
    once every task of ``task_names`` has them, so a sample covers every task even when the data is
    grouped by task (a task missing from ``batches`` ends the pass with the data). ``max_batches`` caps
    the batches used either way. ``precision``: ``"float32"`` or ``"bf16"`` (autocast, see
    :func:`molex.evaluation.generation.eval_autocast`). The model is put in eval mode for the pass and
    restored afterwards.
    """
    if per_task is not None:
        if per_task < 1:
            raise ValueError(f"per_task must be >= 1 (examples per task), got {per_task}")
        batches = _covering(batches, len(task_names or []), per_task)
    layers = mole_layers(model)
    if not layers:
        raise ValueError("the model has no MoLE layers: nothing to analyse")
    names = list(layers)
    load_sum = {n: torch.zeros(layers[n].experts.num_experts, dtype=torch.float64) for n in names}
    entropy_sum = dict.fromkeys(names, 0.0)
    entropy_batches = dict.fromkeys(names, 0)
    active_sum = dict.fromkeys(names, 0.0)
    num_tasks = len(task_names) if task_names else 0
    task_sum: dict[str, Tensor] = {}
    task_tokens = torch.zeros(num_tasks, dtype=torch.float64)
    tokens = 0.0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for step, batch in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
            inputs = {k: _to_device(v, device) for k, v in batch.items() if k in _FORWARD_KEYS}
            inputs = {k: v for k, v in inputs.items() if v is not None}
            with eval_autocast(model, precision):
                model(**inputs)
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask", torch.ones_like(ids)).reshape(-1).bool().cpu()
            tasks = inputs.get("task_ids")
            token_tasks = None
            if tasks is not None:
                token_tasks = tasks.reshape(-1, 1).expand(ids.shape).reshape(-1).cpu()[mask].long()
                num_tasks = max(num_tasks, int(token_tasks.max()) + 1 if token_tasks.numel() else 0)
                if task_tokens.shape[0] < num_tasks:
                    task_tokens = torch.cat([task_tokens, task_tokens.new_zeros(num_tasks - task_tokens.shape[0])])
                task_tokens += torch.bincount(token_tasks, minlength=num_tasks).double()
            tokens += float(mask.sum())
            for name in names:
                layer = layers[name]
                decision = layer.last_decision
                if decision is None:
                    continue
                gate = decision.to_dense(layer.experts.num_experts).double().cpu()[mask]
                load_sum[name] += gate.sum(0)
                active_sum[name] += float((gate != 0).sum())
                stats = layer.routing_stats()
                if "entropy" in stats:
                    entropy_sum[name] += float(stats["entropy"])
                    entropy_batches[name] += 1
                if token_tasks is not None:
                    acc = task_sum.get(name)
                    needed = (num_tasks, gate.shape[1])
                    if acc is None or acc.shape[0] < num_tasks:
                        grown = torch.zeros(needed, dtype=torch.float64)
                        if acc is not None:
                            grown[: acc.shape[0]] = acc
                        acc = grown
                    acc.index_add_(0, token_tasks, gate)
                    task_sum[name] = acc
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the dataloader gave no tokens: cannot collect routing statistics")
    usage = []
    if task_sum:
        usage = [(task_sum[n] / task_tokens.clamp_min(1.0)[:, None]).float() for n in names]
    labels = list(task_names or [])
    labels += [f"task {i}" for i in range(len(labels), num_tasks)]
    return RoutingReport(
        layers=names,
        load=[(load_sum[n] / tokens).float() for n in names],
        entropy=[entropy_sum[n] / entropy_batches[n] if entropy_batches[n] else float("nan") for n in names],
        task_usage=usage,
        task_tokens=task_tokens.float() if task_sum else None,
        task_names=labels[:num_tasks] if task_sum else [],
        active=[active_sum[n] / tokens for n in names],
    )


def _short(name: str) -> str:
    return name.removeprefix("model.").replace("layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def plot_routing(report: RoutingReport, out_dir: str | Path, *, max_usage_layers: int = 6) -> dict[str, Path]:
    """Save ``expert_load.png``, ``router_entropy.png`` and (with task ids) ``task_expert_usage.png``.

    Returns ``{figure name: path}``; ``figures`` of the same names can be logged with
    :func:`log_routing_report`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def save(fig, name: str) -> None:
        path = out_dir / f"{name}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        paths[name] = path

    max_e = max(load.shape[0] for load in report.load)
    grid = np.full((len(report.layers), max_e), np.nan)
    for i, load in enumerate(report.load):
        grid[i, : load.shape[0]] = load.numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * max_e, 1.5 + 0.16 * len(report.layers)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(report.layers)), [_short(n) for n in report.layers], fontsize=6)
    ax.set_xticks(range(max_e))
    ax.set_xlabel("expert")
    ax.set_title("mean gate weight per expert (blank: layer has fewer experts)")
    fig.colorbar(image, ax=ax, fraction=0.05)
    save(fig, "expert_load")

    spec = report.specialisation()
    kinds = sorted({n.rsplit(".", 1)[-1] for n in report.layers})
    fig, axes = plt.subplots(1, 2 if spec else 1, figsize=(11 if spec else 6, 3.5), squeeze=False)
    for kind in kinds:
        rows = [i for i, n in enumerate(report.layers) if n.rsplit(".", 1)[-1] == kind]
        axes[0, 0].plot(rows, [report.entropy[i] for i in rows], marker="o", ms=3, label=kind)
        if spec:
            axes[0, 1].plot(rows, [spec[i] for i in rows], marker="o", ms=3, label=kind)
    axes[0, 0].set(xlabel="MoLE layer (module order)", ylabel="entropy / log E", title="router entropy", ylim=(0, 1.05))
    axes[0, 0].legend(fontsize=7)
    if spec:
        axes[0, 1].set(
            xlabel="MoLE layer (module order)",
            ylabel="I(task; expert), normalised",
            title="task specialisation",
            ylim=(0, 1.05),
        )
        axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    save(fig, "router_entropy")

    if report.task_usage:
        picks = np.unique(np.linspace(0, len(report.layers) - 1, min(max_usage_layers, len(report.layers))).round())
        fig, axes = plt.subplots(
            1, len(picks), figsize=(2.6 * len(picks) + 1, 0.6 + 0.35 * len(report.task_names)), squeeze=False
        )
        for ax, index in zip(axes[0], picks.astype(int), strict=True):
            usage = report.task_usage[index].numpy().copy()
            usage[report.task_tokens.numpy() == 0] = np.nan  # tasks absent from the data: blank, not "unused"
            vmax = max(float(np.nanmax(usage)) if np.isfinite(usage).any() else 0.0, 1e-6)
            ax.imshow(np.ma.masked_invalid(usage), aspect="auto", cmap="magma", vmin=0, vmax=vmax)
            ax.set_title(_short(report.layers[index]), fontsize=8)
            ax.set_xticks(range(usage.shape[1]))
            ax.set_xlabel("expert", fontsize=7)
            ax.set_yticks(range(len(report.task_names)), report.task_names if ax is axes[0, 0] else [], fontsize=7)
        fig.suptitle("per-task expert usage (mean gate weight)", fontsize=9)
        fig.tight_layout()
        save(fig, "task_expert_usage")
    return paths


def log_routing_report(report: RoutingReport, paths: Mapping[str, Path], loggers: Iterable[Any], step: int) -> None:
    """Send the report to Lightning loggers: per-layer scalars to every logger, the PNGs as images
    to TensorBoard loggers."""
    spec = report.specialisation()
    metrics: dict[str, float] = {}
    for i, name in enumerate(report.layers):
        short = name.removeprefix("model.")
        if not math.isnan(report.entropy[i]):
            metrics[f"routing_final/{short}/entropy"] = report.entropy[i]
        if report.active:
            metrics[f"routing_final/{short}/active_experts"] = report.active[i]
        if spec:
            metrics[f"routing_final/{short}/specialisation"] = spec[i]
        for expert, value in enumerate(report.load[i].tolist()):
            metrics[f"routing_final/{short}/load_e{expert}"] = value
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        writer = getattr(logger, "experiment", None)
        if type(logger).__name__ == "TensorBoardLogger" and hasattr(writer, "add_image"):
            import matplotlib.image as mpimg

            for name, path in paths.items():
                image = mpimg.imread(path)[..., :3]
                writer.add_image(f"routing/{name}", image, global_step=step, dataformats="HWC")
        logger.save()
