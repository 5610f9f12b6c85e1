"""File helpers shared by everything that reads or writes to disk: atomic writes of one file or of
a whole folder, JSON, checksums, path checks.

This module imports nothing of molex, so any layer (adapter files, the LoRA hub, analytics plots,
the CLIs, benchmarks) can use it without pulling in models or routers. The folder protocol, and
the invariant it keeps at every instant, is described above :func:`replace_dir`; the lock that
makes writers of one folder take turns, and the marker of molex's scratch folders, above
:func:`dir_lock` and :func:`make_scratch`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SCRATCH_MARKER",
    "atomic_write",
    "check_dir_target",
    "dir_lock",
    "is_scratch",
    "make_scratch",
    "read_json",
    "readable_dir",
    "refuse_foreign",
    "remove_scratch",
    "replace_dir",
    "require_dir",
    "require_file",
    "sha256_file",
    "tidy_dir",
    "write_json",
]


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` alone would set
    it for an instant, racing with other threads creating files)."""
    with contextlib.suppress(OSError):  # not Linux, or no /proc: fall back to setting and restoring it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it into place.

    A crash mid-write leaves the old file (or none), never a half-written one. The file gets the
    permissions of the file it replaces, or those of a new file under the umask (``0644`` usually).
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; keep what a plain open() would have given
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(
    path: str | os.PathLike, data: Any, *, sort_keys: bool = True, default: Callable[[Any], Any] | None = None
) -> None:
    """Write ``data`` as indented JSON and a final newline, atomically. Keys are sorted unless ``sort_keys=False``
    (reports whose key order is their reading order); ``default`` converts values JSON does not know."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=sort_keys, default=default)
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


# -- one writer per folder at a time --------------------------------------------------------------
#
# Writers of one folder take turns under an advisory lock, ``.T.molex-lock`` beside the folder ``T``,
# held with ``fcntl.flock`` (released by the system when the holder exits, even by ``SIGKILL``). The
# holder removes the file when done, so a folder molex wrote has no lasting sibling; that is safe
# because each holder checks, once it has the lock, that the path still names the file it locked, and
# starts over if not. Without ``fcntl`` (Windows), or on a filesystem that refuses ``flock``, writers
# run unlocked (one writer per folder at a time) and readers skip their optional cleanup.

_LOCK = ".molex-lock"
_UNLOCKABLE = -1  # _acquire's answer where the filesystem has no flock
_held = threading.local()  # the lock files this thread holds: a nested dir_lock of the same folder passes


def _acquire(path: Path, wait: bool) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, ``None`` if busy and not ``wait``, or
    ``_UNLOCKABLE``."""
    flags = os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)  # flock needs no write access
    while True:
        fd = os.open(path, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            mine = os.fstat(fd)
            now = os.stat(path)
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:  # the previous holder removed the file as it finished: lock the next one
            os.close(fd)
            continue
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                return _UNLOCKABLE
            raise
        except BaseException:
            os.close(fd)
            raise
        if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)


@contextlib.contextmanager
def dir_lock(target: str | os.PathLike, *, wait: bool = True) -> Iterator[bool]:
    """Hold the lock of the folder ``target`` for the ``with`` block; yields whether it is held.

    ``wait=False`` yields ``False`` at once while another process holds it (a reader's optional cleanup
    must never wait for a writer). Nested use for one folder in one thread passes through. Raises
    ``OSError`` when the lock file cannot be created (a read-only parent, where no writer can write).
    """
    target = Path(target)
    path = target.parent / f".{target.name}{_LOCK}"
    held = _held.__dict__.setdefault("paths", set())
    if str(path) in held or (fcntl is None and wait):
        yield True
        return
    if fcntl is None:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, wait)
    if fd is None:  # busy, and the caller would rather not wait
        yield False
        return
    if fd == _UNLOCKABLE:  # writers go on unlocked, readers skip their cleanup
        with contextlib.suppress(OSError):
            os.unlink(path)
        yield wait
        return
    held.add(str(path))
    try:
        yield True
    finally:
        held.discard(str(path))
        with contextlib.suppress(OSError):  # a read-only parent keeps the empty file: harmless
            os.unlink(path)
        os.close(fd)


