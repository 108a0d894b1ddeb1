"""The code's shape: imports run one way (storage < engine < bench < cli), no two modules import
each other however indirectly (function-level and type-checking imports included), and no module
of the package is over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "engine", "train", "bench", "cli")
FLOORS = {"storage": 0, "engine": 1, "train": 2, "bench": 2, "cli": 3}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {"rcengine": ROOT / "__init__.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("rcengine", *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (a package's ``__init__`` for ``from . import x``
    of a name that is not a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_two_modules_import_each_other():
    graph = {m: {d for d in deps if d != "rcengine"} for m, deps in _graph().items() if m != "rcengine"}
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_imports_run_one_way():
    wrong = []
    for module, deps in _graph().items():
        top = module.split(".")[1] if module.count(".") else None
        if top not in FLOORS:
            continue
        for dep in deps:
            other = dep.split(".")[1] if dep.count(".") else None
            if other in FLOORS and FLOORS[other] > FLOORS[top]:
                wrong.append(f"{module} imports {dep}")
    assert wrong == []


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
