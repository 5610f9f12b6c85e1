"""molex.core.files: atomic writes, JSON, checksums and path checks (imports nothing of molex)."""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

import pytest

from molex.core import files
from molex.core.files import atomic_write, read_json, require_dir, require_file, sha256_file, write_json


def test_json_round_trip_is_sorted_indented_and_newline_terminated(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True) + "\n"
    assert read_json(path, fix="write it again") == {"a": [1, 2], "b": 1}
    path.write_text("{broken", encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.json is not valid JSON .*; write it again"):
        read_json(path, fix="write it again")


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old", encoding="utf-8")

    def fail(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_gives_a_plain_files_permissions(tmp_path):
    """A new file gets ``0666 & ~umask`` like ``open()`` (not mkstemp's private 0600); a replaced file
    keeps its own mode."""
    previous = os.umask(0o027)
    try:
        fresh = tmp_path / "new.txt"
        atomic_write(fresh, lambda tmp: Path(tmp).write_text("x", encoding="utf-8"))
        assert fresh.stat().st_mode & 0o777 == 0o640
        assert files._umask() == 0o027
    finally:
        os.umask(previous)
    kept = tmp_path / "kept.txt"
    kept.write_text("old", encoding="utf-8")
    kept.chmod(0o604)
    atomic_write(kept, lambda tmp: Path(tmp).write_text("new", encoding="utf-8"))
    assert kept.read_text(encoding="utf-8") == "new" and kept.stat().st_mode & 0o777 == 0o604


def test_checksum_and_path_checks(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert require_file(path, "unused") == path
    assert require_dir(tmp_path, "unused") == tmp_path
    with pytest.raises(FileNotFoundError, match="no such thing here"):
        require_file(tmp_path, "no such thing here")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        require_dir(path, "not a folder")


def test_imports_nothing_of_molex():
    # importing molex.core.files runs molex/__init__, so the module's own import statements are checked
    tree = ast.parse(Path(files.__file__).read_text(encoding="utf-8"))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.split(".")[0] == "molex"]
