"""Read and write LoRA adapters in PEFT's on-disk format, without importing peft.

A PEFT LoRA adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``,
``target_modules``, ``use_rslora``, ``fan_in_fan_out``, ``rank_pattern``, ``alpha_pattern``, ...)
and ``adapter_model.safetensors`` (or the older ``adapter_model.bin``). Weights are keyed
``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``
(PEFT strips the adapter name when saving). ``fan_in_fan_out`` only says how the *base* weight is
laid out (GPT-2 ``Conv1D``); the LoRA factors have the same layout either way.

:func:`write_peft_adapter` publishes config and weights together by one folder rename
(:func:`molex.core.files.replace_dir`) and marks its weights file's safetensors metadata with
``written_by: molex`` (PEFT ignores metadata), so that only adapters molex wrote are replaced
without ``overwrite=True``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from molex.core.files import (
    check_dir_target,
    read_json,
    readable_dir,
    refuse_foreign,
    replace_dir,
    require_dir,
    require_file,
    write_json,
)

__all__ = [
    "PEFT_BIN_NAME",
    "PEFT_CONFIG_NAME",
    "PEFT_SAFETENSORS_NAME",
    "LoraFactors",
    "PeftLoraAdapter",
    "check_output_dir",
    "peft_adapter_files",
    "read_peft_adapter",
    "write_adapter_files",
    "write_peft_adapter",
]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_SAFETENSORS_NAME = "adapter_model.safetensors"
PEFT_BIN_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_MARKER = {"format": "pt", "written_by": "molex"}


@dataclass
class LoraFactors:
    """One module's LoRA: ``delta_W = scaling * B @ A`` with ``A [r, in]``, ``B [out, r]``."""

    A: Tensor
    B: Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self) -> Tensor:
        """``[out, in]`` weight update of this module (in the factors' dtype)."""
        return self.scaling * (self.B @ self.A)


@dataclass
class PeftLoraAdapter:
    """A PEFT LoRA adapter read from disk: its config and ``{module path: LoraFactors}``."""

    name: str
    path: Path | None
    config: dict[str, Any]
    modules: dict[str, LoraFactors] = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str] | str:
        return self.config["target_modules"]


