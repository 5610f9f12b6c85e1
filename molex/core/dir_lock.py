"""An advisory lock per written folder, so that processes writing the same folder take turns.

A folder replaced as a whole (:func:`molex.core.files.replace_dir`) goes through transient siblings
that one writer creates and the next writer's recovery deletes. Two writers at once would delete
each other's siblings mid-write; the lock makes the second wait until the first has published
and cleaned up. It lives in ``.<name>.molex-lock`` beside the folder, is held with ``fcntl.flock``
(released by the system when the holder exits, even by ``SIGKILL``), and its file is removed again
when the holder is done, so a folder written by molex has no lasting sibling.

Removing a lock file another process may be waiting on is safe because every holder checks, once
it has the lock, that the path still names the file it locked (and starts over if not).

Where ``fcntl`` does not exist (Windows), there is no lock: saving works as before, one writer per
folder at a time. This module imports nothing of molex.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_SUFFIX", "dir_lock", "lock_path"]

LOCK_SUFFIX = ".molex-lock"
_held = threading.local()  # the lock paths this thread holds: a nested dir_lock of the same folder passes


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of the folder ``target``: ``.<name>.molex-lock`` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _held_paths() -> set[str]:
    if not hasattr(_held, "paths"):
        _held.paths = set()
    return _held.paths


def _acquire(path: Path, wait: bool) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or ``None`` if busy and not ``wait``."""
    flags = os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)  # read-only: flock needs no write access
    while True:
        fd = os.open(path, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)  # the previous holder removed this file as it finished: lock the one at the path now


@contextlib.contextmanager
def dir_lock(target: str | os.PathLike, *, wait: bool = True) -> Iterator[bool]:
    """Hold the lock of the folder ``target`` for the ``with`` block; yields whether it is held.

    Args:
        target: the folder (it need not exist; its parent is created if missing).
        wait: block until the lock is free (writers); with ``False`` yield ``False`` at once when another
            process holds it (a reader's optional cleanup, which must never wait for a writer).

    Nested use for the same folder in one thread passes through. Raises ``OSError`` when the lock file
    cannot be created (a read-only parent): a writer could not write there anyway.
    """
    path = lock_path(target)
    key = str(path)
    held = _held_paths()
    if key in held or fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, wait)
    if fd is None:
        yield False
        return
    held.add(key)
    try:
        yield True
    finally:
        held.discard(key)
        try:
            with contextlib.suppress(OSError):  # read-only parent: the empty lock file stays, harmless
                os.unlink(path)
        finally:
            os.close(fd)