# -- scratch folders molex can prove it made ------------------------------------------------------
#
# A scratch folder (content being written, previous content moved aside, a folder being deleted)
# gets the marker file ``.molex-scratch`` naming the folder it serves before anything else. Cleanup
# after a killed writer deletes a folder only if it holds that marker for the same target, or holds
# nothing else (empty, or only a marker a kill cut short: nothing there can be lost), so a folder of
# the user's with a similar name is never deleted. Deleting one removes the marker last.

SCRATCH_MARKER = ".molex-scratch"


def _mark(folder: Path, target: Path) -> None:
    data = json.dumps({"format": "molex-scratch", "target": target.name}).encode()
    fd = os.open(folder / SCRATCH_MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)  # one write: a kill leaves the whole marker or an empty file
    finally:
        os.close(fd)


def _unmark(folder: Path) -> None:
    with contextlib.suppress(OSError):  # gone already, or a read-only folder: a stray marker is harmless
        os.unlink(folder / SCRATCH_MARKER)


def make_scratch(path: Path | None, target: Path, *, prefix: str = "") -> Path:
    """Create and mark a scratch folder for ``target``: ``path``, or with ``path=None`` a fresh
    ``<prefix>XXXXXXXX`` beside ``target``. Returns the folder."""
    if path is None:
        path = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    else:
        path.mkdir()
    _mark(path, target)
    return path


def is_scratch(folder: Path, target: Path) -> bool:
    """Whether ``folder`` is a real folder (no symlink) molex made for ``target``, or holds nothing."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        entries = os.listdir(folder)
        if not entries or entries == [SCRATCH_MARKER]:
            return True
        data = json.loads((folder / SCRATCH_MARKER).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == "molex-scratch" and data.get("target") == target.name


def remove_scratch(folder: Path) -> None:
    """Delete ``folder`` and all it holds, the marker last; what cannot be deleted is left."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            entry = folder / name
            if name == SCRATCH_MARKER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry)
        _unmark(folder)
        os.rmdir(folder)


# -- folders replaced as a whole ----------------------------------------------------------------
#
# A folder of several files (an adapter's config and weights) is published by ONE rename, so a
# process killed at any instant leaves the folder holding either the complete previous content or
# the complete new one. Beside the target folder ``T`` (same parent, so renames stay on one
# filesystem) live up to three transient siblings:
#
#   ``.T.molex-new``    the new content being written; complete once it is renamed or exchanged
#   ``.T.molex-old``    the previous ``T``, moved aside (only on the two-rename path below)
#   ``.T.molex-trash``  a finished sibling being deleted
#
# ``replace_dir`` runs these steps; each is atomic, so a kill falls between two of them:
#
#   0. lock: take the advisory lock ``.T.molex-lock`` (:func:`dir_lock`) for all the steps
#      below, so writers of one folder take turns instead of deleting each other's siblings.
#   1. recover: ``T`` missing and ``.old`` present -> rename ``.old`` back to ``T``; then delete
#      ``.new`` and ``.trash`` (a partial write, or content already superseded by ``T``) and a
#      ``.old`` that sits beside an existing ``T`` (each renamed to ``.trash`` first) -- only those
#      that hold molex's scratch marker for ``T`` (:func:`is_scratch`) or nothing at all.
#   2. write ``.new``: the marker first, then hard links (copies where links are not supported) of
#      every entry of ``T`` the writer does not own, then the writer's files; fsync them and the folder.
#   3. publish: with ``T`` absent, rename ``.new`` -> ``T``. With ``T`` present, mark ``T`` too (its
#      content is about to become a sibling), then exchange ``.new`` and ``T`` in one
#      ``renameat2(RENAME_EXCHANGE)`` (Linux); where the system or filesystem cannot, rename
#      ``T`` -> ``.old`` and then ``.new`` -> ``T``. Remove the marker from ``T``; fsync the parent.
#   4. clean up: rename the previous content (now ``.new`` or ``.old``) to ``.trash``, delete it
#      (marker last). Release the lock, removing its file.
#
# Invariant, at every instant: ``T`` is the complete old or the complete new folder, except in the
# window of the two-rename path between its two renames, where ``T`` is missing and ``.old`` is the
# complete old folder. ``.old`` exists ONLY in that window or, after step 3, beside the complete new
# ``T``: so "``T`` missing and ``.old`` present" always means ``.old`` is complete, which is what
# readers (``readable_dir``) and the next writer's recovery (step 1) rely on. ``.new`` and
# ``.trash`` are never read. Entries of ``T`` the writer does not own exist, at every instant, in
# ``T`` or ``.old``. Readers finish a killed writer's recovery when they can (:func:`tidy_dir`).

