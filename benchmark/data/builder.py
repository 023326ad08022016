"""The interface a dataset plug-in implements, and ``create_dataset``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from benchmark.config import apply_overrides
from benchmark.data.base import MultimodalData
from benchmark.registry import DATASETS


@dataclasses.dataclass
class NoOptions:
    pass


class DatasetBuilder:
    """A registered dataset. Subclasses set ``Options`` (a dataclass whose fields are the
    ``dataset.<name>`` options) and implement :meth:`load`.

    ``describe`` feeds ``python -m benchmark data list``; ``prepare`` turns a user's on-disk
    release into the cached form (datasets built offline generate their cache instead).
    """

    Options: ClassVar[type] = NoOptions
    summary: ClassVar[str] = ""

    def __init__(self, options: Any) -> None:
        self.options = options

    def load(self) -> MultimodalData:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """modalities, classes, size and whether the data is present on this machine."""
        data = self.load()
        return {
            "modalities": data.info.modality_names,
            "classes": data.info.num_classes,
            "size": sum(data.split_sizes().values()),
            "present": True,
        }

    def prepare(self) -> str:
        """Build or refresh the cache; returns a one-line summary."""
        data = self.load()
        return f"{data.info.name}: {data.split_sizes()}"


def resolve_dataset_options(name: str, overrides: dict[str, Any]) -> Any:
    builder_cls = DATASETS.get(name)
    options = builder_cls.Options()
    apply_overrides(options, overrides, prefix="dataset.")
    if hasattr(options, "validate"):
        options.validate()
    return options


def create_dataset(name: str, overrides: dict[str, Any] | None = None) -> MultimodalData:
    """Load dataset ``name`` with ``dataset.<option>`` overrides applied."""
    options = resolve_dataset_options(name, overrides or {})
    return DATASETS.get(name)(options).load()
