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

from benchmark.claims import sweep_leftovers, wait_claim
from benchmark.errors import UsageError
from benchmark.files import check_parent, check_writable_dir, current_umask, os_error_line

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


def data_identity(manifest: dict[str, Any]) -> str:
    """What the data are, wherever they were read from: a hash of the manifest without the cache
    folder's key, without its own content hash and without the folders in its recipe (a release
    copied to another root, or cached in another folder, is the same data)."""
    body = {k: v for k, v in manifest.items() if k not in ("key", "content_hash", "cache")}
    if isinstance(body.get("recipe"), dict):
        body["recipe"] = {k: v for k, v in body["recipe"].items() if k not in ("root", "cache_dir")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _say(message: str) -> None:
    import sys

    print(f"note: {message}", file=sys.stderr, flush=True)


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
        self.root_option = root_option
        self.dir = cache_root(root_option) / dataset / self.key
        self.how_to_rebuild = how_to_rebuild or "it is rebuilt on the next load"

    def exists(self) -> bool:
        return (self.dir / MANIFEST).is_file()

    def build(self, fill: Callable[[CacheWriter], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fill(writer)`` (which saves arrays and returns classes/splits/extra manifest
        entries) in a temporary folder, hash it, write the manifest and rename it into place.

        One process builds a recipe at a time (a claim on ``.<key>.lock``; another waits, then
        reads its result); temporary folders left by killed builds are removed first."""
        parent = self._writable_parent()
        try:
            claim = wait_claim(parent / f".{self.key}.lock", _say, f"the {self.dataset} cache being built")
        except OSError as exc:
            raise UsageError(f"cannot write in the cache folder {parent} ({exc.strerror}); set {CACHE_ENV} or "
                             "dataset.cache_dir to a writable folder") from None
        assert claim is not None
        with claim:
            if self.exists():  # built by the process we waited for
                return self.read_manifest()
            for old in parent.glob(f".{self.key}.*.tmp"):  # ours to remove: we hold the claim
                shutil.rmtree(old, ignore_errors=True)
            sweep_leftovers(parent.glob(".*.*.tmp"), lambda p: parent / f".{p.name.split('.')[1]}.lock"
                            if p.name.split(".")[1] != self.key else None)
            return self._build(parent, fill)

    def _writable_parent(self) -> Path:
        """``<cache>/<dataset>``, created and test-written; a given cache_dir must already have its parent."""
        root = self.dir.parent.parent
        if self.root_option:
            check_parent(root, "dataset.cache_dir")
        parent = self.dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)  # a given cache_dir's parent exists (checked above)
        except OSError as exc:
            raise UsageError(f"cannot create the cache folder {parent} ({exc.strerror}); "
                             f"set {CACHE_ENV} or dataset.cache_dir to a writable folder") from None
        check_writable_dir(parent, "dataset.cache_dir")
        return parent

    def _build(self, parent: Path, fill: Callable[[CacheWriter], dict[str, Any]]) -> dict[str, Any]:
        try:
            tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.key}.", suffix=".tmp"))
        except OSError as exc:
            raise UsageError(os_error_line(exc, parent)) from None
        try:
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; colleagues share caches
            writer = CacheWriter(tmp)
            entries = fill(writer)
            manifest = {"dataset": self.dataset, "key": self.key, "recipe": self.recipe, **entries,
                        "files": {name: file_sha256(tmp / name) for name in sorted(writer.files)}}
            manifest["content_hash"] = content_hash(manifest)
            with open(tmp / MANIFEST, "w") as fh:
                json.dump(manifest, fh, indent=1, sort_keys=True, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            if self.dir.exists():  # a stale folder without a manifest
                shutil.rmtree(self.dir, ignore_errors=True)
            os.rename(tmp, self.dir)
        except OSError as exc:  # a full disk while writing: one line, and the partial folder goes
            raise UsageError(os_error_line(exc, tmp)) from None
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
