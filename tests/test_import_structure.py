"""Imports flow downhill (flows -> training -> tasks -> models) and never in a circle.

Read from the source (every import statement, module level or inside a function: a lazy import is still a
dependency), not from what happens to be imported at run time.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "models", "training", "datasets_manifest")
ABOVE_MODELS = ("tasks", "training", "flows")


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Our modules `module` imports (a `from a.b import c` names a.b.c when c is a module, else a.b)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {m: _imports(p, m, set(files)) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_models_import_nothing_above_them():
    graph = import_graph()
    upward = sorted((m, d) for m, deps in graph.items() if m.startswith("models") for d in deps
                    if d.split(".")[0] in ABOVE_MODELS)
    assert upward == []


def test_manifests_import_nothing_of_the_steps_or_above():
    """datasets_manifest sits below tasks (the steps read its ClipRow): no arrow back up."""
    graph = import_graph()
    upward = sorted((m, d) for m, deps in graph.items() if m.startswith("datasets_manifest") for d in deps
                    if d.split(".")[0] in ABOVE_MODELS)
    assert upward == []


def test_there_is_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_walk_sees_cycles_and_upward_imports():
    """The checks above can fail: a made-up graph with both faults is caught."""
    graph = {"models.a": {"models.b", "tasks.c"}, "models.b": {"models.a"}, "tasks.c": set()}
    assert cycles(graph) == [["models.a", "models.b"]]
    real = import_graph()
    assert "models.latent_geometry" in real["tasks.contract"]  # the contract takes the model's facts from below
    assert "models.dualforce.attention" in real["models.dualforce.model"]  # relative imports resolved


@pytest.mark.parametrize("module", ["models.dualforce.config", "models.dualforce.frames", "models.struct_layout"])
def test_model_facts_come_from_the_models(module):
    assert not any(d.startswith("tasks") for d in import_graph()[module])
