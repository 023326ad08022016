"""Worker processes that never outlive their parent and leave Ctrl-C to it.

``start_workers`` starts processes with SIGINT blocked, so a Ctrl-C that arrives while a worker is
still importing cannot make it print a traceback; ``worker_init`` (first thing in the worker) asks
the kernel to kill the worker when its parent dies, however the parent dies (Linux), ignores
SIGINT (the parent ends its workers on Ctrl-C) and unblocks it again. Elsewhere a thread watches
the parent instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

PR_SET_PDEATHSIG = 1
# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
HEAP_TRIM_THRESHOLD = 1 << 30
HEAP_TOP_PAD = 64 << 20


def keep_freed_memory() -> bool:
    """Let this process's allocator keep the memory a training step frees, for the next step.

    A CPU training step allocates and frees the same few megabyte-sized tensors (activations,
    their gradients) at every step. glibc's defaults serve a block that large with a fresh
    ``mmap`` (or give the top of the heap back to the system once it is free), so every step
    touches new pages and pays a page fault for each 4 KiB of them: on this suite's 2-core
    virtual machine, a SmallCNN step on 1×40×101 spectrograms took 9,000 minor faults and
    about 70 ms, and about 50 ms without them. Blocks up to 32 MiB now come from the heap, and
    the heap is neither trimmed below 1 GiB of free top nor grown by less than 64 MiB. It changes
    where memory comes from, never a value computed. glibc (Linux) only; True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    return all(mallopt(param, value) == 1 for param, value in ((M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD),
                                                              (M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD),
                                                              (M_TOP_PAD, HEAP_TOP_PAD)))


def start_workers(procs: Iterable[Any]) -> None:
    """``proc.start()`` for each, with SIGINT blocked while they start (they inherit the mask)."""
    blocked = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for proc in procs:
            proc.start()
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def worker_init() -> None:
    """Die with the parent; leave Ctrl-C to it."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent ends (Linux: PR_SET_PDEATHSIG; elsewhere a
    thread that polls the parent's pid)."""
    import multiprocessing as mp

    spawner = mp.parent_process()  # the process that started us, even if it is already gone
    parent = spawner.pid if spawner is not None and spawner.pid else os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before the request took effect
                os.kill(os.getpid(), signal.SIGKILL)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
