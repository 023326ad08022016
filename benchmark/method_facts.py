"""What the report knows of a method, read without torch: its table order, whether it is the
reference the others are compared with, whether its runs train one modality alone, the module of
its own report sections, and its published figures.

The facts are declared on the method's class (benchmark.method.Method) beside its code, and
indexed in ``benchmark/help_index.json`` (``python -m benchmark.help_index``; a test keeps the
index in step), because the report runs in an environment without torch. A method the index does
not know (a plug-in from outside the suite) gets the defaults: last in the tables, no section of
its own.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from benchmark.help_index import load_index

DEFAULTS: dict[str, Any] = {"table_order": 100, "reference": False, "single_modality": False,
                            "report_module": None, "published": {}}


def facts(method: str) -> dict[str, Any]:
    entry = load_index().get("methods", {}).get(method, {})
    return {**DEFAULTS, **entry.get("facts", {})}


def known_methods() -> list[str]:
    return list(load_index().get("methods", {}))


def order_key(method: str) -> tuple[int, str]:
    """Sort key of a method in the tables: its declared order, then its name."""
    return int(facts(method)["table_order"]), method


def reference_method() -> str:
    """The method every other one is compared with (paired gaps in the tables)."""
    names = [m for m in known_methods() if facts(m)["reference"]]
    return names[0] if names else ""


def is_single_modality(method: str) -> bool:
    return bool(facts(method)["single_modality"])


def published() -> dict[str, dict[str, dict[str, tuple[float, float | None]]]]:
    """Published accuracies (%): dataset → source → method → (mean, std or None), gathered from
    every method's facts in table order (sources in the order they first appear)."""
    out: dict[str, dict[str, dict[str, tuple[float, float | None]]]] = {}
    for method in sorted(known_methods(), key=order_key):
        for dataset, sources in facts(method)["published"].items():
            for source, (mean, std) in sources.items():
                out.setdefault(dataset, {}).setdefault(source, {})[method] = (mean, std)
    return out


def report_modules() -> dict[str, ModuleType]:
    """method → the module of its own report sections (imported; no torch), in table order."""
    return {m: importlib.import_module(facts(m)["report_module"])
            for m in sorted(known_methods(), key=order_key) if facts(m)["report_module"]}
