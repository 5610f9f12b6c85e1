"""Several real processes on one adapter folder: concurrent savers take turns, and a load after a save
killed with ``SIGKILL`` cleans up what the save left beside the folder.

The concurrent savers come from a fork server (a fresh interpreter that imports molex once, so they
are independent programs that start in well under a second); the killed savers are forked, so a kill
can land at any instant of a save within milliseconds of starting.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import queue
import random
import shutil
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import molex
from molex.core import files
from molex.core.files import SCRATCH_MARKER
from tests.helpers.saving import adapter_model, adapter_state, load_state, matching, save_rounds, siblings

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs fork and SIGKILL")

ROUNDS, SAVES = 3, 12


def test_concurrent_savers_take_turns_and_leave_one_loadable_adapter(tmp_path):
    """Two processes save their own adapter into one folder at once, many times per round: none sees an
    error, and after every round the folder loads as one of the two adapters, with nothing beside it."""
    target = tmp_path / "adapter"
    expected = {"a": adapter_state(adapter_model(1)), "b": adapter_state(adapter_model(2))}
    # fresh interpreters, like separate programs; forked from one that imported molex and torch once
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["molex", "tests.helpers.saving", "transformers.models.llama"])
    barrier, errors = ctx.Barrier(3), ctx.Queue()
    workers = [
        ctx.Process(target=save_rounds, args=(str(target), seed, ROUNDS, SAVES, barrier, errors)) for seed in (1, 2)
    ]
    for worker in workers:
        worker.start()
    try:
        seen = []
        for _ in range(ROUNDS):
            barrier.wait(timeout=120)  # both saving now
            barrier.wait(timeout=120)  # both done with this round
            seen.append(matching(load_state(target), expected))
            assert siblings(target) == []
    finally:
        barrier.abort()  # a failed round must not leave the savers waiting for it
        for worker in workers:
            worker.join(timeout=60)
    failures = []
    with pytest.raises(queue.Empty):
        while True:
            failures.append(errors.get(timeout=0.5))
    assert failures == [], "\n".join(failures)
    assert [w.exitcode for w in workers] == [0, 0]
    assert set(seen) <= {"a", "b"} and len(seen) == ROUNDS


def test_threads_of_one_process_take_turns(tmp_path):
    """The lock works between threads too (each holds its own lock file descriptor)."""
    import threading

    target = tmp_path / "adapter"
    models = {"a": adapter_model(1), "b": adapter_model(2)}
    expected = {name: adapter_state(model) for name, model in models.items()}
    failures: list[BaseException] = []

    def saves(model: torch.nn.Module) -> None:
        try:
            for _ in range(SAVES):
                molex.save_adapter(model, target)
        except BaseException as err:  # reported by the assertion below
            failures.append(err)

    threads = [threading.Thread(target=saves, args=(model,)) for model in models.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    matching(load_state(target), expected)
    assert siblings(target) == []


def _fork_saving(saves, mode: str, done_w: int) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns to pytest
        try:
            torch.set_num_threads(1)
            if mode == "two-renames":
                files._exchange = lambda a, b: False
            for i in range(10**6):
                saves[i % 2]()
                os.write(done_w, b".")
        finally:
            os._exit(1)
    return pid


@pytest.mark.parametrize("mode", ["exchange", "two-renames"])
def test_load_after_a_killed_save_removes_its_siblings(tmp_path, mode):
    """SIGKILL at random instants of repeated saves, then only a load: the adapter loads as one of the two
    and nothing molex left stays beside it, on both publishing paths."""
    a, b = adapter_model(1), adapter_model(2)
    expected = {"a": adapter_state(a), "b": adapter_state(b)}
    target = tmp_path / "adapter"
    saves = [lambda: molex.save_adapter(a, target), lambda: molex.save_adapter(b, target)]
    saves[0]()
    start = time.perf_counter()
    saves[1]()
    one_save = time.perf_counter() - start
    rng = random.Random(0 if mode == "exchange" else 1)
    left = left_folders = 0
    for _ in range(20):
        done_r, done_w = os.pipe()
        pid = _fork_saving(saves, mode, done_w)
        os.close(done_w)
        for _ in range(rng.randrange(2)):
            os.read(done_r, 1)
        time.sleep(rng.uniform(0, 1.2 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.close(done_r)
        os.waitpid(pid, 0)
        left += bool(siblings(target))
        left_folders += any(not name.endswith(".molex-lock") for name in siblings(target))
        matching(load_state(target), expected)
        assert siblings(target) == []
        assert not (target / SCRATCH_MARKER).exists()
    print(f"{mode}: {left} of 20 kills left siblings ({left_folders} a folder), each removed by the next load")
    assert left_folders  # the kills did leave transient folders for the loads to clean up


def test_cleanup_spares_siblings_molex_cannot_prove_it_made(tmp_path):
    """A folder of the user's named like a transient sibling, without molex's marker, is never deleted:
    a load leaves it, a save leaves it or, where molex needs that name, refuses with its path."""
    target = tmp_path / "adapter"
    molex.save_adapter(adapter_model(1), target)
    theirs = {suffix: tmp_path / f".adapter{suffix}" for suffix in (".molex-new", ".molex-old", ".molex-trash")}
    for folder in theirs.values():
        folder.mkdir()
        (folder / "mine.txt").write_text("keep", encoding="utf-8")
    matching(load_state(target), {"a": adapter_state(adapter_model(1))})
    model = adapter_model(2)
    for suffix in (".molex-new", ".molex-old"):
        with pytest.raises(FileExistsError, match=rf"\.adapter\{suffix} is in the way of writing .*move it elsewhere"):
            molex.save_adapter(model, target)
        assert (theirs[suffix] / "mine.txt").read_text(encoding="utf-8") == "keep"
        theirs[suffix].rename(tmp_path / f"moved{suffix}")
    molex.save_adapter(model, target)  # the .molex-trash look-alike is only stepped around
    matching(load_state(target), {"b": adapter_state(model)})
    assert (theirs[".molex-trash"] / "mine.txt").read_text(encoding="utf-8") == "keep"
    assert siblings(target) == [".adapter.molex-trash"]


def _leave_siblings(target: Path) -> None:
    """A save killed between its two renames: ``target`` missing, ``.old`` (complete) and ``.new`` beside it."""
    molex.save_adapter(adapter_model(1), target)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            files._exchange = lambda a, b: False
            real = os.rename

            def rename(src, dst):
                real(src, dst)
                if Path(dst).name.endswith(".molex-old"):
                    os.kill(os.getpid(), signal.SIGKILL)

            os.rename = rename
            molex.save_adapter(adapter_model(2), target)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and not target.exists() and siblings(target)


def test_load_in_a_read_only_folder_still_loads(tmp_path):
    """Cleanup that the filesystem refuses (a read-only parent) must not break the load."""
    parent = Path(tempfile.mkdtemp(prefix="molex-ro-"))  # outside pytest's private tmp, readable by anyone
    try:
        target = parent / "adapter"
        _leave_siblings(target)
        before = siblings(target)
        for path in [parent, *parent.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: drop root, which ignores permissions
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                state = load_state(target)
                os.write(write, b"a" if matching(state, {"a": adapter_state(adapter_model(1))}) else b"?")
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            answer = pipe.read()
        os.waitpid(pid, 0)
        assert answer == b"a"  # the complete previous adapter, read from beside the missing folder
        assert siblings(target) == before  # nothing could be cleaned, and nothing failed
    finally:
        for path in [parent, *parent.rglob("*")]:
            path.chmod(stat.S_IRWXU)
        shutil.rmtree(parent)


class _RefusingFcntl:
    """``fcntl`` as on a filesystem without ``flock`` support (some network and FUSE filesystems)."""

    LOCK_EX, LOCK_NB = 2, 4

    @staticmethod
    def flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))


@pytest.mark.parametrize("fcntl", [None, _RefusingFcntl], ids=["no fcntl", "flock refused"])
def test_saving_where_there_is_no_lock_still_works(tmp_path, monkeypatch, fcntl):
    """Without fcntl (Windows) or flock, saving runs unlocked, one writer at a time, as it always did, and a
    load leaves a killed save's siblings to the next save (it cannot tell whether a writer is at work)."""
    target = tmp_path / "adapter"
    _leave_siblings(target)

    def transient() -> list[str]:  # the killed save's lock file is no concern where nothing locks
        return [name for name in siblings(target) if not name.endswith(".molex-lock")]

    left = transient()
    assert left
    monkeypatch.setattr(files, "fcntl", fcntl)
    assert matching(load_state(target), {"a": adapter_state(adapter_model(1))}) == "a"
    assert transient() == left
    model = adapter_model(3)
    molex.save_adapter(model, target)
    molex.save_adapter(model, target)
    matching(load_state(target), {"c": adapter_state(model)})
    assert transient() == []
