"""Saves survive SIGKILL at any instant: the folder loads as the complete old or the complete new adapter.

Children are forked (the parent has already imported torch, so a child starts in milliseconds) and
killed with a real ``SIGKILL``: at random moments while saving in a loop, and at every filesystem
step of one save. Both publishing paths are covered: the one-step exchange (``renameat2``) and the
two-rename path used where the system cannot exchange.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import molex
from molex.core import files
from molex.hub.peft_format import read_peft_adapter, write_peft_adapter
from tests.helpers.models import tiny_llama
from tests.helpers.saving import adapter_model, adapter_state

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs fork and SIGKILL")

KILLS = 24
MODES = ["exchange", "two-renames"]


def _which(state: dict[str, torch.Tensor], candidates: dict[str, dict[str, torch.Tensor]]) -> str:
    """The name of the candidate ``state`` equals on every tensor; fails if none does."""
    for name, expected in candidates.items():
        if state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected):
            return name
    raise AssertionError("the folder loads, but as neither the old nor the new adapter")


def _load_molex(folder: Path) -> dict[str, torch.Tensor]:
    return adapter_state(molex.load_adapter(tiny_llama(num_layers=2), folder))


def _load_peft(folder: Path) -> dict[str, torch.Tensor]:
    adapter = read_peft_adapter(folder)
    return {f"{m}.{w}": getattr(f, w) for m, f in adapter.modules.items() for w in ("A", "B")}


def _child(body: Callable[[], None], mode: str) -> int:
    """Fork a child that runs ``body`` and exits 0; returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns to pytest
        code = 1
        try:
            torch.set_num_threads(1)
            if mode == "two-renames":
                files._exchange = lambda a, b: False
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return status


def _kill_loop(target: Path, saves: list[Callable[[], None]], load, expected, mode: str, seed: int) -> Counter:
    """Kill a child saving ``saves`` in turn over ``target`` KILLS times; every kill must leave a loadable folder.

    ``saves[i]`` writes the content ``list(expected)[i]``; each child starts with the one that is not
    in the folder, so every kill falls in a save that changes the folder.
    """
    names = list(expected)
    saves[0]()
    start = time.perf_counter()
    saves[0]()
    one_save = time.perf_counter() - start
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    present = 0
    for _ in range(KILLS):
        first = (present + 1) % len(saves)
        done_r, done_w = os.pipe()

        def save_forever(first: int = first, done_w: int = done_w) -> None:
            for i in range(10**6):
                saves[(first + i) % len(saves)]()
                os.write(done_w, b".")  # one byte per completed save

        pid = _child(save_forever, mode)
        os.close(done_w)
        # let 0-2 saves complete first, so the kill can land in any save whatever the machine's load,
        # then kill at a random instant of the next one
        for _ in range(rng.randrange(3)):
            os.read(done_r, 1)
        time.sleep(rng.uniform(0, 1.2 * one_save))
        os.kill(pid, signal.SIGKILL)
        os.close(done_r)
        assert os.WIFSIGNALED(_reap(pid))
        outcomes["target missing, previous content beside it"] += not target.exists()
        loaded = _which(load(target), expected)
        outcomes[loaded] += 1
        present = names.index(loaded)
    # the next save recovers whatever the last kill left and removes the leftovers
    saves[0]()
    assert _which(load(target), expected) == names[0]
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")) == []
    return outcomes


@pytest.mark.parametrize("mode", MODES)
def test_killed_save_adapter_loads_old_or_new(tmp_path, mode):
    a, b = adapter_model(1), adapter_model(2)
    target = tmp_path / "adapter"
    expected = {"a": adapter_state(a), "b": adapter_state(b)}
    saves = [lambda: molex.save_adapter(a, target), lambda: molex.save_adapter(b, target)]
    outcomes = _kill_loop(target, saves, _load_molex, expected, mode, seed=0)
    print(f"save_adapter, {mode}: {KILLS} kills -> {dict(outcomes)}")
    assert outcomes["a"] + outcomes["b"] == KILLS and outcomes["a"] and outcomes["b"]