_NEW, _OLD, _TRASH = ".molex-new", ".molex-old", ".molex-trash"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _sibling(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}{suffix}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; ``False`` where the system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, some musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _fsync(path: Path) -> None:
    # directories can be fsynced on POSIX only; elsewhere a rename is as durable as the system makes it
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(source: Path, dest: Path, owned: Collection[str]) -> None:
    """Give ``dest`` every entry of ``source`` except ``owned`` names (and a stray scratch marker):
    hard links, not copies of data."""
    for entry in source.iterdir():
        if entry.name in owned or entry.name == SCRATCH_MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(dest / entry.name))


def _discard(path: Path, target: Path) -> None:
    """Delete the scratch folder ``path`` of ``target`` after renaming it to ``.trash``, so a half-deleted
    folder is always named so. A ``.trash`` molex cannot prove it made is left; ``path`` goes in place."""
    trash = _sibling(target, _TRASH)
    if path != trash and path.is_dir():
        if is_scratch(trash, target):
            remove_scratch(trash)
        if not trash.exists():
            os.rename(path, trash)
            path = trash
    remove_scratch(path)


def _recover(target: Path) -> None:
    """Step 1: bring ``target`` back after a writer was killed, and drop what that writer left -- only
    siblings that hold molex's scratch marker for ``target`` (or nothing)."""
    old, new, trash = (_sibling(target, s) for s in (_OLD, _NEW, _TRASH))
    if not target.exists() and old.is_dir() and not old.is_symlink():
        os.rename(old, target)  # a rename loses nothing: no proof needed to bring the previous content back
    for sibling in (trash, new, old):
        if (sibling is not old or target.exists()) and is_scratch(sibling, target):
            _discard(sibling, target)
    if target.is_dir():
        _unmark(target)  # a writer killed between publishing and removing the marker


def _leftovers(target: Path) -> bool:
    siblings = (_sibling(target, s) for s in (_NEW, _OLD, _TRASH, _LOCK))
    return any(p.exists() for p in siblings) or (target / SCRATCH_MARKER).exists()


def tidy_dir(target: str | os.PathLike) -> Path:
    """The folder to read for ``target`` (see :func:`readable_dir`), after finishing the recovery a
    killed writer left undone beside it, so loads clean up too.

    The cleanup never waits for a writer (one at work cleans up itself) and never fails the read:
    in a read-only folder, or while another process writes, it is skipped.
    """
    target = Path(target)
    resolved = target.resolve()  # where writers lock and leave their siblings
    if _leftovers(resolved):
        with contextlib.suppress(OSError), dir_lock(resolved, wait=False) as held:
            if held:
                _recover(resolved)
    return readable_dir(target)


def readable_dir(target: str | os.PathLike) -> Path:
    """The folder to read for ``target``: ``target`` itself, or its complete previous content when a
    writer of :func:`replace_dir` was killed in the instant between its two renames."""
    target = Path(target)
    old = _sibling(target, _OLD)
    if not target.exists() and old.is_dir():
        return old
    return target


