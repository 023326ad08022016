"""Name → factory registries for methods, datasets and encoders.

Each registry is filled by decorators at import time (``@register_method("joint")``) and read
through ``list_*`` / ``create_*``. An unknown name raises :class:`UnknownNameError`, whose message
lists the known names so that a typo is fixed in one look.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from benchmark.errors import UsageError

T = TypeVar("T")

# Modules that register plug-ins when imported. They are imported lazily, the first time a
# registry is read, so that ``import benchmark`` stays cheap and plug-ins may import benchmark.
PLUGIN_MODULES = ("benchmark.data", "benchmark.models", "baselines", "udi")


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


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in PLUGIN_MODULES:
        importlib.import_module(module)


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
