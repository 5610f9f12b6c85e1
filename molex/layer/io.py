"""Save and load MoLE adapters: ``adapter_config.json`` + ``adapter.safetensors`` (MoLE weights only).

A save publishes the config and the weights together by one folder rename
(:func:`molex.core.files.replace_dir`), so a process killed at any instant of a save leaves a folder
that loads as the complete previous adapter or the complete new one. The config names the weights'
checksum and carries ``format: "molex-adapter"``, the marker by which a later save recognises a
folder it may replace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from molex.allocation.plan import LayerPlan
from molex.core.files import (
    check_dir_target,
    dir_lock,
    read_json,
    refuse_foreign,
    replace_dir,
    require_file,
    sha256_file,
    tidy_dir,
    write_json,
)
from molex.core.model_argument import takes_model
from molex.layer.config import MoLEConfig, fill_saved_before, migrate_mole_dict
from molex.layer.experts import LoRAExperts
from molex.layer.inject import get_config, get_plans, inject, mole_layers, unload
from molex.routers.base import Router
from molex.routers.dlp_encoder import adapter_encoder_scope

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_state_dict", "load_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "molex-adapter"
#: 1: ``mole_config`` holds ``router: "<name>"``, ``router_options`` and ``top_k`` (molex 0.1);
#: 2: ``mole_config.router`` is ``{"name": <router name>, "options": {every router option}}``;
#: 3: as 2; an option a router gained since is read from an older adapter with the value that reproduces
#: how it routed when saved (the router config's ``SAVED_BEFORE`` defaults)
FORMAT_VERSION = 3


@takes_model
def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every expert pool and router tensor of ``model``, keyed by its ``state_dict`` name."""
    state: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoRAExperts, Router)):
            for key, value in module.state_dict().items():
                state[f"{name}.{key}"] = value
    return state


def _is_molex_adapter(directory: Path) -> bool:
    try:
        data = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


