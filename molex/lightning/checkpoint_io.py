"""``AtomicCheckpointIO``: Lightning checkpoints that a kill during the write cannot corrupt.

Lightning's ``TorchCheckpointIO`` writes a local checkpoint through an fsspec transaction, whose temporary
file lives in the system temp folder: when that is another file system (a tmpfs ``/tmp``, a container
volume) the final step is a copy onto the checkpoint's own name, and a kill during the copy leaves a
truncated ``last.ckpt`` in place of the previous good one. Here the temporary file is a sibling of the
target and ``os.replace`` publishes it in one step, so the name always holds a complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from molex.core.files import atomic_write

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves each local checkpoint to a temporary name beside it, then renames it into place.

    A kill mid-save leaves the previous checkpoint of that name (or none) plus a hidden ``.<name>.*.tmp``
    file; the first save of this instance into a folder removes such leftovers of ``.ckpt`` files.
    Remote paths (``s3://``, ...) keep Lightning's own writer.
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent not in self._swept:
            self._swept.add(path.parent)
            # `atomic_write` names its temporary files `.<name>.<random>.tmp`
            for stale in path.parent.glob(".*.ckpt.*.tmp"):
                stale.unlink(missing_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
