"""The dataset cache: where prepared datasets live, their manifest, and its content hash.

A prepared dataset is one folder ``<cache>/<dataset>/<key>/`` holding array files and a
``manifest.json`` (dataset, recipe, classes, split sizes, per-file SHA-256 and a content hash
over all of it). ``key`` is a hash of the recipe, so a changed option builds a new folder
instead of reusing a stale one. A folder is written under a temporary name and renamed into
place at the end: an interrupted or failed build never leaves a partial cache behind.

The cache root is, in order: the dataset's ``cache_dir`` option, ``$BMB_CACHE_DIR``,
``$XDG_CACHE_HOME/balanced-mm-bench``, ``~/.cache/balanced-mm-bench``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.errors import UsageError

CACHE_ENV = "BMB_CACHE_DIR"
DATA_ENV = "BMB_DATA_ROOT"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def cache_root(option: str = "") -> Path:
    """The folder that holds every dataset's cache."""
    if option:
        return Path(option).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "balanced-mm-bench"


def data_root(option: str, folder: str) -> Path | None:
    """A dataset's root: its ``root`` option, else ``$BMB_DATA_ROOT/<folder>``; None if neither."""
    if option:
        return Path(option).expanduser().resolve()
    if os.environ.get(DATA_ENV):
        return (Path(os.environ[DATA_ENV]).expanduser() / folder).resolve()
    return None


def recipe_key(recipe: dict[str, Any]) -> str:
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(manifest: dict[str, Any]) -> str:
    """SHA-256 over everything in the manifest but the hash itself (files enter by their hashes)."""
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class CacheWriter:
    """Collects the files of one cache folder being built in a temporary sibling folder."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.files: list[str] = []

    def save_array(self, name: str, array: np.ndarray) -> None:
        path = self.dir / f"{name}.npy"
        np.save(path, np.ascontiguousarray(array), allow_pickle=False)
        self.files.append(path.name)

    def open_array(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A writable memory-mapped ``.npy`` to be filled in place (for sets larger than memory)."""
        path = self.dir / f"{name}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.files.append(path.name)
        return array


class DatasetCache:
    """One dataset's cache folder for one recipe."""

    def __init__(self, dataset: str, recipe: dict[str, Any], root_option: str = "",
                 how_to_rebuild: str = "") -> None:
        self.dataset = dataset
        self.recipe = {"format": FORMAT_VERSION, **recipe}
        self.key = recipe_key(self.recipe)
        self.dir = cache_root(root_option) / dataset / self.key
        self.how_to_rebuild = how_to_rebuild or "it is rebuilt on the next load"

    def exists(self) -> bool:
        return (self.dir / MANIFEST).is_file()

    def build(self, fill: Callable[[CacheWriter], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fill(writer)`` (which saves arrays and returns classes/splits/extra manifest
        entries) in a temporary folder, hash it, write the manifest and rename it into place."""
        parent = self.dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the cache folder {parent} ({exc.strerror}); "
                             f"set {CACHE_ENV} or dataset.cache_dir to a writable folder") from None
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.key}.", suffix=".tmp"))
        try:
            writer = CacheWriter(tmp)
            entries = fill(writer)
            manifest = {"dataset": self.dataset, "key": self.key, "recipe": self.recipe, **entries,
                        "files": {name: file_sha256(tmp / name) for name in sorted(writer.files)}}
            manifest["content_hash"] = content_hash(manifest)
            with open(tmp / MANIFEST, "w") as fh:
                json.dump(manifest, fh, indent=1, sort_keys=True, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.rename(tmp, self.dir)
            except OSError:
                if (self.dir / MANIFEST).is_file():  # a concurrent build of the same recipe finished first
                    return self.read_manifest()
                shutil.rmtree(self.dir, ignore_errors=True)  # a stale folder without a manifest
                os.rename(tmp, self.dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return manifest

    def read_manifest(self, verify: bool = True) -> dict[str, Any]:
        """The manifest, after checking that every listed file is there with its hash."""
        fix = f"delete {self.dir} ({self.how_to_rebuild})"
        path = self.dir / MANIFEST
        try:
            with open(path) as fh:
                manifest = json.load(fh)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cache manifest {path} is unreadable ({exc}); {fix}") from None
        if not isinstance(manifest, dict) or "files" not in manifest or "content_hash" not in manifest:
            raise UsageError(f"cache manifest {path} is incomplete; {fix}")
        if content_hash(manifest) != manifest["content_hash"]:
            raise UsageError(f"cache manifest {path} does not match its content hash (edited?); {fix}")
        if verify:
            for name, digest in manifest["files"].items():
                file = self.dir / name
                if not file.is_file():
                    raise UsageError(f"cache file {file} listed in its manifest is missing; {fix}")
                if file_sha256(file) != digest:
                    raise UsageError(f"cache file {file} does not match the hash in its manifest; {fix}")
        return manifest

    def array(self, name: str, mmap: bool = False) -> np.ndarray:
        return np.load(self.dir / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)

    def array_bytes(self, name: str) -> int:
        return (self.dir / f"{name}.npy").stat().st_size
