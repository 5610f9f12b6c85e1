"""What the study measures on a trained run, outside the training process.

The configuration is composed from molex's packaged Hydra config (the same ``train`` config
``molex-train`` reads), so the model and data seen here are exactly the run's. For each run:

* trainable parameters and the active rank per token (mean over MoLE layers of the number of experts
  with a non-zero gate per real token, ``RoutingReport.active``, times the layer's rank), measured on
  the test split;
* the validation LM loss of the final model over the whole validation split (cross-entropy per answer
  token, no auxiliary losses): the run's logged ``val/lm_loss``, else :func:`molex.evaluation.generation.evaluate_loss`;
* routing health on test batches covering every task with ``ROUTING_PER_TASK`` examples, from
  :func:`molex.evaluation.analysis.collect_routing` (which also counts the active experts per token).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import molex
from molex.evaluation.health_summary import mixture_health
from molex.layer.health import expert_shares

__all__ = [
    "compose_config",
    "count_trainable",
    "load_base",
    "make_datamodule",
    "matched_rank",
    "measure_run",
    "mole_config_of",
    "routing_health",
]

#: test examples per task the routing statistics are gathered over (at least; whole batches are used)
ROUTING_PER_TASK = 16
#: a layer whose largest expert share reaches this is counted as collapsed
COLLAPSED_SHARE = 0.9


def compose_config(overrides: list[str]) -> DictConfig:
    """``molex-train``'s config with ``overrides`` applied (Hydra compose API, molex's packaged conf)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(molex.__file__).parent / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def mole_config_of(cfg: DictConfig) -> molex.MoLEConfig:
    """The ``MoLEConfig`` a composed train config describes (``mole`` node + router and allocation groups)."""
    from hydra.utils import instantiate

    router = instantiate(cfg.router)
    mole = OmegaConf.to_container(cfg.mole, resolve=True)
    return molex.MoLEConfig(
        **mole,
        router=cfg.router.name,
        router_options=dataclasses.asdict(router),
        allocation=instantiate(cfg.allocation),
    )


def load_base(cfg: DictConfig) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from the config's ``model`` node, in eval mode."""
    from hydra.utils import instantiate

    model, tokenizer = instantiate(cfg.model)
    return model.eval(), tokenizer


def make_datamodule(cfg: DictConfig, tokenizer: Any) -> Any:
    """The run's ``InstructionDataModule`` (same source, sizes and seed), tokenised."""
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, tokenizer=tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def count_trainable(base: nn.Module, config: molex.MoLEConfig) -> int:
    """Trainable parameters ``config`` adds to ``base`` (injected, counted, taken out again)."""
    molex.inject(base, config)
    try:
        return sum(p.numel() for p in molex.trainable_parameters(base))
    finally:
        molex.unload(base)


def matched_rank(base: nn.Module, target: molex.MoLEConfig, lora: molex.MoLEConfig) -> tuple[int, int]:
    """``(rank, target's trainable parameters)``: the one-LoRA rank whose parameter count is closest
    to ``target``'s, the LoRA's own count being linear in its rank (``lora`` gives the slope)."""
    target_params = count_trainable(base, target)
    per_rank = count_trainable(base, lora) / lora.rank
    return max(1, round(target_params / per_rank)), target_params


def _entropy(shares: Tensor) -> float:
    """Entropy of a distribution over ``E`` experts, divided by ``log E`` (1 = perfectly even)."""
    p = shares.double().clamp_min(0)
    p = p / p.sum().clamp_min(1e-12)
    if p.numel() < 2:
        return 1.0
    return float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(p.numel()))


