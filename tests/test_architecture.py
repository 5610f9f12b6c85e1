"""The layering the README's "Architecture" section promises, checked on the source itself.

Imports are read with ``ast`` (lazy imports inside functions included, ``TYPE_CHECKING`` blocks left out,
since they never run), so a cycle or a kernel reaching into the routers fails here before it can land.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "molex"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _owner(target: str) -> str | None:
    """The molex module an import target lives in (``molex.a.b.name`` -> ``molex.a.b``)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {owner for t in targets if t.startswith("molex") and (owner := _owner(t))}
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        # a module importing its own parent package (``from molex import x`` inside molex.y) is no cycle
        graph[name] = {t for t in _runtime_imports(path) if t != name and not name.startswith(f"{t}.")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_package():
    graph = _graph()
    assert len(graph) > 50
    assert "molex.core.decision" in graph["molex.kernels.backends.dense"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_kernels_see_only_decisions_and_tensors():
    graph = _graph()
    kernels = [name for name in graph if name.startswith("molex.kernels")]
    assert kernels
    for name in kernels:
        outside = {t for t in graph[name] if not t.startswith("molex.kernels")}
        # the decision they execute, and the registry helper their backends register with
        assert outside <= {"molex.core.decision", "molex.core.registry"}, f"{name} imports {sorted(outside)}"


def test_the_lowest_layer_imports_nothing_of_molex():
    graph = _graph()
    for name in ("molex.core.files", "molex.core.sources", "molex.core.losses", "molex.core.decision", "molex.core.registry"):
        assert graph[name] == set(), f"{name} imports {sorted(graph[name])}"