def _fail(name: str, path: Path, message: str) -> ValueError:
    return ValueError(f"adapter {name!r} ({path}): {message}")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule (peft.utils.other.get_pattern_key): a key is a regex matching a dotted suffix
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(name: str, path: Path) -> dict[str, Any]:
    require_dir(path, f"adapter {name!r}: {path} is not a directory (expected a PEFT adapter directory)")
    config_path = require_file(
        path / PEFT_CONFIG_NAME, f"adapter {name!r}: no {PEFT_CONFIG_NAME} in {path}; is it a PEFT adapter directory?"
    )
    try:
        config = read_json(config_path, fix="the adapter is corrupt")
    except ValueError as err:
        raise _fail(name, path, str(err)) from None
    if not isinstance(config, dict):
        raise _fail(name, path, f"{PEFT_CONFIG_NAME} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise _fail(name, path, f"peft_type is {peft_type!r}; only LoRA adapters can be fused")
    unsupported = {
        "use_dora": "DoRA magnitude vectors",
        "modules_to_save": "fully trained modules (modules_to_save)",
        "layer_replication": "layer replication",
        "lora_bias": "LoRA biases",
        "trainable_token_indices": "trainable tokens",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise _fail(name, path, f"uses {what} ({key}={config[key]!r}), which a LoRA expert cannot hold")
    if config.get("bias", "none") != "none":
        raise _fail(name, path, f"trains biases (bias={config['bias']!r}); only bias='none' adapters can be fused")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise _fail(name, path, f"{PEFT_CONFIG_NAME} lacks {key!r}")
    if isinstance(config["target_modules"], (list, tuple)):
        config["target_modules"] = list(config["target_modules"])
    elif not isinstance(config["target_modules"], str):
        raise _fail(name, path, f"target_modules must be a list or a regex string, got {config['target_modules']!r}")
    if int(config["r"]) < 1:
        raise _fail(name, path, f"r must be >= 1, got {config['r']}")
    return config


def _read_tensors(name: str, path: Path) -> dict[str, Tensor]:
    st, binary = path / PEFT_SAFETENSORS_NAME, path / PEFT_BIN_NAME
    if st.is_file():
        try:
            with safe_open(str(st), framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise _fail(name, path, f"cannot read {st.name} ({err}); the file is corrupt") from None
    if binary.is_file():
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            raise _fail(
                name,
                path,
                f"cannot read {binary.name} as plain tensors ({type(err).__name__}: {err}); convert it to safetensors",
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise _fail(name, path, f"{binary.name} does not hold a flat dict of tensors")
        return state
    raise FileNotFoundError(f"adapter {name!r}: no {PEFT_SAFETENSORS_NAME} or {PEFT_BIN_NAME} in {path}")


def read_peft_adapter(path: str | os.PathLike, name: str | None = None) -> PeftLoraAdapter:
    """Read a PEFT LoRA adapter directory into :class:`PeftLoraAdapter` (CPU, stored dtype).

    Checks the file structure (both factors per module, matching ranks, finite values, ``r`` /
    ``rank_pattern`` agree with the weights); checking against a base model is the caller's job.
    """
    path = Path(path)
    name = name or path.name
    config = _read_config(name, readable_dir(path))
    tensors = _read_tensors(name, readable_dir(path))
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        stripped = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        match = _KEY.match(stripped)
        if match is None:
            raise _fail(
                name,
                path,
                f"holds tensor {key!r}, which is not a LoRA factor (lora_A / lora_B); "
                "embedding LoRA, DoRA and saved modules cannot be fused",
            )
        pairs.setdefault(match["module"], {})[match["which"]] = value
    if not pairs:
        raise _fail(name, path, "holds no LoRA weights")
    alpha_default, rank_default = float(config["lora_alpha"]), int(config["r"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules: dict[str, LoraFactors] = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise _fail(name, path, f"module {module!r} has no {missing} weight; the adapter is incomplete")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise _fail(
                name,
                path,
                f"module {module!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not "
                "[r, in] and [out, r] with one rank",
            )
        rank = A.shape[0]
        expected_rank = int(_pattern_value(rank_pattern, module, rank_default))
        if rank != expected_rank:
            raise _fail(name, path, f"module {module!r} has rank {rank} but the config says r={expected_rank}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise _fail(name, path, f"module {module!r} holds NaN or inf values; the adapter is corrupt")
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
        scaling = alpha / (rank**0.5 if config.get("use_rslora", False) else rank)
        modules[module] = LoraFactors(A=A, B=B, scaling=scaling)
    return PeftLoraAdapter(name=name, path=path, config=config, modules=modules)


#: the files write_peft_adapter writes, and the only ones it replaces
_OWNED = (PEFT_CONFIG_NAME, PEFT_SAFETENSORS_NAME)


def _written_by_molex(directory: Path) -> bool:
    try:
        with safe_open(str(directory / PEFT_SAFETENSORS_NAME), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # missing, truncated or not safetensors: not a file molex wrote
        return False
    return metadata.get("written_by") == _MARKER["written_by"] and (directory / PEFT_CONFIG_NAME).is_file()


def check_output_dir(directory: str | os.PathLike, *, overwrite: bool) -> None:
    """Raise the error :func:`write_peft_adapter` would raise for ``directory``, before any work is done."""
    check_dir_target(directory, "adapter output folder")
    refuse_foreign(directory, _OWNED, ours=_written_by_molex, overwrite=overwrite, what="writing a PEFT adapter")


def peft_adapter_files(
    modules: Mapping[str, tuple[Tensor, Tensor]],
    *,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
    task_type: str | None = "CAUSAL_LM",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, config)`` of a PEFT LoRA adapter with scaling 1 from ``{module: (A [r, in], B [out, r])}``.

    Every module's scaling is already folded into its factors: ``lora_alpha = r`` per module
    (``rank_pattern`` / ``alpha_pattern`` name the modules whose rank differs from the most
    common one), so PEFT computes ``delta_W = B @ A``. :func:`write_adapter_files` writes them.
    """
    if not modules:
        raise ValueError("a PEFT adapter needs at least one module")
    ranks = {module: A.shape[0] for module, (A, _) in modules.items()}
    values = list(ranks.values())
    common = max(set(values), key=values.count)
    # anchored, escaped full paths: PEFT matches pattern keys as regexes against dotted suffixes
    pattern = {re.escape(m): r for m, r in ranks.items() if r != common}
    tensors: dict[str, Tensor] = {}
    for module, (A, B) in modules.items():
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"module {module!r}: A {tuple(A.shape)} and B {tuple(B.shape)} are not [r, in], [out, r]")
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = A.detach().to("cpu").contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = B.detach().to("cpu").contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    return tensors, config


def write_adapter_files(folder: Path, tensors: Mapping[str, Tensor], config: Mapping[str, Any]) -> None:
    """Write the files of :func:`peft_adapter_files` into ``folder`` (no publishing step: the caller's
    :func:`~molex.core.files.replace_dir` publishes the folder it writes in). The weights carry molex's marker."""
    save_file(dict(tensors), folder / PEFT_SAFETENSORS_NAME, metadata=_MARKER)
    write_json(folder / PEFT_CONFIG_NAME, dict(config))


def write_peft_adapter(
    directory: str | os.PathLike,
    modules: Mapping[str, tuple[Tensor, Tensor]],
    *,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
    task_type: str | None = "CAUSAL_LM",
    overwrite: bool = False,
    extra_json: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{module path: (A [r, in], B [out, r])}`` as a PEFT LoRA adapter with scaling 1.

    Every module's scaling is already folded into its factors (see :func:`peft_adapter_files`).
    ``extra_json``: ``{file name: data}`` JSON files published together with the adapter (a report).
    A crash at any instant leaves ``directory`` holding the complete previous adapter or the
    complete new one; other files in it are kept. An adapter there that molex did not write is
    refused unless ``overwrite=True``.
    """
    if not modules:
        raise ValueError("write_peft_adapter needs at least one module")
    directory = Path(directory)
    check_output_dir(directory, overwrite=overwrite)
    tensors, config = peft_adapter_files(
        modules, base_model_name_or_path=base_model_name_or_path, fan_in_fan_out=fan_in_fan_out, task_type=task_type
    )
    extra = dict(extra_json or {})
    clash = sorted(set(extra) & set(_OWNED))
    if clash:
        raise ValueError(f"extra_json may not name the adapter's own files {clash}")

    def write(folder: Path) -> None:
        write_adapter_files(folder, tensors, config)
        for name, data in extra.items():
            write_json(folder / name, data)

    replace_dir(directory, write, owned=(*_OWNED, *extra))
    return directory
