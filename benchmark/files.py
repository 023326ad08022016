"""Filesystem checks shared by the commands: prove a folder writable before work starts, and turn
an operating-system error into one line naming the path and the fix."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from benchmark.errors import UsageError

_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)
_IN_THE_WAY = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST)


def fix_for(exc: OSError) -> str:
    """What to do about a failed write, by its cause."""
    if exc.errno in _FULL:
        return "free space on that disk or choose another folder"
    if exc.errno in _DENIED:
        return "fix its permissions (or the mount) or choose another folder"
    if exc.errno in _IN_THE_WAY:
        return "a file stands where a folder is expected (or the reverse): move it or choose another path"
    return "check the path or choose another folder"


def os_error_line(exc: OSError, path: str | Path | None = None) -> str:
    """One line for a failed filesystem call: the path, the cause and the fix."""
    where = path or exc.filename or "a file"
    return f"cannot write {str(where)!r} ({exc.strerror or exc}); {fix_for(exc)}"


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable_dir(path: Path, flag: str) -> None:
    """Create ``path`` (whose parent must exist) and write, sync and remove a small file in it;
    UsageError naming the folder if any step fails (read-only, full, a file in the way)."""
    created = not path.exists()
    try:
        path.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test-")
        try:
            os.write(fd, b"x" * 4096)  # a full disk refuses data, not always an empty file
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        if created:  # leave nothing behind
            with contextlib.suppress(OSError):
                path.rmdir()
        raise UsageError(f"cannot write in {str(path)!r} ({exc.strerror or exc}); {fix_for(exc)}, "
                         f"or give another {flag}") from None


def check_parent(path: Path, flag: str) -> None:
    """A folder to be created must have an existing parent (a typo is refused, not created) and
    must not be a file."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a file; give a folder")
    parent = path.expanduser().resolve().parent
    if not path.exists() and not parent.is_dir():
        raise UsageError(f"{flag}'s parent folder {str(parent)!r} does not exist; create it or choose "
                         f"another {flag}")


def write_atomic(path: Path, write: Callable[[IO[Any]], None], binary: bool = False) -> None:
    """``write(file)`` into a temporary file in the same folder, synced, then renamed over ``path``:
    never a half-written file. The file gets the usual permissions (0666 less the umask), so
    colleagues can read a shared store. A failure (full disk, read-only folder) is one line
    naming the file, and the temporary file goes."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UsageError(os_error_line(exc, path)) from None
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(os_error_line(exc, path)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, through :func:`write_atomic`."""
    text = json.dumps(data, indent=1, default=str, allow_nan=True)
    write_atomic(path, lambda fh: fh.write(text))
