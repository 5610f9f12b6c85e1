"""Scratch folders that molex can prove it made, so that cleaning up after a killed writer never deletes a
folder of the user's that merely has a similar name.

A scratch folder (the content of a folder being written, the previous content moved aside, a folder
being deleted) gets the marker file ``.molex-scratch`` first, naming the folder it serves. Cleanup
deletes a sibling only if it holds that marker naming the same target, or holds nothing else (an empty
folder, or one whose only file is a marker cut short by a kill: nothing there can be lost). Deleting a
scratch folder removes the marker last, so a kill during the deletion leaves a folder that still
proves its origin. This module imports nothing of molex.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["MARKER", "is_scratch", "make_scratch", "mark", "remove_scratch", "unmark"]

MARKER = ".molex-scratch"
_FORMAT = "molex-scratch"


def mark(folder: Path, target: Path) -> None:
    """Write the marker naming ``target`` into the existing ``folder`` in one ``write``."""
    data = json.dumps({"format": _FORMAT, "target": target.name}).encode()
    fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def unmark(folder: Path) -> None:
    """Remove the marker from ``folder`` if it has one (a published folder keeps none)."""
    with contextlib.suppress(OSError):  # gone already, or a read-only folder: a stray marker is harmless
        os.unlink(folder / MARKER)


def make_scratch(path: Path | None, target: Path, *, prefix: str = "") -> Path:
    """Create a scratch folder for ``target`` and mark it; ``path=None`` picks a fresh name
    ``<prefix>XXXXXXXX`` beside ``target``. Returns the folder."""
    if path is None:
        path = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    else:
        path.mkdir()
    mark(path, target)
    return path


def is_scratch(folder: Path, target: Path) -> bool:
    """Whether ``folder`` is a real folder (not a symlink) that molex made for ``target``, or holds nothing."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        entries = os.listdir(folder)
    except OSError:
        return False
    if not entries or entries == [MARKER]:
        return True
    try:
        data = json.loads((folder / MARKER).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == _FORMAT and data.get("target") == target.name


def remove_scratch(folder: Path) -> None:
    """Delete ``folder`` and everything in it, the marker last; what cannot be deleted is left."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for name in entries:
        if name == MARKER:
            continue
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry)
    unmark(folder)
    with contextlib.suppress(OSError):
        os.rmdir(folder)
