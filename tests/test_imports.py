"""The suite's modules import each other without a cycle, counting the imports made inside functions
and those under TYPE_CHECKING (a deferred or annotation-only import still ties two modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "baselines", "udi")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module → the suite's modules it imports (``from a.b import c`` counts a.b, and a.b.c when
    that is a module)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}

    def visit(module: str, node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    names = [alias.name for alias in child.names]
                else:
                    names = [child.module or ""] + [f"{child.module}.{alias.name}" for alias in child.names]
                graph[module] |= {n for n in names if n in mods and n != module}
            visit(module, child)

    for module, path in mods.items():
        visit(module, ast.parse(path.read_text()))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_suite_has_no_import_cycle():
    assert cycles(import_graph(modules())) == []


def test_the_cycle_finder_finds_a_cycle_through_a_deferred_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    # and the graph reader sees an import inside a function and one under TYPE_CHECKING
    (tmp_path / "x.py").write_text("def f():\n    from y import g\n")
    (tmp_path / "y.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n")
    graph = import_graph({"x": tmp_path / "x.py", "y": tmp_path / "y.py"})
    assert graph == {"x": {"y"}, "y": {"x"}} and cycles(graph) == [["x", "y"]]


def test_planning_a_run_imports_neither_torchvision_nor_scikit_learn() -> None:
    """A process that plans a sweep or starts a worker imports the runner; torchvision (only the
    ResNet18 encoders need it) and scikit-learn (the probes and macro-F1, after training) cost it
    a second or more each, so they are imported where they are used."""
    import subprocess
    import sys

    script = ("import sys, benchmark.runner, benchmark.sweep; "
              "print(sorted(m for m in ('torchvision', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]"
