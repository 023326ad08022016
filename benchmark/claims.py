"""Cross-process claims on files: one mechanism for the store's run records, the shared unimodal
checkpoints, dataset cache builds and the temporary files they leave behind.

A claim is an advisory ``flock`` on a lock file. The kernel drops it when its holder ends, however
it ends (SIGKILL, a node reboot on NFSv4 included), so a claim can never be left stale: a lock file
whose holder is gone (a dead pid, another host's pid, an empty file left by a full disk, a pid
reused by an unrelated process) is simply taken by the next process that tries. The file's text
(``host:pid since <time>``) only tells a waiting process whom it waits for; it is never trusted.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


def owner_text() -> str:
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"{socket.gethostname()}:{os.getpid()} since {since}"


@dataclass
class Claim:
    """A held claim; ``release`` (or the end of the process) frees it."""

    path: Path
    fd: int

    def release(self, remove: bool = True) -> None:
        if self.fd < 0:
            return
        if remove:  # whoever opened the old path re-checks the inode and tries again
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only folder: the lock file stays, harmless (the lock is what counts)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_claim(path: Path) -> Claim | None:
    """Take the claim on ``path`` without waiting; None when another live process holds it.
    Raises OSError when the lock file cannot be created (a read-only or missing folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # The previous holder may have removed the path after finishing: our lock must be on the
        # file that the path names now, else another process could lock a new file beside us.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:  # who holds it, for those who wait; a full disk leaves the file empty, which is harmless
        os.ftruncate(fd, 0)
        os.write(fd, (owner_text() + "\n").encode())
    except OSError:
        pass
    return Claim(path, fd)


def holder(path: Path) -> str:
    """Who holds the claim on ``path`` and since when, as its holder wrote it ("unknown" if not)."""
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "unknown holder"


def wait_claim(path: Path, on_wait: Callable[[str], None] | None = None, what: str = "",
               poll: float = 0.2, notice_every: float = 60.0, timeout: float | None = None) -> Claim | None:
    """Take the claim on ``path``, waiting while a live process holds it. ``on_wait`` hears who
    holds it and since when (at once, then every ``notice_every`` seconds). None after ``timeout``."""
    start = time.monotonic()
    last_notice = -notice_every
    while True:
        claim = try_claim(path)
        if claim is not None:
            return claim
        now = time.monotonic()
        if timeout is not None and now - start >= timeout:
            return None
        if on_wait is not None and now - last_notice >= notice_every:
            on_wait(f"waiting for {what or path}: held by {holder(path)}")
            last_notice = now
        time.sleep(poll)


def sweep_leftovers(paths: Iterator[Path] | list[Path], lock_of: Callable[[Path], Path | None]) -> list[Path]:
    """Remove temporary files or folders whose writer is gone: each is removed only while its
    claim (``lock_of(path)``) can be taken, so one being written right now is left alone."""
    import shutil

    removed = []
    for path in paths:
        lock = lock_of(path)
        if lock is None:
            continue
        try:
            claim = try_claim(lock)
        except OSError:
            continue
        if claim is None:
            continue
        with claim:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
