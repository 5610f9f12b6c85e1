"""What a checkpoint must share with the run that resumes it: the MoLE configuration and the layer plan.

A checkpoint of a ``topk`` model loads into a ``soft`` one without a single missing key (both routers
are one linear gate), and would then be exported labelled ``soft``; a rank change fails deep inside
``load_state_dict``. :func:`resume_mismatch` compares the recorded configuration with the requested one
first and names every difference, so both cases stop with one line before training starts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from torch import nn

from molex.layer.config import flat_router_dict
from molex.layer.inject import get_config, get_plans
from molex.routers.base import get_router_class

__all__ = ["RESUME_FIELDS", "resume_mismatch", "training_record"]

#: MoLEConfig fields a resumed run must share with its checkpoint. ``kernel_backend`` and
#: ``autocast_adapter_dtype`` only change how the same function is computed; the base model's
#: path may legitimately move between runs (a different base shows up in the layer plan).
RESUME_FIELDS = (
    "router",
    "router_options",
    "top_k",
    "rank",
    "alpha",
    "use_rslora",
    "dropout",
    "num_experts",
    "allocation",
    "target_modules",
    "exclude_modules",
)


def training_record(model: nn.Module) -> dict[str, Any]:
    """``{"mole_config": MoLEConfig.to_dict(), "layers": [[name, num_experts, rank], ...]}`` of an injected model."""
    return {
        "mole_config": get_config(model).to_dict(),
        "layers": [[p.name, p.num_experts, p.rank] for p in get_plans(model)],
    }


def _plain(value: Any) -> Any:
    # tuples and lists compare equal after a JSON round trip (a checkpoint may hold either)
    return json.loads(json.dumps(value, default=str))


def _defaults_agree(old: dict[str, Any], new: dict[str, Any]) -> None:
    """An option present on one side only counts as equal when it holds the router's default there (an
    option added to the router after the checkpoint was written, which trained under that default)."""
    try:
        fields = dataclasses.fields(get_router_class(new.get("router")).config_class)
    except (ValueError, TypeError):
        return
    defaults = _plain({f.name: f.default for f in fields if f.default is not dataclasses.MISSING})
    mine, theirs = old.setdefault("router_options", {}), new.setdefault("router_options", {})
    for key, default in defaults.items():
        if key in mine and key not in theirs and mine[key] == default:
            theirs[key] = default
        elif key in theirs and key not in mine and theirs[key] == default:
            mine[key] = default


def _differences(name: str, saved: Any, wanted: Any) -> list[str]:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(wanted), key=str):
            out += _differences(f"{name}.{key}", saved.get(key), wanted.get(key))
        return out
    return [] if saved == wanted else [f"{name}: checkpoint {saved!r}, requested {wanted!r}"]


def resume_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """``None`` when a checkpoint's record matches the model about to resume from it, else one line naming
    each differing setting as ``field: checkpoint <value>, requested <value>``.

    Args:
        saved: the ``molex`` record of the checkpoint (at least its ``mole_config``).
        current: :func:`training_record` of the model that would resume.
    """
    # either router form (a checkpoint of molex 0.1 holds the flat one): compare the router setting by setting
    old, new = flat_router_dict(_plain(saved.get("mole_config", {}))), flat_router_dict(_plain(current["mole_config"]))
    fields = RESUME_FIELDS
    if old.get("router") == new.get("router"):
        _defaults_agree(old, new)
    else:  # another router: its name is the difference to report, not each of its options
        fields = tuple(f for f in RESUME_FIELDS if f not in ("router_options", "top_k"))
    diffs = [d for field in fields for d in _differences(field, old.get(field), new.get(field))]
    if not diffs and "layers" in saved and _plain(saved["layers"]) != _plain(current["layers"]):
        # the same settings on another base model (other layer names or sizes)
        changed = [
            f"{a[0]}: checkpoint {a[1]} experts of rank {a[2]}, requested {b[1]} of rank {b[2]}"
            for a, b in zip(_plain(saved["layers"]), _plain(current["layers"]), strict=False)
            if a != b
        ]
        count = len(saved["layers"]), len(current["layers"])
        diffs = changed[:3] or [f"MoLE layers: checkpoint {count[0]}, requested {count[1]}"]
    return "; ".join(diffs) if diffs else None
