"""The suite's generic modules (everything under benchmark/) name no registered method: what a
method knows lives in its own file, and reaches the loop, the sweeps, the tuner, the report and
perf through the hooks and facts of benchmark.method.Method."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from benchmark.registry import list_methods

ROOT = Path(__file__).resolve().parent.parent
GENERIC = ROOT / "benchmark"

# Strings that begin with a method's name but are not that method, each with its reason.
SHARED_STAGE = "the prefix of the shared unimodal stages (benchmark.unimodal) and of per-modality accuracy columns"
NOT_A_METHOD = {
    ("registry.py", "udi"): "the package udi, imported for the plug-ins it registers",
    ("help_index.py", "udi"): "the package udi, among the suite's own packages",
    ("config.py", "joint"): "the default of --method: a run needs one",
    ("unimodal.py", "unimodal"): "the cache folder of unimodal checkpoints (a location on disk)",
    ("unimodal.py", "unimodal:"): SHARED_STAGE,
    ("unimodal.py", "unimodal/"): "the seed stream of the shared unimodal models (every method that loads them)",
    ("unimodal.py", "unimodal checkpoint "): "words of a message about the shared checkpoints",
    ("perf.py", "unimodal:"): SHARED_STAGE,
    ("report.py", "unimodal:"): SHARED_STAGE,
    ("runner.py", "unimodal:"): SHARED_STAGE,
}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def method_names_in(source: str, names: set[str]) -> list[tuple[int, str, str]]:
    """(line, name, string) of every string constant in ``source`` (docstrings aside) that is a
    method's name, or starts with one followed by a space, a colon or a slash (a label, a stage, a
    stream)."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value
            for name in names:
                if text == name or any(text.startswith(name + sep) for sep in (" ", ":", "/")):
                    hits.append((node.lineno, name, text))
    return sorted(hits)


def test_the_finder_catches_a_method_name() -> None:
    names = {"joint", "udi"}
    source = 'ORDER = ("joint", "mine")\nx = "udi (dynamic)"\ndef f():\n    """joint"""\n    return "udi:follower"\n'
    assert method_names_in(source, names) == [(1, "joint", "joint"), (2, "udi", "udi (dynamic)"),
                                              (5, "udi", "udi:follower")]


@pytest.mark.parametrize("path", sorted(GENERIC.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_generic_module_names_a_method(path: Path) -> None:
    names = set(list_methods())
    assert {"joint", "udi"} <= names  # the registry was read
    hits = [(line, text) for line, _, text in method_names_in(path.read_text(encoding="utf-8"), names)
            if (path.name, text) not in NOT_A_METHOD]
    assert not hits, (f"{path.relative_to(ROOT)} names methods {hits} (line, string): declare what it needs "
                      "as a fact or hook on the method's class (benchmark.method.Method) instead")
