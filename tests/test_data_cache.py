"""The dataset cache: where it lives, atomic builds, and what a load checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmark.data.cache import DatasetCache, cache_root, data_root
from benchmark.errors import UsageError


def fill_with(values: np.ndarray):
    def fill(writer):
        writer.save_array("train.x", values)
        big = writer.open_array("train.y", (3, 2), np.uint8)
        big[:] = 7
        big.flush()
        return {"classes": ["a", "b"], "sizes": {"train": 3}}
    return fill


def test_cache_root_precedence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("BMB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "balanced-mm-bench"
    monkeypatch.setenv("BMB_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "opt")) == tmp_path / "opt"
    monkeypatch.delenv("BMB_DATA_ROOT", raising=False)
    assert data_root("", "CREMA-D") is None
    monkeypatch.setenv("BMB_DATA_ROOT", str(tmp_path))
    assert data_root("", "CREMA-D") == (tmp_path / "CREMA-D").resolve()


def test_build_then_read_back(tmp_path: Path) -> None:
    cache = DatasetCache("toy", {"n": 3}, str(tmp_path))
    manifest = cache.build(fill_with(np.arange(3.0)))
    assert cache.exists() and manifest == cache.read_manifest()
    assert set(manifest["files"]) == {"train.x.npy", "train.y.npy"}
    assert np.array_equal(cache.array("train.x"), np.arange(3.0))
    assert cache.array("train.y", mmap=True).sum() == 42
    assert DatasetCache("toy", {"n": 4}, str(tmp_path)).dir != cache.dir  # keyed by recipe


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def broken(writer):
        writer.save_array("train.x", np.zeros(5))
        raise UsageError("a source file is corrupt")

    cache = DatasetCache("toy", {"n": 3}, str(tmp_path))
    with pytest.raises(UsageError):
        cache.build(broken)
    assert list((tmp_path / "toy").iterdir()) == []


def test_concurrent_build_keeps_the_first_and_stale_folders_are_replaced(tmp_path: Path) -> None:
    first = DatasetCache("toy", {"n": 3}, str(tmp_path))
    manifest = first.build(fill_with(np.arange(3.0)))
    again = DatasetCache("toy", {"n": 3}, str(tmp_path)).build(fill_with(np.arange(3.0)))
    assert again == manifest
    assert [p.name for p in (tmp_path / "toy").iterdir()] == [first.dir.name]  # no temporary left
    stale = DatasetCache("toy", {"n": 5}, str(tmp_path))
    stale.dir.mkdir()
    (stale.dir / "leftover.npy").write_bytes(b"x")
    stale.build(fill_with(np.ones(3)))
    assert not (stale.dir / "leftover.npy").exists() and stale.read_manifest()


def test_missing_or_changed_file_is_refused(tmp_path: Path) -> None:
    cache = DatasetCache("toy", {"n": 3}, str(tmp_path), how_to_rebuild="it is rebuilt on the next load")
    cache.build(fill_with(np.arange(3.0)))
    np.save(cache.dir / "train.x.npy", np.arange(3.0) + 1)
    with pytest.raises(UsageError, match=r"train\.x\.npy does not match the hash .*rebuilt on the next load"):
        cache.read_manifest()
    (cache.dir / "train.x.npy").unlink()
    with pytest.raises(UsageError, match=r"train\.x\.npy listed in its manifest is missing"):
        cache.read_manifest()
    (cache.dir / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match="manifest.json is unreadable"):
        cache.read_manifest()