def routing_health(report: Any) -> dict[str, Any]:
    """Per-layer and summary health of a :class:`molex.evaluation.analysis.RoutingReport`.

    Per layer: ``share`` (each expert's fraction of the total gate weight), ``largest_share``,
    ``dead`` (experts under ``1/(10 E)`` of the load) — the definitions of :func:`molex.routing_health`,
    through :func:`molex.layer.health.expert_shares` — ``router_entropy`` (mean per-token entropy
    of the router's probabilities / ``log E``), ``load_entropy`` (entropy of ``share`` / ``log E``),
    ``specialisation`` (normalised I(task; expert)) and ``task_usage`` ``[tasks][E]``.
    """
    spec = report.specialisation()
    layers: dict[str, Any] = {}
    for i, name in enumerate(report.layers):
        share, largest, dead = expert_shares(report.load[i])  # molex.routing_health's definitions
        entry = {
            "experts": share.numel(),
            "share": [round(v, 5) for v in share.tolist()],
            "largest_share": round(largest, 5),
            "dead": dead,
            "router_entropy": None if math.isnan(report.entropy[i]) else round(report.entropy[i], 5),
            "load_entropy": round(_entropy(share), 5),
        }
        if spec:
            entry["specialisation"] = round(spec[i], 5)
            entry["task_usage"] = [[round(v, 5) for v in row] for row in report.task_usage[i].tolist()]
        layers[name] = entry

    def mean(key: str) -> float | None:
        values = [e[key] for e in layers.values() if e.get(key) is not None]
        return round(sum(values) / len(values), 5) if values else None

    summary = {
        "layers": len(layers),
        "experts": sum(e["experts"] for e in layers.values()),
        "dead_experts": sum(e["dead"] for e in layers.values()),
        "largest_share_mean": mean("largest_share"),
        "largest_share_max": max(e["largest_share"] for e in layers.values()),
        # one expert takes at least 90% of the layer's gate weight: the router has collapsed there
        "collapsed_layers": sum(e["largest_share"] >= COLLAPSED_SHARE for e in layers.values()),
        "router_entropy_mean": mean("router_entropy"),
        "load_entropy_mean": mean("load_entropy"),
        "load_entropy_min": min(e["load_entropy"] for e in layers.values()),
        "specialisation_mean": mean("specialisation"),
    }
    whole = mixture_health(report)  # molex-train's end-of-run numbers: dead share, collapse among E >= 4
    summary["dead_fraction"] = whole.dead_fraction
    summary["collapsed_layers_4plus"] = len(whole.collapsed_layers)
    return {"summary": summary, "task_names": list(report.task_names), "layers": layers}


@torch.no_grad()
def measure_run(
    base: nn.Module, dm: Any, adapter_dir: Path, *, logged: Mapping[str, Any], precision: str = "float32"
) -> dict[str, Any]:
    """Load the run's adapter onto ``base`` and measure it; ``base`` is returned to its original state.

    ``logged``: what the run logged at its end (``metrics.json``'s ``train``); its ``val/lm_loss`` (the
    LM loss alone, over the whole validation split at the last step) is used when present, otherwise
    the LM loss is computed here. ``precision``: ``"float32"`` or ``"bf16"`` for the forwards run here.
    """
    from molex.evaluation.analysis import collect_routing
    from molex.evaluation.generation import evaluate_loss

    model = molex.load_adapter(base, adapter_dir).eval()
    try:
        layers = molex.mole_layers(model)
        trainable = sum(p.numel() for p in molex.trainable_parameters(model))
        if "val/lm_loss" in logged:
            val_lm_loss, source = float(logged["val/lm_loss"]), "val/lm_loss logged at the last step"
        else:
            val_lm_loss = evaluate_loss(model, dm.val_dataloader(), precision=precision)
            source = "molex.evaluation.generation.evaluate_loss"
        report = collect_routing(
            model,
            dm.test_dataloader(),
            task_names=list(dm.task_names),
            per_task=ROUTING_PER_TASK,
            precision=precision,
        )
        # active rank of a layer: experts with a non-zero gate per real token x the experts' rank; experts
        # that share one A add up to a single rank-r update ((B_1 + B_2) A), however many are active, and
        # AdaMix evaluates its experts merged into one LoRA
        per_layer = [
            min(report.active[i], 1.0 if _single_update(layers[name]) else math.inf) * layers[name].experts.rank
            for i, name in enumerate(report.layers)
        ]
        mixture = any(layer.experts.num_experts > 1 for layer in layers.values())
        return {
            "trainable_params": trainable,
            "val_lm_loss": round(val_lm_loss, 5),
            "val_lm_loss_source": source,
            "active_rank": round(sum(per_layer) / len(per_layer), 3),
            "health": routing_health(report) if mixture else None,
        }
    finally:
        molex.unload(model)


def _single_update(layer: nn.Module) -> bool:
    """True when the layer's active experts form one rank-r update at evaluation (shared A, or merged)."""
    return bool(layer.experts.shares_a) or getattr(layer.active_router, "name", None) == "stochastic"
