"""Helpers shared by tests: a guard against host-device synchronisation, record comparison."""

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


def guard_steps(stage: Any) -> list[list[str]]:
    """Wrap ``stage.step`` so that each step's host reads (see ``host_syncs``) are appended, one
    list per step, to the returned list as the stage trains."""
    per_step: list[list[str]] = []
    step = stage.step

    def guarded(batch: Any, ctx: Any) -> Any:
        with host_syncs() as calls:
            out = step(batch, ctx)
        per_step.append(calls)
        return out

    stage.step = guarded
    return per_step


def assert_same_run(a: dict, b: dict) -> None:
    """Two result records trained identically: same metrics and per-epoch history."""
    for key in ("accuracy", "macro_f1", "val_accuracy", "probe_accuracy"):
        assert a["metrics"][key] == b["metrics"][key], key
    for row_a, row_b in zip(a["history"], b["history"], strict=True):
        assert row_a["train_loss"] == row_b["train_loss"]
        assert row_a["val_accuracy"] == row_b["val_accuracy"]


def wide_mlp(monkeypatch) -> str:
    """An encoder that reads vectors but gives 256 features (the built-in mlp gives 128)."""
    from benchmark.models.encoders import MLPEncoder
    from benchmark.registry import ENCODERS

    monkeypatch.setitem(ENCODERS._entries, "wide_mlp", lambda spec: MLPEncoder(spec, hidden=256))
    return "wide_mlp"
