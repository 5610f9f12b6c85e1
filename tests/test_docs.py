"""The documentation: every ```python block of README.md and docs/ runs, on the tiny model; the site builds.

A block runs unless the line right before it is ``<!-- not-run: <reason> -->``. The blocks of one page run in
order in one namespace (a page is a tour), in a temporary working directory, with ``molex.models.load_model``
answering the default model (``"smollm2-135m"``) with the tiny random Llama, so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.rglob("*.md")])
FENCE = re.compile(r"^```(\w*)\s*$")
TINY_LAYERS = 8  # divisible by 4: the MoLA schedules give each quarter its own count
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(\S.*?)\s*-->\s*$")


def python_blocks(page: Path) -> list[tuple[int, str | None, str]]:
    """``(line of the fence, not-run reason or None, code)`` for each ```python block of ``page``."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: code fence never closed"
        if fence.group(1) == "python":
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NOT_RUN.match(before.strip())
            blocks.append((i + 1, marker.group(1) if marker else None, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return blocks


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


@pytest.fixture
def tiny_default_model(monkeypatch, tmp_path):
    """``load_model()`` / ``load_model("smollm2-135m", ...)`` give the tiny random Llama; cwd is a temp dir.

    It gets 8 decoder layers (hidden size 32): enough for the pages' four-group allocations and layer names.
    """
    import molex.models
    import molex.routers.base as router_base

    real = molex.models.load_model

    def load_tiny(name_or_path: str = "smollm2-135m", **kwargs):
        if name_or_path in ("smollm2-135m", "tiny-llama"):
            kwargs.setdefault("config_overrides", {"num_hidden_layers": TINY_LAYERS})
            name_or_path = "tiny-llama"
        return real(name_or_path, **kwargs)

    monkeypatch.setattr(molex.models, "load_model", load_tiny)
    # a page may register its own router: keep it out of the registry the other tests see
    monkeypatch.setattr(router_base.ROUTERS, "_entries", dict(router_base.ROUTERS._entries))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MOLEX_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_blocks_are_found():
    """The scanner sees the fences: the quickstart has runnable blocks, a not-run marker needs a reason."""
    quickstart = python_blocks(DOCS / "quickstart.md")
    assert quickstart and all(reason is None for _, reason, _ in quickstart)
    assert NOT_RUN.match("<!-- not-run: needs a GPU -->").group(1) == "needs a GPU"
    assert NOT_RUN.match("<!-- not-run: -->") is None


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, tiny_default_model):
    rel = page.relative_to(ROOT)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, reason, code in python_blocks(page):
        if reason is not None:
            continue
        try:
            exec(compile(code, f"{rel}:{line}", "exec"), namespace)
        except Exception as error:
            pytest.fail(
                f"{rel}:{line}: the python block raised {type(error).__name__}: {error}. Fix the block, or mark "
                "it not runnable with '<!-- not-run: <reason> -->' on the line before the fence",
                pytrace=True,
            )


def test_config_reference_lists_every_yaml():
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import molex_docs
    finally:
        sys.path.pop(0)
    page = molex_docs.expand((DOCS / "cli" / "config.md").read_text())
    conf = ROOT / "molex" / "conf"
    files = sorted(p.relative_to(conf).as_posix() for p in conf.rglob("*.yaml"))
    assert files, "no yaml under molex/conf"
    missing = [f for f in files if f"### `{f}`" not in page]
    assert not missing, f"docs/cli/config.md does not list {missing}"
    # every option of the default router's file is there with its value
    assert "| `options.top_k` | `2` |" in page


def test_router_pages_cover_every_router():
    import molex

    missing = [name for name in molex.available_routers() if not (DOCS / "routers" / f"{name}.md").exists()]
    assert not missing, f"no docs/routers/<name>.md for {missing}"
    for name in molex.available_routers():
        assert f"<!-- molex:router-options {name} -->" in (DOCS / "routers" / f"{name}.md").read_text()


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[docs]')"
)
def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "the mkdocs package is importable but its console script is missing"
    result = subprocess.run(
        [mkdocs, "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "quickstart" / "index.html").exists()
