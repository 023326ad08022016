"""The result store: one JSON record per run, keyed by the hash of the run's resolved config.

Layout of a store folder::

    records/<dataset>/<method>-<dataset>-seed<seed>-<key>.json   one record per run (benchmark.record)
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

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmark.claims import Claim, holder, sweep_leftovers, try_claim, wait_claim
from benchmark.errors import UsageError
from benchmark.record import check, key_of, record_name  # noqa: F401  (key_of, record_name: read from here too)

RECORDS, CLAIMS, CACHE, LOGS = "records", "claims", "cache", "logs"


class Store:
    """A folder of run records (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    # --- checks ---------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Create the folder if its parent exists, and prove it is writable; UsageError if not."""
        from benchmark.files import check_writable_dir

        root = self.root
        if root.exists() and not root.is_dir():
            raise UsageError(f"store {str(root)!r} is a file; give a folder with --store")
        if not root.exists() and not root.resolve().parent.is_dir():
            raise UsageError(f"store's parent folder {str(root.resolve().parent)!r} does not exist; "
                             "create it or choose another --store")
        check_writable_dir(root, "--store")

    def check_readable(self) -> None:
        if not self.root.is_dir():
            raise UsageError(f"store {str(self.root)!r} does not exist; run a sweep into it first "
                             "or give the folder of the records with --store")

    # --- paths ----------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE

    def record_path(self, dataset: str, method: str, seed: int, key: str) -> Path:
        return self.root / RECORDS / dataset / record_name(method, dataset, seed, key)

    def log_path(self, key: str) -> Path:
        return self.root / LOGS / f"{key}.log"

    # --- reading ----------------------------------------------------------------------------
    def record_files(self) -> list[Path]:
        return sorted((self.root / RECORDS).glob("*/*.json"))

    def status_by_key(self) -> dict[str, str]:
        """key → "ok" / "failed" / "corrupt" for every record file (reads each file)."""
        out: dict[str, str] = {}
        for path in self.record_files():
            record = self.read(path)
            out[key_of(path)] = "corrupt" if record is None else record["status"]
        return out

    def records(self, status: str | None = "ok") -> Iterator[dict[str, Any]]:
        """Every whole record (those with ``status``, or all when None); the others are listed in
        ``self.bad`` as (path, problem) for the caller to report."""
        self.bad: list[tuple[Path, str]] = []
        for path in self.record_files():
            record, problem = check_record(path)
            if record is None:
                self.bad.append((path, problem))
            elif status is None or record.get("status") == status:
                yield record

    def read(self, path: Path) -> dict[str, Any] | None:
        """The record at ``path`` if it is whole; None if it is absent, unreadable or lacks a
        required field (such a record is run again)."""
        return check_record(path)[0]

    # --- claims and writing -----------------------------------------------------------------
    def claim_path(self, key: str) -> Path:
        return self.root / CLAIMS / f"{key}.lock"

    def claim(self, key: str) -> Claim | None:
        """Take the claim on ``key`` without waiting; None when another process holds it."""
        return try_claim(self.claim_path(key))

    def wait(self, key: str, on_wait: Callable[[str], None] | None = None, what: str = "") -> Claim:
        """Take the claim on ``key``, waiting (and saying for whom) while another process holds it."""
        claim = wait_claim(self.claim_path(key), on_wait, what or f"run {key}")
        assert claim is not None
        return claim

    def holder(self, key: str) -> str:
        return holder(self.claim_path(key))

    def sweep_temporary(self) -> list[Path]:
        """Remove the temporary record files of writers that are gone (a killed sweep)."""
        def lock_of(tmp: Path) -> Path | None:
            name = tmp.name[1:].split(".json.", 1)[0]  # .<record name>.json.<random>.tmp
            return self.claim_path(name.rsplit("-", 1)[-1]) if "-" in name else None

        return sweep_leftovers(sorted((self.root / RECORDS).glob("*/.*.tmp")), lock_of)

    def write(self, path: Path, record: dict[str, Any]) -> None:
        from benchmark.files import write_json_atomic

        write_json_atomic(path, record)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None if it cannot be parsed (a corrupt or foreign file)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_record(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(record, "") for a whole record, else (None, what is wrong with it)."""
    record = read_record(path)
    problem = check(record)
    return (None, problem) if problem else (record, "")


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
