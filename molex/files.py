"""File helpers shared by everything that reads or writes to disk: atomic writes, JSON, checksums, path checks.

This module imports nothing of molex, so any layer (adapter files, the LoRA hub, analytics plots,
the CLIs, benchmarks) can use it without pulling in models or routers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "write_json", "read_json", "sha256_file", "require_dir", "require_file"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it into place.

    A crash mid-write leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON with sorted keys and a final newline, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def read_json(path: str | os.PathLike, *, fix: str) -> Any:
    """Parse the JSON file ``path``; a file that is not JSON raises one ``ValueError`` ending in ``fix``.

    Args:
        path: the file to read (it must exist; check with :func:`require_file` first).
        fix: what the user should do about a corrupt file, e.g. ``"save the adapter again"``.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_dir(path: str | os.PathLike, message: str) -> Path:
    """``Path(path)`` if it is a directory; otherwise ``FileNotFoundError(message)``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(message)
    return path


def require_file(path: str | os.PathLike, message: str) -> Path:
    """``Path(path)`` if it is a regular file; otherwise ``FileNotFoundError(message)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(message)
    return path
