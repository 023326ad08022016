"""Checkpoints of a run's selected model (``--set save_checkpoint=true``) and their reloading.

A checkpoint is one file beside the record, ``<record name>.pt``, written atomically (a temporary
file in the same folder, then renamed), holding plain values and tensors only, so that
``torch.load(weights_only=True)`` reads it:

- ``state_dict``: the method's whole evaluated model (for UDI the anchor and every follower,
  ``units.<modality>.*``; for an ensemble every unimodal model), on the CPU;
- ``config``: the run's resolved configuration (the record's ``config``), from which the method is
  rebuilt; ``key``, ``record`` (the record file's name), ``method``, ``dataset``, ``seed``;
- ``method_state``: what the method's prediction reads besides its weights
  (:meth:`benchmark.method.Method.checkpoint_state`; UDI: the anchor and the follower order);
- ``metrics``: the record's test and validation accuracy, for comparison.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmark import files
from benchmark.errors import UsageError

if TYPE_CHECKING:
    from benchmark.data import MultimodalData
    from benchmark.method import Method

FORMAT = 1
KIND = "balanced-mm-bench checkpoint"
SUFFIX = ".pt"


def checkpoint_path(record_file: Path) -> Path:
    return record_file.with_suffix(SUFFIX)


def _plain(value: Any) -> Any:
    """JSON-able values only (what ``weights_only`` loading accepts)."""
    return json.loads(json.dumps(value, default=str))


def save_checkpoint(path: Path, method: Method, resolved: dict[str, Any], record: dict[str, Any],
                    record_file: Path) -> None:
    """The trained ``method``'s model with its run's resolved configuration, beside ``record_file``."""
    cfg = method.cfg
    metrics = record.get("metrics") or {}
    payload = {
        "format": FORMAT, "kind": KIND, "key": record.get("key"), "record": record_file.name,
        "method": cfg.method, "dataset": cfg.dataset, "seed": cfg.seed,
        "config": _plain(resolved), "method_state": _plain(method.checkpoint_state()),
        "metrics": {"accuracy": metrics.get("accuracy"), "val_accuracy": metrics.get("val_accuracy")},
        "state_dict": {k: v.detach().to("cpu", copy=True).contiguous() for k, v in method.model.state_dict().items()},
    }
    write_atomic(path, payload)


def write_atomic(path: Path, payload: Any) -> None:
    """torch.save through a temporary file in the same folder, then rename: never half a file."""
    files.write_atomic(path, lambda fh: torch.save(payload, fh), binary=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    fix = "give a checkpoint written by a run with --set save_checkpoint=true"
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist; {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not written by torch.save
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise UsageError(f"cannot read checkpoint {path} ({reason}); {fix}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        raise UsageError(f"{path} is not a checkpoint of this suite; {fix}")
    if ckpt.get("format") != FORMAT:
        raise UsageError(f"checkpoint {path} has format {ckpt.get('format')!r}, this code reads {FORMAT}; "
                         "re-run the run with this version to make a new one")
    return ckpt


def config_of(ckpt: dict[str, Any], device: str = "") -> Any:
    """The run's :class:`RunConfig` from a checkpoint. Weights files of timm/torchvision encoders
    are not read again (the checkpoint holds the trained weights); an ``hf`` folder is (it
    defines the architecture)."""
    from benchmark.config import RunConfig

    known = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    cfg.encoder_weights = {m: w for m, w in (cfg.encoder_weights or {}).items()
                           if ":" not in (cfg.encoder.get(m) or "")}
    if device:
        cfg.device = device
    cfg.validate()
    return cfg


def restore(ckpt: dict[str, Any], cfg: Any, data: MultimodalData, device: torch.device) -> Method:
    """The method rebuilt from its configuration, with the checkpoint's state and weights."""
    from benchmark.method import build_method, create_method

    method = create_method(cfg.method, data.info, cfg)
    method.device = device
    build_method(method)
    method.load_checkpoint_state(ckpt.get("method_state") or {})
    state = ckpt["state_dict"]
    own = method.model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    other = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or other:
        example = (missing or unexpected or other)[0]
        raise UsageError(f"the checkpoint's weights do not fit the {cfg.method} model built from its configuration "
                         f"({len(missing)} missing, {len(unexpected)} unexpected, {len(other)} of another shape, "
                         f"e.g. {example}); evaluate it with the code version that trained it")
    method.model.load_state_dict(state, strict=True)
    method.model.to(device)
    method.model.eval()
    return method


__all__ = ["checkpoint_path", "config_of", "load_checkpoint", "restore", "save_checkpoint"]
