"""Datasets: the in-memory split types, the builder interface and the registered datasets."""

from benchmark.data import synthetic  # noqa: F401  (registers "synthetic")
from benchmark.data.base import (
    DataInfo,
    ModalitySpec,
    MultimodalData,
    TensorSplit,
    iterate_batches,
    split_labels,
    stratified_split,
)
from benchmark.data.builder import DatasetBuilder, create_dataset, resolve_dataset_options

__all__ = [
    "DataInfo",
    "DatasetBuilder",
    "ModalitySpec",
    "MultimodalData",
    "TensorSplit",
    "create_dataset",
    "iterate_batches",
    "resolve_dataset_options",
    "split_labels",
    "stratified_split",
]

# registers the digit datasets built offline and the readers of the paper datasets on disk
from benchmark.data import (  # noqa: E402,F401
    av_digits,
    ave,
    cg_digits,
    cgmnist,
    crema_d,
    food101,
    fsdd,
    kinetics_sounds,
    mosei,
    ucf101,
)
