"""Name → factory registries for methods, datasets and encoders.

Each registry is filled by decorators at import time (``@register_method("joint")``) and read
through ``list_*`` / ``create_*``. An unknown name raises :class:`UnknownNameError`, whose message
lists the known names so that a typo is fixed in one look.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from importlib import metadata
from typing import Any, Generic, TypeVar

from benchmark.errors import UsageError

T = TypeVar("T")

# Modules that register plug-ins when imported. They are imported lazily, the first time a
# registry is read, so that ``import benchmark`` stays cheap and plug-ins may import benchmark.
PLUGIN_MODULES = ("benchmark.data", "benchmark.models", "baselines", "udi")
# Plug-ins written outside the suite: the modules named in this environment variable
# (comma-separated, importable from sys.path) and those of installed packages that declare an entry
# point in this group. Both are imported with the built-ins in every process that reads a
# registry: `run`, sweep workers (which inherit the environment) and SLURM jobs alike.
PLUGINS_ENV = "BMB_PLUGINS"
PLUGINS_GROUP = "balanced_mm_bench.plugins"


class UnknownNameError(UsageError):
    """A name that no registry entry has."""


class Registry(Generic[T]):
    """A table of named factories of one kind (method, dataset, encoder, fusion head)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            if isinstance(obj, type):
                obj.registered_name = name  # type: ignore[attr-defined]
            return obj

        return decorate

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {known}"
            ) from None

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries


_loaded = False


def external_plugins() -> list[str]:
    """The modules named in $BMB_PLUGINS, then the entry points of the plug-in group (by value)."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    for entry in metadata.entry_points(group=PLUGINS_GROUP):
        if entry.value not in names:
            names.append(entry.value)
    return names


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in PLUGIN_MODULES:
        importlib.import_module(module)
    for module in external_plugins():
        try:
            importlib.import_module(module.split(":", 1)[0])
        except ImportError as exc:
            _loaded = False  # the next read tries again (and says the same)
            raise UsageError(f"plug-in module {module!r} (from ${PLUGINS_ENV} or the {PLUGINS_GROUP!r} entry "
                             f"points) cannot be imported ({exc}); put its folder on PYTHONPATH or fix the "
                             f"name") from None


METHODS: Registry[Any] = Registry("method")
DATASETS: Registry[Any] = Registry("dataset")
ENCODERS: Registry[Any] = Registry("encoder")
FUSIONS: Registry[Any] = Registry("fusion")

register_method = METHODS.register
register_dataset = DATASETS.register
register_encoder = ENCODERS.register
register_fusion = FUSIONS.register


def list_methods() -> list[str]:
    return METHODS.names()


def list_datasets() -> list[str]:
    return DATASETS.names()


def list_encoders() -> list[str]:
    return ENCODERS.names()


def list_fusions() -> list[str]:
    return FUSIONS.names()
