"""Routing health while training: log it, warn about collapsed routers and dead experts, summarise it.

:class:`RoutingHealthMonitor` (a Lightning callback; :class:`~molex.lightning.MoLEModule` adds one on its
own) turns :func:`molex.enable_routing_health` on for the training forwards and, every
``every_n_steps`` optimiser steps, reads :func:`molex.routing_health` (the window since the last read)
and

* sends ``health/<layer>/{largest_share, dead_experts, entropy, tiny_margin, load_e<i>}`` and the totals
  ``health/collapsed_layers`` / ``health/dead_experts`` to the trainer's loggers (CSV, TensorBoard);
* logs one warning line (logger ``molex.layer.health``) when a layer's largest expert share has stayed above
  ``collapse_share`` for ``collapse_logs`` consecutive reads, or a layer has more dead experts than at the
  previous read;
* keeps the history, from which :meth:`~RoutingHealthMonitor.summary_text` writes a per-layer table and
  :meth:`~RoutingHealthMonitor.plot` a PNG of largest share and dead experts per layer against the step.

:class:`HealthSettings` holds the read interval and the warning rule's thresholds, checked once;
:class:`CollapseWatch` is the warning rule alone (no Lightning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from molex.core.files import atomic_write
from molex.layer.health import (
    TINY_MARGIN,
    RoutingHealth,
    disable_routing_health,
    enable_routing_health,
    has_routing_reads,
    routing_health,
)

__all__ = ["CollapseWatch", "HealthSettings", "RoutingHealthMonitor"]

log = logging.getLogger("molex.layer.health")
_LISTED = 4  # layers named in one warning line before "and N more"


def _short(name: str) -> str:
    return name.removeprefix("model.")


def _listing(items: list[str]) -> str:
    more = len(items) - _LISTED
    return ", ".join(items[:_LISTED]) + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True, kw_only=True)
class HealthSettings:
    """When routing health is read and when a layer counts as collapsed.

    Attributes:
        log_every_n_steps: read (and log per-layer expert load and router entropy) every this many optimiser
            steps; ``0`` turns both off.
        collapse_share: a layer whose largest expert share stays above this (in ``(0, 1]``) ...
        collapse_logs: ... for this many consecutive reads (``>= 1``) gets a one-line warning.

    Each message starts with the field's name, so a config front end can prefix its own path
    (``health.collapse_share ...``).
    """

    log_every_n_steps: int = 50
    collapse_share: float = 0.95
    collapse_logs: int = 3

    def __post_init__(self) -> None:
        for name in ("log_every_n_steps", "collapse_logs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if self.log_every_n_steps < 0:
            raise ValueError(f"log_every_n_steps must be >= 0 (0: no routing logs), got {self.log_every_n_steps}")
        share = self.collapse_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 < share <= 1.0:
            raise ValueError(f"collapse_share must be in (0, 1] (a share of the routed weight), got {share!r}")
        if self.collapse_logs < 1:
            raise ValueError(f"collapse_logs must be >= 1 (consecutive logged reads), got {self.collapse_logs}")


@dataclass
class CollapseWatch:
    """The warning rule. :meth:`observe` takes each read and returns the warning line, or ``None``.

    A layer is *collapsed* once its largest share exceeds ``settings.collapse_share`` in
    ``settings.collapse_logs`` consecutive reads (warned once; a read at or below the threshold starts the
    count again). Dead experts are warned about when a layer has more of them than at its previous read.
    """

    settings: HealthSettings = field(default_factory=HealthSettings)
    streak: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    #: first step at which each layer was reported collapsed
    collapsed_at: dict[str, int] = field(default_factory=dict)

    @property
    def collapse_share(self) -> float:
        return self.settings.collapse_share

    @property
    def collapse_logs(self) -> int:
        return self.settings.collapse_logs

    def observe(self, step: int, health: RoutingHealth) -> str | None:
        collapsed, dead = [], []
        for h in health:
            if h.num_experts < 2:  # one expert (a plain LoRA) always takes everything: nothing to warn about
                continue
            over = h.largest_share > self.collapse_share
            self.streak[h.name] = self.streak.get(h.name, 0) + 1 if over else 0
            if self.streak[h.name] == self.collapse_logs:
                collapsed.append(f"{_short(h.name)} ({h.largest_share:.3f})")
                self.collapsed_at.setdefault(h.name, step)
            if h.dead_experts > self.dead.get(h.name, 0):
                dead.append(f"{_short(h.name)} {h.dead_experts}/{h.num_experts}")
            self.dead[h.name] = h.dead_experts
        parts = []
        if collapsed:
            parts.append(
                f"collapsed (largest expert share > {self.collapse_share:g} in {self.collapse_logs} consecutive "
                f"logs): {_listing(collapsed)}"
            )
        if dead:
            parts.append(f"dead experts (share < 1/(10 E)): {_listing(dead)}")
        return f"routing health at step {step}: " + "; ".join(parts) if parts else None


class RoutingHealthMonitor(L.Callback):
    """Reads, logs and watches routing health every ``every_n_steps`` optimiser steps (see the module doc).

    Args:
        settings: the read interval (``settings.log_every_n_steps``, here ``>= 1``) and the
            :class:`CollapseWatch` rule.
        margin_threshold: log-probability gap under which a token counts as undecided (``tiny_margin``).
    """

    def __init__(self, settings: HealthSettings, *, margin_threshold: float = TINY_MARGIN) -> None:
        if not isinstance(settings, HealthSettings):
            raise TypeError(f"settings must be a HealthSettings, got {type(settings).__name__}")
        if settings.log_every_n_steps < 1:
            raise ValueError("HealthSettings(log_every_n_steps=0) turns routing health off: build no monitor for it")
        self.settings = settings
        self.every_n_steps = settings.log_every_n_steps
        self.watch = CollapseWatch(settings)
        self.margin_threshold = margin_threshold
        #: ``(step, health)`` of every read
        self.history: list[tuple[int, RoutingHealth]] = []
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        enable_routing_health(pl_module.model, margin_threshold=self.margin_threshold)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        disable_routing_health(pl_module.model)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # optimiser steps done, this batch's included
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        if not has_routing_reads(pl_module.model):  # pools re-built this step (auto allocation): nothing ran yet
            return
        health = routing_health(pl_module.model)
        self.history.append((step, health))
        warning = self.watch.observe(step, health)
        if warning and trainer.is_global_zero:
            log.warning("%s", warning)
        metrics = self.metrics(health)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def metrics(self, health: RoutingHealth) -> dict[str, float]:
        """The logged scalars of one read."""
        out: dict[str, float] = {}
        for h in health:
            key = f"health/{_short(h.name)}"
            out[f"{key}/largest_share"] = h.largest_share
            out[f"{key}/dead_experts"] = float(h.dead_experts)
            if h.entropy is not None:
                out[f"{key}/entropy"] = h.entropy
            if h.tiny_margin is not None:
                out[f"{key}/tiny_margin"] = h.tiny_margin
            for expert, share in enumerate(h.load):
                out[f"{key}/load_e{expert}"] = share
        out["health/collapsed_layers"] = float(len(health.collapsed(self.watch.collapse_share)))
        out["health/dead_experts"] = float(sum(h.dead_experts for h in health))
        return out

    def summary_text(self) -> str:
        """A per-layer table of the last read (with the largest share seen over the run and the step at which
        a layer was reported collapsed); empty when nothing was read."""
        if not self.history:
            return ""
        step, last = self.history[-1]
        peak = {
            h.name: max(hh.largest_share for _, read in self.history for hh in read if hh.name == h.name) for h in last
        }
        rows = [
            (
                "routing unit",
                "experts",
                "largest share",
                "max over run",
                "dead",
                "entropy",
                "tiny margin",
                "collapsed at",
            )
        ]
        for h in last:
            rows.append(
                (
                    _short(h.name),
                    str(h.num_experts),
                    f"{h.largest_share:.3f}",
                    f"{peak[h.name]:.3f}",
                    str(h.dead_experts),
                    "-" if h.entropy is None else f"{h.entropy:.3f}",
                    "-" if h.tiny_margin is None else f"{h.tiny_margin:.3f}",
                    str(self.watch.collapsed_at.get(h.name, "-")),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
        collapsed, dead = last.collapsed(self.watch.collapse_share), sum(h.dead_experts for h in last)
        header = (
            f"routing health at step {step} (the {self.every_n_steps} steps before it; {len(self.history)} reads): "
            f"{len(collapsed)} of {len(last)} routing units above a {self.watch.collapse_share:g} largest share, "
            f"{dead} dead experts (share < 1/(10 E)); tiny margin: log p1 - log p2 < {last.margin_threshold:g}"
        )
        return "\n".join([header, *lines])

    def plot(self, path: str | Path) -> Path | None:
        """Save a PNG of each routing unit's largest share and dead experts against the step (``None`` when
        nothing was read). Lines are coloured by module order."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        steps = [step for step, _ in self.history]
        names = list(self.history[-1][1].layers)
        colours = plt.get_cmap("viridis")
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for i, name in enumerate(names):
            colour = colours(i / max(len(names) - 1, 1))
            reads = [read.layers.get(name) for _, read in self.history]
            top.plot(steps, [r.largest_share if r else float("nan") for r in reads], color=colour, lw=1, marker=".")
            bottom.plot(steps, [r.dead_experts if r else float("nan") for r in reads], color=colour, lw=1, marker=".")
        top.axhline(self.watch.collapse_share, color="red", ls="--", lw=0.8, label="collapse threshold")
        top.set(ylabel="largest expert share", ylim=(0, 1.02), title="routing health per layer (colour: module order)")
        top.legend(fontsize=7, loc="lower right")
        bottom.set(xlabel="optimiser step", ylabel="dead experts")
        most = max((h.dead_experts for _, read in self.history for h in read), default=0)
        bottom.set_ylim(-0.3, max(most, 1) + 0.3)
        bottom.yaxis.get_major_locator().set_params(integer=True)
        bottom.xaxis.get_major_locator().set_params(integer=True)
        fig.colorbar(
            plt.cm.ScalarMappable(matplotlib.colors.Normalize(0, max(len(names) - 1, 1)), colours),
            ax=[top, bottom],
            label="MoLE layer (module order)",
            fraction=0.04,
        )
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        return path
