"""The layering docs/architecture.md promises, checked on the source itself.

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


def _runtime_imports(path: Path, *, type_only_too: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for sub in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only and not type_only_too:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {owner for t in targets if t.startswith("molex") and (owner := _owner(t))}
    return found


def _graph(*, type_only_too: bool = False) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        # a module importing its own parent package (``from molex import x`` inside molex.y) is no cycle
        graph[name] = {
            t for t in _runtime_imports(path, type_only_too=type_only_too) if t != name and not name.startswith(f"{t}.")
        }
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
    for name in (
        "molex.core.files",
        "molex.core.sources",
        "molex.core.losses",
        "molex.core.decision",
        "molex.core.registry",
    ):
        assert graph[name] == set(), f"{name} imports {sorted(graph[name])}"


#: module prefix -> layer, most specific first: a module may import only from its own layer or below.
#: docs/architecture.md prints this table in full (checked below).
LAYERS: list[tuple[str, int]] = [
    ("molex.core", 1),
    ("molex.kernels", 2),
    ("molex.quant", 2),
    ("molex.allocation.auto", 4),
    ("molex.allocation", 3),
    ("molex.layer", 3),
    ("molex.routers", 3),
    ("molex.data.datamodule", 5),
    ("molex.data", 4),
    ("molex.evaluation", 4),
    ("molex.export", 4),
    ("molex.hub", 4),
    ("molex.models", 4),
    ("molex.training", 4),
    ("molex.cli", 5),
    ("molex.conf", 5),
    ("molex.integrations", 5),
    ("molex.lightning", 5),
]


def _layer(module: str) -> int | None:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(f"{prefix}."):
            return layer
    return None


def test_every_module_has_a_layer():
    missing = sorted(name for name in MODULES if name != "molex" and _layer(name) is None)
    assert not missing, (
        f"no layer for {missing}: add a rule to LAYERS in tests/test_architecture.py and docs/architecture.md"
    )


def test_modules_import_only_from_their_layer_or_below():
    upward = [
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, targets in sorted(_graph().items())
        if name != "molex"
        for target in sorted(targets)
        if target != "molex" and (_layer(target) or 0) > (_layer(name) or 0)
    ]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_the_layer_finder_sees_an_upward_import():
    assert _layer("molex.routers.topk") == 3 and _layer("molex.training.dlp") == 4
    assert _layer("molex.allocation.auto") == 4 and _layer("molex.allocation.plan") == 3
    assert _layer("molex.data.datamodule") == 5 and _layer("molex.data.collate") == 4


def test_the_architecture_page_prints_the_layer_table_in_full():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = page.split("## Modules and their layers", 1)[1].split("\n## ", 1)[0]
    rows = {
        (cells[1].strip("` "), int(cells[2].strip()))
        for line in section.splitlines()
        if line.startswith("| `molex") and len(cells := line.split("|")) > 3
    }
    assert rows == set(LAYERS), f"docs/architecture.md rows differ from LAYERS: {sorted(rows ^ set(LAYERS))}"


def test_no_test_module_imports_another():
    tests = Path(__file__).resolve().parent
    # a test module, conftest, or any other module of tests/ reached by its bare name (pytest's rootdir import)
    local = {p.stem for p in tests.glob("*.py")}
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(tests)} imports {name}"
                for name in names
                if (name.startswith("tests") and not (name == "tests.helpers" or name.startswith("tests.helpers.")))
                or name.split(".")[0] in local
            ]
    assert not offenders, "shared helpers go to tests/helpers/:\n" + "\n".join(offenders)


def test_no_cycles_even_through_type_only_imports():
    # a TYPE_CHECKING import never runs, but a circle through one still ties two modules' designs together
    assert _cycles(_graph(type_only_too=True)) == []


def test_plan_allocation_takes_an_allocation_and_plain_values_or_a_mole_config():
    import molex

    names = [f"layers.{i}.q_proj" for i in range(4)]
    alloc = molex.AllocationConfig(schedule="mola-increasing")
    plain = molex.plan_allocation(names, alloc, 4, num_experts=3, rank=5)
    earlier = molex.plan_allocation(names, molex.MoLEConfig(target_modules=["q_proj"], rank=5, allocation=alloc))
    assert plain == earlier and [p.rank for p in plain] == [5] * 4
