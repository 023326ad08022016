"""The common machinery of on-disk datasets (a user's copy of a paper dataset's release).

A reader subclass says how to list the release's splits (:meth:`OnDiskDataset.index`) and how to
decode one item into arrays (:meth:`OnDiskDataset.decode`). ``prepare`` decodes every item once
into the dataset cache (uint8 frames, float16 spectrograms, written through memory maps into a
temporary folder renamed into place at the end) with a manifest of split lists, classes, recipe
and content hash. ``load`` reads the cache, preparing it first if needed, and applies the
train-time augmentation per sample.

The root of a dataset is its ``root`` option, else ``$BMB_DATA_ROOT/<folder>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from benchmark.config import opt
from benchmark.data.base import DataInfo, ModalitySpec, MultimodalData, stratified_split
from benchmark.data.builder import DatasetBuilder
from benchmark.data.cache import DATA_ENV, CacheWriter, DatasetCache, data_root
from benchmark.data.media import IMAGENET_MEAN, IMAGENET_STD, CachedSplit, FrameTransform
from benchmark.errors import UsageError

MMAP_BYTES = 1 << 30  # cache files larger than this are memory-mapped instead of read in


@dataclass
class Item:
    """One listed sample: its name in the release, its class index, and the list naming it."""

    name: str
    label: int
    listed_in: str


@dataclass
class OnDiskOptions:
    root: str = opt("", "folder holding the release (default $BMB_DATA_ROOT/<dataset folder>)", location=True)
    cache_dir: str = opt("", "dataset cache folder (default $BMB_CACHE_DIR or ~/.cache/balanced-mm-bench)", location=True)
    frames: int = opt(1, "frames per clip, evenly spaced over the clip's frames")
    image_size: int = opt(224, "frame side after RandomResizedCrop (train) or Resize (val/test)")
    cache_size: int = opt(0, "frame side stored in the cache (0 = image_size × 8/7, e.g. 256 for 224)")
    val_fraction: float = opt(0.1, "fraction of each class of train carved out as validation when the "
                                   "release has no validation list")
    seed: int = opt(0, "seed of the carved validation split")

    def validate(self) -> None:
        for name in ("frames", "image_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"dataset.{name} must be >= 1, got {getattr(self, name)}")
        if self.cache_size and self.cache_size < self.image_size:
            raise UsageError(f"dataset.cache_size ({self.cache_size}) must be 0 or >= dataset.image_size "
                             f"({self.image_size})")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"dataset.val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def stored_size(self) -> int:
        return self.cache_size or max(self.image_size, round(self.image_size * 8 / 7))


SOURCES = "_sources"  # key of the list of source files a ``decode`` read


def fingerprint(root: Path, paths: set[Path]) -> dict[str, list[int]]:
    """(size, modification time) of every source file read, by path relative to the root."""
    out = {}
    for path in sorted(paths):
        stat = path.stat()
        out[str(path.relative_to(root)) if path.is_relative_to(root) else str(path)] = \
            [stat.st_size, stat.st_mtime_ns]
    return out


def check_sources(root: Path, sources: dict[str, list[int]], cache_dir: Path, name: str,
                  command: str = "") -> None:
    """A prepared cache is only as good as its sources: a source file removed or changed since
    ``prepare`` is refused (it is checked by size and modification time, not re-read)."""
    command = command or f"python -m benchmark data prepare {name} --root {root}"
    fix = f"delete {cache_dir} and run `{command}` again"
    for rel, (size, mtime) in sources.items():
        path = root / rel
        try:
            stat = path.stat()
        except OSError:
            raise UsageError(f"source file {path} was removed after the dataset was prepared; restore it, "
                             f"or {fix}") from None
        if stat.st_size != size or stat.st_mtime_ns != mtime:
            raise UsageError(f"source file {path} changed after the dataset was prepared; {fix}")


def require(path: Path, listed_in: str, fix: str = "") -> Path:
    """``path`` if it exists; otherwise the one-line error for a file listed but missing."""
    if not path.exists():
        raise UsageError(f"{path} (listed in {listed_in}) is missing; "
                         f"{fix or 'restore it or remove its entry from ' + listed_in}")
    return path


def find_list(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for candidate in (root / name, *(p / name for p in sorted(root.iterdir()) if p.is_dir())):
            if candidate.is_file():
                return candidate
    return None


class OnDiskDataset(DatasetBuilder):
    """Base class of the readers of the paper datasets."""

    Options: ClassVar[type] = OnDiskOptions
    display: ClassVar[str] = ""
    folder: ClassVar[str] = ""
    layout: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    # --- what a reader supplies ---------------------------------------------------------------
    def class_names(self, root: Path) -> list[str]:
        raise NotImplementedError

    def index(self, root: Path, classes: list[str]) -> dict[str, list[Item]]:
        """Items of the release's own splits ("train", "test" and, if the release has one, "val")."""
        raise NotImplementedError

    def storage(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Per modality, the (per-item shape, dtype) stored in the cache."""
        raise NotImplementedError

    def decode(self, root: Path, item: Item) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def before_decode(self, root: Path, index: dict[str, list[Item]], writer: CacheWriter) -> dict[str, Any]:
        """Called once the splits are final, before any item is decoded (e.g. to build a vocabulary
        from the train split); returns extra manifest entries."""
        return {}

    def modality_specs(self) -> list[ModalitySpec]:
        raise NotImplementedError

    def transforms(self, split: str) -> dict[str, Any]:
        """Per modality, the per-sample transform of a split (default: frames get the crop/flip
        augmentation on train and a resize elsewhere, with ImageNet normalisation)."""
        out = {}
        for spec in self.modality_specs():
            if spec.kind == "frames":
                out[spec.name] = FrameTransform(self.options.image_size, split == "train",
                                                IMAGENET_MEAN, IMAGENET_STD)
        return out

    # --- the shared flow ----------------------------------------------------------------------
    def root(self) -> Path:
        root = data_root(self.options.root, self.folder)
        hint = f"expected layout: {self.layout}"
        if root is None:
            raise UsageError(f"no data root for {self.registered_name}: pass --root PATH to `data prepare`, "
                             f"or set dataset.root=PATH or {DATA_ENV} (its {self.folder}/ folder); {hint}")
        if not root.is_dir():
            raise UsageError(f"{self.registered_name} data root {root} does not exist; point dataset.root "
                             f"(or --root, or {DATA_ENV}) at the release; {hint}")
        return root

    def recipe(self, root: Path) -> dict[str, Any]:
        values = {k: v for k, v in dataclasses.asdict(self.options).items() if k not in ("root", "cache_dir")}
        return {"version": self.VERSION, "root": str(root), **values, "stored_size": self.options.stored_size}

    def cache(self, root: Path) -> DatasetCache:
        how = f"then run `python -m benchmark data prepare {self.registered_name} --root {root}`"
        return DatasetCache(self.registered_name, self.recipe(root), self.options.cache_dir, how)

    def _fill(self, root: Path, writer: CacheWriter) -> dict[str, Any]:
        classes = self.class_names(root)
        index = self.index(root, classes)
        for split in ("train", "test"):
            if not index.get(split):
                raise UsageError(f"{self.registered_name}: the {split} list under {root} has no entries; "
                                 f"expected layout: {self.layout}")
        carved = "val" not in index or not index["val"]
        if carved:
            labels = np.array([it.label for it in index["train"]])
            keep, val = stratified_split(labels, self.options.val_fraction, self.options.seed)
            train = index["train"]
            index["train"], index["val"] = [train[i] for i in keep], [train[i] for i in val]
        extra = self.before_decode(root, index, writer)
        storage = self.storage()
        used = {Path(it.listed_in) for items in index.values() for it in items}
        for split in ("train", "val", "test"):
            items = index[split]
            arrays = {m: writer.open_array(f"{split}.{m}", (len(items), *shape), dtype)
                      for m, (shape, dtype) in storage.items()}
            for row, item in enumerate(items):
                decoded = self.decode(root, item)
                used.update(decoded.pop(SOURCES, []))
                for m, array in arrays.items():
                    array[row] = decoded[m]
            for array in arrays.values():
                array.flush()
            del arrays
            writer.save_array(f"{split}.labels", np.array([it.label for it in items], dtype=np.int64))
        return {
            "classes": classes,
            "sizes": {s: len(index[s]) for s in ("train", "val", "test")},
            "splits": {s: [it.name for it in index[s]] for s in ("train", "val", "test")},
            "val_carved_from_train": carved,
            "sources": fingerprint(root, used),
            **extra,
        }

    def ensure_cache(self) -> tuple[DatasetCache, dict[str, Any], bool]:
        root = self.root()
        cache = self.cache(root)
        if cache.exists():
            manifest = cache.read_manifest()
            check_sources(root, manifest.get("sources", {}), cache.dir, self.registered_name)
            return cache, manifest, False
        return cache, cache.build(lambda writer: self._fill(root, writer)), True

    def load(self) -> MultimodalData:
        cache, manifest, _ = self.ensure_cache()
        splits = {}
        for split in ("train", "val", "test"):
            arrays = {}
            for m in self.storage():
                big = cache.array_bytes(f"{split}.{m}") > MMAP_BYTES
                arrays[m] = cache.array(f"{split}.{m}", mmap=big)
            splits[split] = CachedSplit(arrays, cache.array(f"{split}.labels"), self.transforms(split))
        info = DataInfo(self.registered_name, self.modality_specs(), len(manifest["classes"]),
                        manifest["classes"])
        return MultimodalData(info, splits, {**manifest, "cache": str(cache.dir)})

    def prepare(self) -> str:
        cache, manifest, built = self.ensure_cache()
        state = "prepared" if built else "already prepared (hash checked)"
        return f"{self.registered_name}: {state}, {manifest['sizes']} in {cache.dir}"

    def describe(self) -> dict[str, Any]:
        root = data_root(self.options.root, self.folder)
        present = root is not None and root.is_dir()
        size: Any = "?"
        prepared = False
        if present:
            cache = self.cache(root)
            prepared = cache.exists()
            if prepared:
                try:
                    size = sum(cache.read_manifest(verify=False)["sizes"].values())
                except UsageError:
                    prepared = False
        return {"modalities": [s.name for s in self.modality_specs()], "classes": self.num_classes,
                "size": size, "present": present, "prepared": prepared,
                "where": str(root) if root else f"set {DATA_ENV} or dataset.root"}

    num_classes: ClassVar[int] = 0
