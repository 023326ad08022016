"""The result store: one JSON record per run, keyed by the hash of the run's resolved config.

Layout of a store folder::

    records/<dataset>/<method>-seed<seed>-<key>.json   one record per run (status ok or failed)
    claims/<key>.lock                                   held (flock) while a process runs <key>
    cache/                                              unimodal checkpoints shared by the runs
    logs/<key>.log                                      the training log of each run

A process runs a key only while it holds the key's claim, an advisory ``flock`` that the kernel
drops when the process ends, however it ends (SIGKILL included): a killed sweep leaves no stale
claim behind, and two sweeps on one store never run the same key twice (on several machines
the store must be on a file system with working ``flock``, e.g. NFSv4 or a local disk). Records
are written through a temporary file and a rename, so a reader sees a whole record or none.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.errors import UsageError

RECORDS, CLAIMS, CACHE, LOGS = "records", "claims", "cache", "logs"


def record_name(method: str, seed: int, key: str) -> str:
    return f"{method}-seed{seed}-{key}.json"


def key_of(path: Path) -> str:
    return path.stem.rsplit("-", 1)[-1]


@dataclass
class Claim:
    """A held claim on one key; ``release`` (or process exit) frees it."""

    path: Path
    fd: int

    def release(self, remove: bool = True) -> None:
        if self.fd < 0:
            return
        if remove:  # the record exists now: whoever opens the path later re-checks and skips
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


class Store:
    """A folder of run records (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    # --- checks ---------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Create the folder if its parent exists, and prove it is writable; UsageError if not."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise UsageError(f"store {str(root)!r} is a file; give a folder with --store")
        if not root.exists():
            if not root.resolve().parent.is_dir():
                raise UsageError(f"store's parent folder {str(root.resolve().parent)!r} does not exist; "
                                 "create it or choose another --store")
            try:
                root.mkdir()
            except OSError as exc:
                raise UsageError(f"cannot create store {str(root)!r} ({exc.strerror}); "
                                 "choose another --store") from None
        try:
            fd, tmp = tempfile.mkstemp(dir=root, prefix=".write-test-")
            os.close(fd)
            os.unlink(tmp)
        except OSError:
            raise UsageError(f"store {str(root)!r} is not writable; fix its permissions or choose "
                             "another --store") from None

    def check_readable(self) -> None:
        if not self.root.is_dir():
            raise UsageError(f"store {str(self.root)!r} does not exist; run a sweep into it first "
                             "or give the folder of the records with --store")

    # --- paths ----------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE

    def record_path(self, dataset: str, method: str, seed: int, key: str) -> Path:
        return self.root / RECORDS / dataset / record_name(method, seed, key)

    def log_path(self, key: str) -> Path:
        return self.root / LOGS / f"{key}.log"

    # --- reading ----------------------------------------------------------------------------
    def record_files(self) -> list[Path]:
        return sorted((self.root / RECORDS).glob("*/*.json"))

    def status_by_key(self) -> dict[str, str]:
        """key → "ok" / "failed" / "corrupt" for every record file (reads each file)."""
        out: dict[str, str] = {}
        for path in self.record_files():
            record = read_record(path)
            out[key_of(path)] = "corrupt" if record is None else str(record.get("status", "corrupt"))
        return out

    def records(self, status: str | None = "ok") -> Iterator[dict[str, Any]]:
        """Every readable record (those with ``status``, or all when None)."""
        for path in self.record_files():
            record = read_record(path)
            if record is not None and (status is None or record.get("status") == status):
                yield record

    def read(self, path: Path) -> dict[str, Any] | None:
        return read_record(path)

    # --- claims and writing -----------------------------------------------------------------
    def claim(self, key: str) -> Claim | None:
        """Take the claim on ``key`` without waiting; None when another process holds it."""
        path = self.root / CLAIMS / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The holder may have removed the path after finishing: our lock must be on the live file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return self.claim(key)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.uname().nodename}:{os.getpid()}\n".encode())
        return Claim(path, fd)

    def write(self, path: Path, record: dict[str, Any]) -> None:
        from benchmark.runner import write_json_atomic  # (reading a store needs no torch)

        write_json_atomic(path, record)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None if it cannot be parsed (a corrupt or foreign file)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def count_unimodal_reuse(record: dict[str, Any]) -> tuple[int, int]:
    """(trained, reused) unimodal models of a record, from the ``reused`` facts in its
    ``method_record`` (unimodal, ensemble, UDI's anchor phase, MCR's initialisation)."""
    trained = reused = 0

    def walk(node: Any) -> None:
        nonlocal trained, reused
        if isinstance(node, dict):
            if isinstance(node.get("reused"), bool):
                if node["reused"]:
                    reused += 1
                else:
                    trained += 1
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(record.get("method_record") or {})
    return trained, reused
