"""Module paths of molex 0.2 keep importing after the layout moved, and say where they went."""

from __future__ import annotations

import subprocess
import sys

import pytest

from molex.core.moved import MOVED


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-c", code], capture_output=True, text=True
    )


@pytest.mark.parametrize("old", sorted(set(MOVED) - {"molex.inject"}))
def test_an_old_module_path_is_its_new_module_with_a_warning(old):
    new = MOVED[old]
    done = _run(
        f"import importlib, {old.split('.')[0]}\nprint(importlib.import_module({old!r}) is importlib.import_module({new!r}))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert f"{old} moved to {new}" in done.stderr


def test_from_import_of_an_old_path_works():
    done = _run("from molex.config import MoLEConfig\nimport molex\nprint(MoLEConfig is molex.MoLEConfig)")
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


def test_the_old_inject_module_is_refused_and_the_function_stays():
    done = _run(
        "import molex\n"
        "try:\n    from molex.inject import get_plans\nexcept ModuleNotFoundError as err:\n    print(err)\n"
        "print(callable(molex.inject) and molex.inject.__module__)"
    )
    assert done.returncode == 0, done.stderr
    assert "molex.inject moved to molex.layer.inject" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "molex.layer.inject"