def check_dir_target(target: str | os.PathLike, what: str) -> Path:
    """``target`` resolved (symlinks followed) if :func:`replace_dir` may replace it.

    Raises ``NotADirectoryError`` for an existing file and ``ValueError`` for a filesystem root or
    a folder holding the working directory (replacing it would pull the directory from under the
    process).

    Args:
        target: the folder to write.
        what: the caller's name for the folder (e.g. ``"save_adapter directory"``) for messages.
    """
    given = Path(target)
    if given.exists() and not given.is_dir():
        raise NotADirectoryError(
            f"{what} {str(given)!r} is a file, not a folder: pass a folder path (it is created if missing)"
        )
    resolved = given.resolve()
    if resolved.parent == resolved:
        raise ValueError(f"{what} {str(given)!r} is a filesystem root: pass a dedicated folder")
    cwd = Path.cwd().resolve()
    if cwd == resolved or resolved in cwd.parents:
        raise ValueError(
            f"{what} {str(given)!r} is the working directory or contains it, and the folder is replaced as a "
            "whole when written: pass a dedicated folder, e.g. ./adapter"
        )
    return resolved


def replace_dir(target: str | os.PathLike, write: Callable[[Path], None], *, owned: Collection[str]) -> Path:
    """Make ``target`` a folder holding what ``write(folder)`` writes, published by one rename.

    ``write`` receives a sibling folder holding no entry named in ``owned`` and writes the files
    named in ``owned`` into it; every other entry already in ``target`` (a README, ``.git``, ...)
    is kept, as a hard link (or copy) in the new folder. A kill at any instant leaves ``target``
    readable (through :func:`readable_dir`) as the complete old or the complete new content, see
    the protocol above; an exception in ``write`` leaves ``target`` untouched. Returns ``target``
    resolved (symlinks followed, so a symlinked folder is written where it points).
    """
    target = check_dir_target(target, "folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    with dir_lock(target):
        _replace_locked(target, write, owned)
    return target


def _replace_locked(target: Path, write: Callable[[Path], None], owned: Collection[str]) -> None:
    new, old = _sibling(target, _NEW), _sibling(target, _OLD)
    _recover(target)
    for sibling in (new, old):
        if sibling.exists() or sibling.is_symlink():  # recovery spared it: molex cannot prove it made it
            raise FileExistsError(
                f"{sibling} is in the way of writing {target} and molex did not make it; move it elsewhere "
                "(molex uses that name for the folder's transient content) and save again"
            )
    make_scratch(new, target)
    try:
        if target.is_dir():
            _carry_over(target, new, owned)
        write(new)
        for name in owned:
            if (new / name).is_file():
                _fsync(new / name)
        _fsync(new)
    except BaseException:
        remove_scratch(new)
        raise
    if not target.exists():
        os.rename(new, target)
    else:
        with contextlib.suppress(OSError):  # a folder molex may not write into: a kill now leaves it beside
            _mark(target, target)
        if _exchange(new, target):
            old = new  # the exchange left the previous content where the new one was
        else:
            os.rename(target, old)
            os.rename(new, target)
    _unmark(target)
    _fsync(target.parent)
    _discard(old, target)


def refuse_foreign(
    target: str | os.PathLike, owned: Collection[str], *, ours: Callable[[Path], bool], overwrite: bool, what: str
) -> None:
    """``FileExistsError`` if writing ``owned`` into ``target`` would replace files another tool wrote.

    ``ours(target)`` tells whether the files named ``owned`` already in ``target`` were written by
    this writer (a marker in them); ``overwrite=True`` lets the writer replace them anyway.
    """
    target = Path(target)
    if overwrite or not target.is_dir():
        return
    present = sorted(name for name in owned if (target / name).exists())
    if present and not ours(target):
        raise FileExistsError(
            f"{target} holds {', '.join(present)} that molex did not write (another tool's adapter?); "
            f"{what} refuses to replace them: choose another folder, or pass overwrite=True to replace them"
        )
