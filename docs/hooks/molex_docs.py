"""mkdocs hook: expand markers into tables generated from the code, so the pages cannot drift from it.

Markers (an HTML comment alone on its line):

* ``<!-- molex:router-options NAME -->``: the options of router ``NAME``, from its config dataclass
  (field, default, and the description in the class docstring's ``Attributes:`` section, inherited
  fields included).
* ``<!-- molex:config-groups -->``: every config group under ``molex/conf`` with its files.
* ``<!-- molex:config-reference -->``: every YAML file under ``molex/conf``, each option with its value
  and comment.

The same functions back ``tests/test_docs.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

MARKER = re.compile(r"^<!--[ \t]*molex:([a-z-]+)[ \t]*([\w-]*)[ \t]*-->[ \t]*$", re.MULTILINE)
CONF_DIR = Path(__file__).resolve().parents[2] / "molex" / "conf"


# --- router options -------------------------------------------------------------------------------


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from a Google-style ``Attributes:`` section (``a, b: text`` names several)."""
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    match = re.search(r"^Attributes:\s*\n((?:[ \t]+.*\n?|\s*\n)*)", doc, re.MULTILINE)
    if not match:
        return {}
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in match.group(1).splitlines():
        head = re.match(r"^ {4}([\w, ]+):\s*(.*)$", line)
        if head and not line.startswith(" " * 5):
            names = [n.strip() for n in head.group(1).split(",") if n.strip()]
            for name in names:
                entries[name] = head.group(2).strip()
        elif line.strip() and names:
            for name in names:
                entries[name] += " " + line.strip()
    return entries


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f"`{field.default_factory()!r}`"  # type: ignore[misc]
    return "required"


def router_options(name: str) -> list[tuple[str, str, str, str]]:
    """``(field, type, default, description)`` for every option of router ``name``."""
    from molex.routers import get_router_class

    config_class = get_router_class(name).config_class
    # the class that declares a field describes it best; subclasses often only point back to it
    docs: dict[str, str] = {}
    for klass in config_class.__mro__:
        for field, text in _attribute_docs(klass).items():
            declared_here = field in inspect.get_annotations(klass)
            if field not in docs or declared_here:
                docs[field] = text
    rows = []
    # the router's own options first, then the shared ones it inherits (contrastive loss, balancing)
    own = inspect.get_annotations(config_class)
    fields = sorted(dataclasses.fields(config_class), key=lambda f: f.name not in own)
    for field in fields:
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        rows.append((field.name, str(kind), _default_text(field), _markdown(docs.get(field.name, ""))))
    return rows


def _markdown(text: str) -> str:
    """Docstring reST to markdown: ``:func:`x``` and double backticks become single-backtick code."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def router_options_table(name: str) -> str:
    from molex.routers import get_router_class

    config_class = get_router_class(name).config_class
    rows = router_options(name)
    if not rows:
        return f"`{name}` takes no options (`{config_class.__name__}` has no fields)."
    lines = [
        f"Generated from `{config_class.__module__}.{config_class.__name__}`. Pass them as "
        f"`MoLEConfig(router_options={{...}})` or `molex-train router={name} router.options.<option>=...`.",
        "",
        "| option | type | default | description |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{f}` | `{_cell(t)}` | {_cell(d)} | {_cell(desc)} |" for f, t, d, desc in rows]
    return "\n".join(lines)


# --- config groups --------------------------------------------------------------------------------


def config_files() -> list[Path]:
    """Every YAML file under ``molex/conf``, relative to it, sorted (top-level files first)."""
    files = [p.relative_to(CONF_DIR) for p in CONF_DIR.rglob("*.yaml")]
    return sorted(files, key=lambda p: (len(p.parts) > 1, str(p)))


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes is not a comment."""
    quote = None
    for i, ch in enumerate(text):
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1 :].strip()
    return text.rstrip(), ""


def parse_yaml_options(path: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(header comment lines, rows of (dotted key, value, comment)) of one config file, in file order.

    A line-based reading keeps the comments that a YAML parser drops; list items become ``key[]`` rows.
    """
    header: list[str] = []
    rows: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    seen_key = False
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped:
            if not seen_key:
                header.append("")
            pending = []
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if text.startswith("@package"):
                continue
            (pending if seen_key else header).append(text)
            continue
        seen_key = True
        indent = len(raw) - len(raw.lstrip())
        body, comment = _split_comment(stripped)
        comment = " ".join([*pending, comment]).strip()
        pending = []
        while stack and stack[-1][0] >= indent and not body.startswith("- "):
            stack.pop()
        if body.startswith("- "):
            while stack and stack[-1][0] > indent:
                stack.pop()
            parent = stack[-1][1] if stack else ""
            rows.append((f"{parent}[]", body[2:].strip(), comment))
            continue
        key, _, value = body.partition(":")
        dotted = ".".join([*(s[1] for s in stack), key.strip()])
        value = value.strip()
        if value:
            rows.append((dotted, value, comment))
        else:
            rows.append((dotted, "", comment))
            stack.append((indent, key.strip()))
    # a header paragraph separated from the keys by a blank line is still the header
    while header and not header[-1]:
        header.pop()
    while header and not header[0]:
        header.pop(0)
    return header, rows


def config_groups_table() -> str:
    groups: dict[str, list[str]] = {}
    for rel in config_files():
        group = rel.parts[0] if len(rel.parts) > 1 else "(top level)"
        groups.setdefault(group, []).append(rel.stem)
    lines = ["| group | options |", "|---|---|"]
    for group, names in groups.items():
        shown = ", ".join(f"[`{n}`](#{_anchor(group, n)})" for n in names)
        lines.append(f"| `{group}` | {shown} |")
    return "\n".join(lines)


def _anchor(group: str, name: str) -> str:
    prefix = "" if group == "(top level)" else f"{group}-"
    return f"conf-{prefix}{name}".replace("_", "-")


def config_reference() -> str:
    out: list[str] = []
    current_group = None
    for rel in config_files():
        group = rel.parts[0] if len(rel.parts) > 1 else "(top level)"
        if group != current_group:
            current_group = group
            title = "Top-level configs" if group == "(top level)" else f"Group `{group}/`"
            out += [f"## {title}", ""]
        header, rows = parse_yaml_options(CONF_DIR / rel)
        anchor = _anchor(group, rel.stem)
        out += [f"### `{rel.as_posix()}` {{ #{anchor} }}", ""]
        if header:
            out += ["```text", *header, "```", ""]
        if rows:
            out += ["| option | value | comment |", "|---|---|---|"]
            for key, value, comment in rows:
                value_cell = f"`{_cell(value)}`" if value else ""
                out.append(f"| `{_cell(key)}` | {value_cell} | {_escape_text(_cell(comment))} |")
            out.append("")
    return "\n".join(out)


def _escape_text(text: str) -> str:
    # comments are plain text: keep markdown from reading `<...>` or `*` in them as markup
    return text.replace("<", "&lt;").replace("*", "\\*")


# --- the hook -------------------------------------------------------------------------------------


def expand(markdown: str) -> str:
    def replace(match: re.Match) -> str:
        kind, arg = match.group(1), match.group(2)
        if kind == "router-options":
            return router_options_table(arg)
        if kind == "config-groups":
            return config_groups_table()
        if kind == "config-reference":
            return config_reference()
        raise ValueError(f"unknown docs marker molex:{kind}; use router-options, config-groups or config-reference")

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    """mkdocs calls this for every page (the other arguments are part of the hook signature)."""
    return expand(markdown)
