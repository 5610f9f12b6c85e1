"""The settings :class:`~molex.lightning.MoLEModule` trains with, from its keyword arguments.

``MoLEModule(model, optim=OptimSettings(...), health=HealthSettings(...))`` is the typed form. The flat
keywords of earlier versions (``learning_rate=``, ``router_lr_scale=``, ``log_routing_every_n_steps=``,
``health_collapse_share=`` ...) are still accepted and turned into the two settings here, once; mixing a
flat keyword with the settings it belongs to is refused, naming the typed spelling. Dicts (the
``hyper_parameters`` of a checkpoint) become settings too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from molex.lightning.health import HealthSettings
from molex.training.optim import OptimSettings

__all__ = ["FLAT_HEALTH", "FLAT_OPTIM", "module_settings"]

#: earlier flat keyword -> OptimSettings field
FLAT_OPTIM = {
    "learning_rate": "lr",
    "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps",
    "min_lr_ratio": "min_lr_ratio",
    "betas": "betas",
    "router_lr_scale": "router_lr_scale",
}
#: earlier flat keyword -> HealthSettings field
FLAT_HEALTH = {
    "log_routing_every_n_steps": "log_every_n_steps",
    "health_collapse_share": "collapse_share",
    "health_collapse_logs": "collapse_logs",
}
#: MoLEModule's defaults where they differ from the settings' own (its schedule decays to a tenth)
_MODULE_OPTIM_DEFAULTS = {"lr": 1e-3, "min_lr_ratio": 0.1}


def _settings(kind: type, given: Any, flat: dict[str, Any], defaults: Mapping[str, Any], arg: str) -> Any:
    if given is not None and flat:
        spelled = ", ".join(f"{field}=" for field in flat)
        raise TypeError(
            f"MoLEModule got {arg}= and also flat keywords for its fields ({spelled}): set them in "
            f"{arg}={kind.__name__}(...) alone"
        )
    if isinstance(given, kind):
        return given
    if given is None:
        return kind(**{**defaults, **flat})
    if isinstance(given, Mapping):
        return kind(**dict(given))
    raise TypeError(
        f"MoLEModule {arg}= must be a {kind.__name__} (or a dict of its fields), got {type(given).__name__}"
    )


def module_settings(
    optim: OptimSettings | Mapping[str, Any] | None,
    health: HealthSettings | Mapping[str, Any] | None,
    flat: Mapping[str, Any],
) -> tuple[OptimSettings, HealthSettings]:
    """``(optim, health)`` for MoLEModule: the given settings as they are, or built once from the flat keywords.

    Raises ``TypeError`` for an unknown keyword or a mix of forms, ``ValueError`` (the settings' own
    message) for a bad value, and refuses ``max_grad_norm``: under Lightning the trainer clips.
    """
    unknown = sorted(set(flat) - set(FLAT_OPTIM) - set(FLAT_HEALTH))
    if unknown:
        raise TypeError(
            f"MoLEModule got unexpected keyword(s) {unknown}; it takes model=, mole_config=, "
            "optim=OptimSettings(...) and health=HealthSettings(...)"
        )
    flat_optim = {FLAT_OPTIM[k]: v for k, v in flat.items() if k in FLAT_OPTIM}
    flat_health = {FLAT_HEALTH[k]: v for k, v in flat.items() if k in FLAT_HEALTH}
    optim_settings = _settings(OptimSettings, optim, flat_optim, _MODULE_OPTIM_DEFAULTS, "optim")
    health_settings = _settings(HealthSettings, health, flat_health, {}, "health")
    if optim_settings.max_grad_norm is not None:
        raise ValueError(
            f"optim.max_grad_norm={optim_settings.max_grad_norm}: under Lightning the trainer clips gradients; "
            "set the Trainer's gradient_clip_val instead and leave max_grad_norm=None"
        )
    return optim_settings, health_settings