@takes_model
def save_adapter(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the MoLE config, the per-layer allocation and the MoLE weights of ``model`` to ``directory``.

    The folder is created if missing; other files in it are kept. A crash at any instant leaves it
    holding the complete previous adapter or the complete new one. A folder holding an adapter
    that molex did not write (e.g. PEFT's ``adapter_config.json``) is refused unless
    ``overwrite=True``. Returns ``directory``.
    """
    from molex import __version__

    directory = Path(directory)
    target = check_dir_target(directory, "save_adapter directory")
    config = get_config(model)
    layers = mole_layers(model)
    plans = [
        {
            "name": plan.name,
            "layer_index": plan.layer_index,
            "num_experts": plan.num_experts,
            "rank": plan.rank,
            "in_features": layers[plan.name].in_features,
            "out_features": layers[plan.name].out_features,
        }
        for plan in get_plans(model)
    ]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}

    def write(folder: Path) -> None:
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        # the config names the weights' checksum: a pair from two saves never loads
        write_json(
            folder / CONFIG_NAME,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "molex_version": __version__,
                "base_model_name_or_path": config.base_model_name_or_path,
                "mole_config": config.to_dict(),
                "layers": plans,
                "weights_sha256": sha256_file(folder / WEIGHTS_NAME),
            },
        )

    # one lock around the check and the write: a concurrent writer's half-published folder is never judged
    with dir_lock(target):
        refuse_foreign(
            target, (CONFIG_NAME, WEIGHTS_NAME), ours=_is_molex_adapter, overwrite=overwrite, what="save_adapter"
        )
        replace_dir(target, write, owned=(CONFIG_NAME, WEIGHTS_NAME))
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a molex adapter folder; ``ValueError`` if it is not one.

    A config of an older format version comes back in the current one (its ``mole_config`` migrated).
    """
    path = require_file(
        Path(directory) / CONFIG_NAME,
        f"no {CONFIG_NAME} in {directory}: is this a directory written by molex.save_adapter?",
    )
    data = read_json(path, fix="the adapter is corrupt, save it again")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a molex adapter config (missing format={FORMAT!r})")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {data['format_version']}; upgrade molex to read it")
    version = data.get("format_version", 0)
    if version < FORMAT_VERSION and isinstance(data.get("mole_config"), dict):
        mole = fill_saved_before(migrate_mole_dict(data["mole_config"]), version)
        data = {**data, "format_version": FORMAT_VERSION, "mole_config": mole}
    return data


def _read_weights(path: Path) -> dict[str, Tensor]:
    require_file(path, f"no {WEIGHTS_NAME} in {path.parent}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"cannot read {path}: {err}; the file is corrupt or not safetensors, save it again") from None


@takes_model
def load_adapter(
    base_model: nn.Module, directory: str | os.PathLike, *, allow_encoder_path: str | os.PathLike | None = None
) -> nn.Module:
    """Inject the saved MoLE configuration into ``base_model`` and load its weights, strictly.

    Raises a ``ValueError`` naming the key on any missing / unexpected key or shape mismatch;
    ``base_model`` is left untouched when loading fails. Siblings a save killed mid-way left beside the
    folder are cleaned up first where the folder is writable (:func:`molex.core.files.tidy_dir`).

    The config's sentence-encoder folder (router ``dlp``, ``encoder_path``) is followed only inside
    ``directory`` or an installed encoder package; ``allow_encoder_path`` names one more folder you
    trust it to load from (:mod:`molex.routers.dlp_encoder`).
    """
    if Path(directory).is_file():
        raise NotADirectoryError(
            f"{directory} is a file, not an adapter folder: molex.load_adapter reads the folder molex.save_adapter "
            "wrote (a training run's adapter/); a Lightning checkpoint (.ckpt) resumes training through "
            "molex-train ckpt_path=..."
        )
    directory = tidy_dir(directory)
    data = read_adapter_config(directory)
    config = MoLEConfig.from_dict(data["mole_config"])
    weights_path = directory / WEIGHTS_NAME
    expected_sha = data.get("weights_sha256")
    if expected_sha is not None and weights_path.is_file() and sha256_file(weights_path) != expected_sha:
        raise ValueError(
            f"{weights_path} does not match the checksum in {CONFIG_NAME}: the weights were modified or belong "
            "to another save; save the adapter again"
        )
    weights = _read_weights(weights_path)
    with adapter_encoder_scope(directory, allow_encoder_path):  # a dlp encoder_path must lie in an allowed folder
        model = inject(base_model, config)
    try:
        _check_plans(get_plans(model), data.get("layers", []))
        _load_strict(model, weights, directory)
    except Exception:
        unload(model)
        raise
    return model


def _check_plans(plans: list[LayerPlan], saved: list[dict[str, Any]]) -> None:
    built = {p.name: (p.num_experts, p.rank) for p in plans}
    stored = {entry["name"]: (entry["num_experts"], entry["rank"]) for entry in saved}
    if built != stored:
        missing = sorted(set(stored) - set(built))
        extra = sorted(set(built) - set(stored))
        differ = sorted(n for n in set(built) & set(stored) if built[n] != stored[n])
        raise ValueError(
            "the adapter's layers do not match this model: "
            + (f"layers in the adapter but not in the model: {missing[:5]}; " if missing else "")
            + (f"layers in the model but not in the adapter: {extra[:5]}; " if extra else "")
            + (f"different experts/rank: {differ[:5]}; " if differ else "")
            + "load it into the same base model architecture it was trained on"
        )


@torch.no_grad()
def _load_strict(model: nn.Module, weights: dict[str, Tensor], directory: Path) -> None:
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter in {directory} does not match the model: "
            + (f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
            + (f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; " if unexpected else "")
            + "it was saved from a different model or molex configuration"
        )
    for key, target in expected.items():
        value = weights[key]
        if value.shape != target.shape:
            raise ValueError(
                f"adapter key {key!r} has shape {tuple(value.shape)} but the model expects {tuple(target.shape)}: "
                "the adapter was saved for a base model of different dimensions"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"adapter key {key!r} holds NaN or inf values; the adapter is corrupt")
        target.copy_(value.to(dtype=target.dtype, device=target.device))
