"""``cgmnist``: Colored-and-gray MNIST from a local copy of the MNIST idx files.

Layout under the root (also accepted: ``raw/`` below it, as torchvision keeps them, ``.gz`` files,
and ``.`` in place of the last ``-`` as in ``train-images.idx3-ubyte``)::

    train-images-idx3-ubyte   train-labels-idx1-ubyte
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte

Modality ``gray`` is the MNIST digit (1×28×28); ``color`` is another image of the same class from
the same split, tinted as in ``cg-digits``: the class's own tint with probability ``bias`` on
train, a random tint on validation and test. The validation split is carved from train
(stratified, seeded). The prepared set is stored as uint8 and held in memory when loaded.
"""

from __future__ import annotations

import dataclasses
import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import opt
from benchmark.data.base import DataInfo, ModalitySpec, MultimodalData, TensorSplit, stratified_split
from benchmark.data.cache import CacheWriter
from benchmark.data.cg_digits import color_modality
from benchmark.data.media import bad_file
from benchmark.data.ondisk import OnDiskDataset, fingerprint
from benchmark.errors import UsageError
from benchmark.registry import register_dataset

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class CGMNISTOptions:
    root: str = opt("", "folder holding the MNIST idx files (default $BMB_DATA_ROOT/MNIST)", location=True)
    cache_dir: str = opt("", "dataset cache folder (default $BMB_CACHE_DIR or ~/.cache/balanced-mm-bench)", location=True)
    bias: float = opt(0.99, "probability that a train sample's color image has its class's own tint")
    image_noise: float = opt(0.0, "std of Gaussian noise added to both images (pixels in [0, 1])")
    val_fraction: float = opt(0.1, "fraction of each class of train carved out as validation")
    seed: int = opt(0, "seed of the carved validation split, the pairing and the tints")

    def validate(self) -> None:
        if not 0.0 <= self.bias <= 1.0:
            raise UsageError(f"dataset.bias must be in [0, 1], got {self.bias}")
        if self.image_noise < 0:
            raise UsageError(f"dataset.image_noise must be >= 0, got {self.image_noise}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"dataset.val_fraction must be in (0, 1), got {self.val_fraction}")


def find_idx(root: Path, name: str) -> Path:
    stem, _, kind = name.rpartition("-")
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for base in (name, f"{stem}.{kind}"):
            for suffix in ("", ".gz"):
                if (folder / (base + suffix)).is_file():
                    return folder / (base + suffix)
    raise UsageError(f"MNIST file {root / name} is missing; put the four idx files "
                     f"({', '.join(n for pair in FILES.values() for n in pair)}) in {root}")


def read_idx(path: Path) -> np.ndarray:
    """An idx array (unsigned bytes) of the MNIST distribution format."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
        if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        offset = 4 + 4 * ndim
        count = int(np.prod(dims))
        if len(raw) - offset != count:
            raise ValueError(f"{len(raw) - offset} data bytes for shape {dims}")
        return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)
    except (OSError, ValueError, EOFError, gzip.BadGzipFile) as exc:
        raise bad_file(path, "MNIST idx file", exc) from None


@register_dataset("cgmnist")
class CGMNIST(OnDiskDataset):
    Options = CGMNISTOptions
    summary = "colored-and-gray MNIST, 10 classes (on disk: MNIST idx files)"
    display = "CGMNIST"
    folder = "MNIST"
    layout = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    num_classes = 10

    def recipe(self, root: Path) -> dict[str, Any]:
        values = {k: v for k, v in dataclasses.asdict(self.options).items() if k not in ("root", "cache_dir")}
        return {"version": self.VERSION, "root": str(root), **values}

    def modality_specs(self) -> list[ModalitySpec]:
        return [ModalitySpec("gray", "image", (1, 28, 28), "small_cnn"),
                ModalitySpec("color", "image", (3, 28, 28), "small_cnn")]

    def storage(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {"gray": ((1, 28, 28), np.uint8), "color": ((3, 28, 28), np.uint8)}

    def _fill(self, root: Path, writer: CacheWriter) -> dict[str, Any]:
        o = self.options
        data, used = {}, set()
        for split, (images_name, labels_name) in FILES.items():
            images_path, labels_path = find_idx(root, images_name), find_idx(root, labels_name)
            used.update((images_path, labels_path))
            images, labels = read_idx(images_path), read_idx(labels_path).astype(np.int64)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise UsageError(f"{images_path} and {labels_path} do not match (shapes {images.shape} and "
                                 f"{labels.shape}); replace them with the MNIST release files")
            if labels.max(initial=0) > 9:
                raise UsageError(f"{labels_path} has labels above 9; replace it with the MNIST release file")
            data[split] = (images.astype(np.float32) / 255.0, labels)
        keep, val = stratified_split(data["train"][1], o.val_fraction, o.seed)
        index = {"train": keep, "val": val, "test": np.arange(len(data["test"][1]))}
        rng = np.random.default_rng([o.seed, 5])
        sizes = {}
        for split in ("train", "val", "test"):
            images, labels = data["test" if split == "test" else "train"]
            imgs, y = images[index[split]], labels[index[split]]
            colored, _, _ = color_modality(imgs, y, o.bias if split == "train" else 0.0, rng)
            gray = imgs[:, None]
            if o.image_noise > 0:
                gray = gray + o.image_noise * rng.standard_normal(gray.shape).astype(np.float32)
                colored = colored + o.image_noise * rng.standard_normal(colored.shape).astype(np.float32)
            to_u8 = lambda x: np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)  # noqa: E731
            writer.save_array(f"{split}.gray", to_u8(gray))
            writer.save_array(f"{split}.color", to_u8(colored))
            writer.save_array(f"{split}.labels", y)
            sizes[split] = len(y)
        return {"classes": [str(c) for c in range(10)], "sizes": sizes,
                "splits": {"train": index["train"].tolist(), "val": index["val"].tolist(),
                           "test": "all of t10k"},
                "val_carved_from_train": True, "sources": fingerprint(root, used)}

    def load(self) -> MultimodalData:
        cache, manifest, _ = self.ensure_cache()
        splits = {}
        for split in ("train", "val", "test"):
            inputs = {m: torch.from_numpy(cache.array(f"{split}.{m}")).float().div_(255.0) for m in ("gray", "color")}
            splits[split] = TensorSplit(inputs, torch.from_numpy(cache.array(f"{split}.labels")))
        info = DataInfo("cgmnist", self.modality_specs(), 10, manifest["classes"])
        return MultimodalData(info, splits, {**manifest, "cache": str(cache.dir)})
