"""A guard for tests: which calls from the methods' code would make the host wait for the device."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_SYNCING = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "to")


@contextlib.contextmanager
def host_syncs(code_dirs: tuple[str, ...] = ("udi", "baselines")) -> Iterator[list[str]]:
    """Records every call, made from the methods' own code, that would make the host wait for an
    accelerator: reading a tensor's value (item, tolist, bool, float, int, nonzero) or copying it
    between devices (cpu, numpy, .to(<device>)). On the CPU these cost nothing, so they are
    counted, not timed."""
    root = Path(__file__).resolve().parents[1]
    dirs = tuple(str(root / d) + "/" for d in code_dirs)
    calls: list[str] = []
    saved = {name: torch.Tensor.__dict__.get(name) for name in _SYNCING}

    def wrap(name: str, orig: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            frame = sys._getframe(1)
            moves = name != "to" or any(isinstance(a, (torch.device, str)) for a in (*args, *kwargs.values()))
            if frame.f_code.co_filename.startswith(dirs) and moves:
                calls.append(f"{name} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
            return orig(self, *args, **kwargs)
        return wrapper

    for name in _SYNCING:
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        yield calls
    finally:
        for name, orig in saved.items():
            if orig is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, orig)