@pytest.mark.parametrize("mode", MODES)
def test_killed_merge_and_peft_writes_load_old_or_new(tmp_path, mode):
    g = torch.Generator().manual_seed(0)
    factors = {
        name: {
            f"model.layers.{i}.self_attn.q_proj": (torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g))
            for i in range(2)
        }
        for name in ("x", "y")
    }
    hub = {name: write_peft_adapter(tmp_path / name, modules) for name, modules in factors.items()}
    # merge outputs: reference folders give the two expected contents
    weights = {"w1": [0.5, 0.5], "w2": [1.0, -0.25]}
    expected = {k: _load_peft(molex.merge_adapters(hub, w, "cat", tmp_path / f"ref-{k}")) for k, w in weights.items()}
    target = tmp_path / "merged"
    saves = [
        lambda: molex.merge_adapters(hub, weights["w1"], "cat", target),
        lambda: molex.merge_adapters(hub, weights["w2"], "cat", target),
    ]
    outcomes = _kill_loop(target, saves, _load_peft, expected, mode, seed=1)
    print(f"merge_adapters, {mode}: {KILLS} kills -> {dict(outcomes)}")
    assert outcomes["w1"] + outcomes["w2"] == KILLS and outcomes["w1"] and outcomes["w2"]

    # the plain PEFT writer, alternating the two input adapters' factors
    expected = {name: _load_peft(hub[name]) for name in factors}
    target = tmp_path / "written"
    saves = [lambda: write_peft_adapter(target, factors["x"]), lambda: write_peft_adapter(target, factors["y"])]
    outcomes = _kill_loop(target, saves, _load_peft, expected, mode, seed=2)
    print(f"write_peft_adapter, {mode}: {KILLS} kills -> {dict(outcomes)}")
    assert outcomes["x"] + outcomes["y"] == KILLS and outcomes["x"] and outcomes["y"]


_STEPS = ("mkdir", "rename", "replace", "link", "fsync", "unlink", "rmdir")


def _kill_at_step(step: int, body: Callable[[], None]) -> Callable[[], None]:
    """``body`` with a SIGKILL of its own process just before its ``step``-th filesystem operation."""

    def run() -> None:
        count = 0

        def hook(name: str, real: Callable) -> Callable:
            def call(*args, **kwargs):
                nonlocal count
                count += 1
                if count == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)

            return call

        for name in _STEPS:
            setattr(os, name, hook(name, getattr(os, name)))
        files._exchange = hook("exchange", files._exchange)
        body()

    return run


@pytest.mark.parametrize("mode", MODES)
def test_kill_before_every_filesystem_step(tmp_path, mode):
    """A kill between any two filesystem operations of a save (including its cleanup and the
    recovery of an earlier kill) leaves the old or the new adapter, keeps files molex did not
    write, and the next save recovers and leaves no siblings behind."""
    a, b = adapter_model(1), adapter_model(2)
    expected = {"a": adapter_state(a), "b": adapter_state(b)}
    target = tmp_path / "adapter"
    seen: Counter = Counter()
    for step in range(1, 200):
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        molex.save_adapter(a, target)
        (target / "README.md").write_text("notes", encoding="utf-8")
        status = _reap(_child(_kill_at_step(step, lambda: molex.save_adapter(b, target)), mode))
        done = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert done or os.WTERMSIG(status) == signal.SIGKILL
        seen["target missing"] += not target.exists()  # before loading: a load finishes the recovery
        seen[_which(_load_molex(target), expected)] += 1
        assert (files.readable_dir(target) / "README.md").read_text(encoding="utf-8") == "notes"
        molex.save_adapter(a, target)  # recovery from this exact state
        assert _which(_load_molex(target), expected) == "a"
        assert (target / "README.md").read_text(encoding="utf-8") == "notes"
        assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
        if done:
            break
    else:
        raise AssertionError("the save never finished: more filesystem steps than expected")
    print(f"{mode}: killed before each of {step - 1} steps -> {dict(seen)}")
    assert seen["a"] and seen["b"]
    assert bool(seen["target missing"]) == (mode == "two-renames")
