"""What every dataset yields: modality specs, splits of samples, and a manifest."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class ModalitySpec:
    """One input modality: its name, kind, per-sample tensor shape and default encoder."""

    name: str
    kind: str  # "vector", "image", "spectrogram", "frames", "sequence" (T×D features) or "tokens" (ids)
    shape: tuple[int, ...]
    encoder: str


@dataclass
class DataInfo:
    name: str
    modalities: list[ModalitySpec]
    num_classes: int
    classes: list[str] = field(default_factory=list)

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def modality(self, name: str) -> ModalitySpec:
        for spec in self.modalities:
            if spec.name == name:
                return spec
        raise KeyError(name)


class TensorSplit(Dataset):
    """A split held in memory as one tensor per modality plus a label tensor."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        n = len(labels)
        for name, tensor in inputs.items():
            if len(tensor) != n:
                raise ValueError(f"modality {name} has {len(tensor)} samples, labels have {n}")
        self.inputs = inputs
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {m: t[index] for m, t in self.inputs.items()}
        sample["label"] = self.labels[index]
        return sample

    def subset(self, indices: np.ndarray | torch.Tensor) -> TensorSplit:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorSplit({m: t[idx] for m, t in self.inputs.items()}, self.labels[idx])


@dataclass
class MultimodalData:
    """A loaded dataset: its description, its three splits and the manifest it was built from."""

    info: DataInfo
    splits: dict[str, Dataset]
    manifest: dict[str, Any] = field(default_factory=dict)

    def split_sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}


def split_labels(split: Dataset) -> np.ndarray:
    """Labels of a split without decoding its inputs where the split allows it."""
    if isinstance(split, TensorSplit):
        return split.labels.numpy()
    if hasattr(split, "labels"):
        return np.asarray(split.labels)
    return np.asarray([int(split[i]["label"]) for i in range(len(split))])


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, carved) with ``fraction`` of each class carved out, seeded."""
    rng = np.random.default_rng(seed)
    kept, carved = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_carve = int(round(len(idx) * fraction))
        if len(idx) > 1:
            n_carve = min(max(n_carve, 1), len(idx) - 1)
        carved.append(idx[:n_carve])
        kept.append(idx[n_carve:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(carved))


# In-memory splits up to this size are permuted in one gather per epoch.
GATHER_ONCE_BYTES = 1 << 30


def _maybe_pin(batch: dict[str, torch.Tensor], pin: bool) -> dict[str, torch.Tensor]:
    return {k: v.pin_memory() for k, v in batch.items()} if pin else batch


def iterate_batches(
    split: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches of a split, every sample included (no drop_last).

    In-memory splits are sliced directly (no per-sample collation); others go through a
    DataLoader. The order is drawn from ``generator`` so that a seeded run repeats exactly.
    """
    n = len(split)
    if isinstance(split, TensorSplit):
        tensors = dict(split.inputs, label=split.labels)
        if shuffle:
            order = torch.randperm(n, generator=generator)
            if sum(t.nbytes for t in tensors.values()) <= GATHER_ONCE_BYTES:
                # one gather per epoch, then every batch is a view: no per-batch indexing cost
                tensors = {k: t[order] for k, t in tensors.items()}
            else:
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    yield _maybe_pin({k: t[idx] for k, t in tensors.items()}, pin_memory)
                return
        for start in range(0, n, batch_size):
            yield _maybe_pin({k: t[start : start + batch_size] for k, t in tensors.items()}, pin_memory)
        return
    loader = DataLoader(
        split,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=False,
    )
    yield from loader
