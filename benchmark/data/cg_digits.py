"""``cg-digits``: the colored-and-gray construction of CGMNIST on scikit-learn's handwritten digits.

Source: ``sklearn.datasets.load_digits`` (1,797 real 8×8 images, 10 classes), scaled to [0, 1].
Modality ``gray`` is a digit image (1×8×8). Modality ``color`` is a *different* image of the same
class from the same split, tinted (3×8×8). On train the tint is the class's own color with
probability ``bias`` and a uniformly random palette color otherwise; on validation and test it is
always random. A model that reads the class off the tint fits train and fails on test.

The test split (``test_fraction``) and validation split (``val_fraction``) are carved from the
whole set, seeded and stratified, and listed in the manifest. The set is generated once per
recipe into the dataset cache (see :mod:`benchmark.data.cache`); later loads read it back and
check its content hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmark.config import opt
from benchmark.data.base import DataInfo, ModalitySpec, MultimodalData, TensorSplit, stratified_split
from benchmark.data.builder import DatasetBuilder
from benchmark.data.cache import CacheWriter, DatasetCache
from benchmark.errors import UsageError
from benchmark.registry import register_dataset

SPLITS = ("train", "val", "test")

# One tint per class (RGB in [0, 1]): well separated hues.
PALETTE = np.array([
    [1.00, 0.10, 0.10], [0.10, 0.80, 0.10], [0.15, 0.30, 1.00], [1.00, 0.90, 0.10],
    [1.00, 0.10, 0.90], [0.10, 0.90, 0.90], [1.00, 0.55, 0.05], [0.55, 0.10, 0.85],
    [0.55, 0.35, 0.15], [0.95, 0.95, 0.95],
], dtype=np.float32)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scikit-learn digits as float32 images in [0, 1] (N×8×8) and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def carve_splits(labels: np.ndarray, test_fraction: float, val_fraction: float,
                 seed: int) -> dict[str, np.ndarray]:
    """Seeded stratified train/val/test indices of a set that has no split of its own."""
    rest, test = stratified_split(labels, test_fraction, seed)
    keep, val = stratified_split(labels[rest], val_fraction / (1.0 - test_fraction), seed + 1)
    return {"train": rest[keep], "val": rest[val], "test": test}


def color_modality(images: np.ndarray, labels: np.ndarray, bias: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each sample, another image of its class (from ``images``) tinted: the class's own tint
    with probability ``bias``, a uniformly random palette tint otherwise. Returns the tinted
    images (N×3×H×W), the partner indices and the tint indices."""
    n = len(labels)
    partner = np.empty(n, dtype=np.int64)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if len(idx) == 1:
            partner[idx] = idx
            continue
        # a random partner other than the sample itself: shift a permutation by a nonzero offset
        perm = rng.permutation(idx)
        shift = rng.integers(1, len(idx))
        partner[perm] = np.roll(perm, shift)
    own = rng.random(n) < bias
    tint = np.where(own, labels, rng.integers(0, len(PALETTE), n))
    colored = images[partner][:, None, :, :] * PALETTE[tint][:, :, None, None]
    return colored.astype(np.float32), partner, tint


@dataclass
class CGDigitsOptions:
    bias: float = opt(0.99, "probability that a train sample's color image has its class's own tint")
    image_noise: float = opt(0.3, "std of Gaussian noise added to the gray images (pixels in [0, 1])")
    color_noise: float = opt(0.0, "std of Gaussian noise added to the color images")
    test_fraction: float = opt(0.2, "fraction of each class carved out as the test split")
    val_fraction: float = opt(0.1, "fraction of each class carved out as the validation split")
    seed: int = opt(0, "seed of the splits, the pairing and the tints (the data, not the run)")
    cache_dir: str = opt("", "dataset cache folder (default $BMB_CACHE_DIR or ~/.cache/balanced-mm-bench)", location=True)

    def validate(self) -> None:
        if not 0.0 <= self.bias <= 1.0:
            raise UsageError(f"dataset.bias must be in [0, 1], got {self.bias}")
        if self.image_noise < 0 or self.color_noise < 0:
            raise UsageError(f"dataset.image_noise and dataset.color_noise must be >= 0, got {self.image_noise} "
                             f"and {self.color_noise}")
        check_fractions(self.test_fraction, self.val_fraction)


