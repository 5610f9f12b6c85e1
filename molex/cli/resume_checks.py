"""``ckpt_path=``: what ``molex-train`` checks before it resumes a run from a checkpoint.

The checkpoint must be a full MoLEModule checkpoint (weights, optimizer and schedule), trained with the
MoLE settings, data layout and router learning-rate scale the resumed run uses.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from molex.cli.common import CLIError, TrainingObjects
from molex.training.optim import OptimSettings

__all__ = [
    "check_resumable",
    "check_resume_matches",
    "check_router_lr_scale",
    "trained_router_lr_scale",
    "unreadable_checkpoint",
]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save (and so every Lightning checkpoint) writes a zip archive


def unreadable_checkpoint(path: str | Path, err: BaseException) -> str:
    """Why ``torch.load`` could not read the file ``path``, in words: torch's own errors for a file cut short
    (``OSError: [Errno 22]`` from its memory map, a zip "central directory" message) do not say so."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
        complete = zipfile.is_zipfile(path)
    except OSError as read_err:
        return f"{path} cannot be read ({read_err})"
    fix = (
        "point at a complete checkpoint (a run's checkpoints/last.ckpt; an interrupted save leaves the previous "
        "one there), or copy the file again if a copy or download was cut short"
    )
    if size == 0:
        return f"{path} is empty (0 bytes), not a checkpoint: {fix}"
    if head != _ZIP_MAGIC:
        return (
            f"{path} is not a checkpoint: it does not start like a torch.save archive ({size} bytes starting "
            f"{head!r}); {fix}"
        )
    if not complete:
        return f"{path} is truncated: the archive ends after {size} bytes, before its table of contents; {fix}"
    return f"{path} is not a readable checkpoint ({err.__class__.__name__}: {err}); {fix}"


def check_resumable(path: str) -> dict[str, Any]:
    """``ckpt_path`` must be a full MoLEModule checkpoint (weights, optimizer and schedule); returns it."""
    import torch

    if not Path(path).is_file():
        raise CLIError(f"ckpt_path={path!r}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CLIError(f"ckpt_path={path!r}: {unreadable_checkpoint(path, err)}") from None
    if "molex" not in checkpoint:
        raise CLIError(f"ckpt_path={path!r} was not written by molex-train / MoLEModule")
    if "optimizer_states" not in checkpoint:
        raise CLIError(
            f"ckpt_path={path!r} holds weights only (written with checkpoint.save_weights_only=true), so training "
            "cannot resume exactly; train with checkpoint.save_weights_only=false to get resumable checkpoints, "
            "or use the run's adapter/ with molex.load_adapter"
        )
    return checkpoint


def check_resume_matches(path: str, checkpoint: dict[str, Any], built: TrainingObjects) -> None:
    """The run must resume under the MoLE settings and data layout its checkpoint was trained with."""
    from molex.lightning.resume import resume_mismatch, training_record

    mismatch = resume_mismatch(checkpoint["molex"], training_record(built.model))
    if mismatch:
        raise CLIError(
            f"ckpt_path={path!r} was trained with other MoLE settings ({mismatch}); resume with the router, "
            "allocation and mole.* values it was trained with (its run's config.yaml lists them), or drop ckpt_path "
            "to start a new run"
        )
    data_state = checkpoint.get(type(built.datamodule).__qualname__)
    if data_state:
        try:
            built.datamodule.load_state_dict(data_state)
        except ValueError as err:
            raise CLIError(f"ckpt_path={path!r}: {err}") from None


def trained_router_lr_scale(checkpoint: dict[str, Any]) -> float:
    """The router learning-rate scale a checkpoint was trained with: ``hyper_parameters["optim"]`` since the
    settings became typed, the top-level ``router_lr_scale`` before; 1.0 when neither is there."""
    hparams = checkpoint.get("hyper_parameters") or {}
    optim = hparams.get("optim")
    if isinstance(optim, dict) and "router_lr_scale" in optim:
        return optim["router_lr_scale"]
    return hparams.get("router_lr_scale", 1.0)


def check_router_lr_scale(path: str, checkpoint: dict[str, Any], optim: OptimSettings) -> None:
    """Another scale regroups the optimizer's saved state: the resumed run must use the trained one."""
    trained = trained_router_lr_scale(checkpoint)
    if trained != optim.router_lr_scale:
        raise CLIError(
            f"ckpt_path={path!r} was trained with optim.router_lr_scale={trained}; resume with that value "
            f"(requested {optim.router_lr_scale})"
        )