def check_fractions(test_fraction: float, val_fraction: float) -> None:
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 0.9):
        raise UsageError("dataset.test_fraction and dataset.val_fraction must be in (0, 1) and sum "
                         f"below 0.9, got {test_fraction} and {val_fraction}")


def recipe_of(options: Any, version: int) -> dict[str, Any]:
    return {k: v for k, v in vars(options).items() if k != "cache_dir"} | {"version": version}


def splits_from_cache(cache: DatasetCache, manifest: dict[str, Any],
                      modalities: list[str]) -> dict[str, TensorSplit]:
    splits = {}
    for split in SPLITS:
        inputs = {m: torch.from_numpy(cache.array(f"{split}.{m}").astype(np.float32)) for m in modalities}
        splits[split] = TensorSplit(inputs, torch.from_numpy(cache.array(f"{split}.labels")))
    return splits


@register_dataset("cg-digits")
class CGDigits(DatasetBuilder):
    Options = CGDigitsOptions
    summary = "colored-and-gray digits (CGMNIST construction on scikit-learn digits; offline)"
    VERSION = 1

    def cache(self) -> DatasetCache:
        return DatasetCache("cg-digits", recipe_of(self.options, self.VERSION), self.options.cache_dir)

    def _fill(self, writer: CacheWriter) -> dict[str, Any]:
        o = self.options
        images, labels = sklearn_digits()
        index = carve_splits(labels, o.test_fraction, o.val_fraction, o.seed)
        rng = np.random.default_rng([o.seed, 2])
        sizes = {}
        for split in SPLITS:
            idx = index[split]
            imgs, y = images[idx], labels[idx]
            colored, partner, tint = color_modality(imgs, y, o.bias if split == "train" else 0.0, rng)
            gray = imgs[:, None]
            gray = gray + o.image_noise * rng.standard_normal(gray.shape).astype(np.float32)
            colored = colored + o.color_noise * rng.standard_normal(colored.shape).astype(np.float32)
            writer.save_array(f"{split}.gray", gray.astype(np.float32))
            writer.save_array(f"{split}.color", colored.astype(np.float32))
            writer.save_array(f"{split}.labels", y)
            sizes[split] = len(idx)
            index[split] = idx
            index[f"{split}_color_partner"] = idx[partner]
            index[f"{split}_tint"] = tint
        return {
            "classes": [str(c) for c in range(10)],
            "sizes": sizes,
            "splits": {k: v.tolist() for k, v in index.items()},
            "source": "sklearn.datasets.load_digits",
        }

    def load(self) -> MultimodalData:
        cache = self.cache()
        manifest = cache.read_manifest() if cache.exists() else cache.build(self._fill)
        info = DataInfo(
            name="cg-digits",
            modalities=[ModalitySpec("gray", "image", (1, 8, 8), "small_cnn"),
                        ModalitySpec("color", "image", (3, 8, 8), "small_cnn")],
            num_classes=10,
            classes=manifest["classes"],
        )
        return MultimodalData(info, splits_from_cache(cache, manifest, ["gray", "color"]),
                              {**manifest, "cache": str(cache.dir)})

    def describe(self) -> dict[str, Any]:
        return {"modalities": ["gray", "color"], "classes": 10, "size": 1797, "present": True,
                "prepared": self.cache().exists(), "where": "built offline from scikit-learn"}

    def prepare(self) -> str:
        data = self.load()
        return f"cg-digits: {data.split_sizes()} in {data.manifest['cache']}"
