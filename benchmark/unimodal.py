"""Unimodal training shared by ``unimodal``, ``ensemble``, UDI's anchor phase and MCR's
initialisation: one encoder + linear head trained with CE.

Unimodal training runs to convergence: the learning rate falls tenfold after
``unimodal_lr_decay`` epochs (default 4) without a better validation accuracy (at most twice), and
training stops after ``unimodal_patience`` epochs (default 8) without one, under an epoch cap
(``unimodal_epochs``, default the run's ``epochs``); the best epoch is restored.

A trained unimodal model is cached under the run's cache directory, keyed by everything that
determines its weights (dataset and its options, seed, modality, encoder, optimiser settings,
budget and patience, BatchNorm recalibration, device type and precision) and by a fingerprint of
the code and architecture that produced them. A later run with the same key loads the checkpoint
instead of training again, and says so in its record; a checkpoint of the same configuration made
by other code (a changed fingerprint) is retrained, and the record says why.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.claims import process_alive, wait_claim  # noqa: F401  (process_alive: imported from here)
from benchmark.config import config_hash, location_names
from benchmark.data import MultimodalData, resolve_dataset_options
from benchmark.data.cache import data_identity
from benchmark.device import amp_dtype, seeded
from benchmark.errors import UsageError
from benchmark.files import current_umask, os_error_line
from benchmark.method import Batch, EvalOutput, Stage, StepContext, options_of
from benchmark.registry import DATASETS

if TYPE_CHECKING:
    from benchmark.method import Method
    from benchmark.trainer import Trainer

# Shared options that determine a unimodal model's weights (see unimodal_key).
_KEY_FIELDS = ("dataset", "seed", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
               "scheduler", "step_size", "gamma", "precise_bn", "unimodal_lr_decay")


class UnimodalModel(nn.Module):
    """Encoder + linear head for one modality."""

    def __init__(self, modality: str, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.modality = modality
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        return self.head(feats), feats


def seed_key(modality: str) -> str:
    return f"unimodal/{modality}"


def build_unimodal(method: Method, modality: str) -> UnimodalModel:
    """A freshly initialised unimodal model, built under the modality's own seed stream so that
    every method that trains this modality from scratch starts from the same weights."""
    with seeded(method.cfg.seed, seed_key(modality)):
        return UnimodalModel(modality, method.make_encoder(modality), method.info.num_classes)


def unimodal_budget(method: Method) -> tuple[int, int]:
    """(epoch cap, patience) of unimodal training: ``unimodal_epochs`` (0 = the run's epochs)
    and ``unimodal_patience``."""
    cfg = method.cfg
    return cfg.unimodal_epochs or cfg.epochs, cfg.unimodal_patience


def unimodal_stage(model: UnimodalModel, **overrides: Any) -> Stage:
    m = model.modality

    def step(batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        logits, _ = model(batch[m])
        return {"loss": F.cross_entropy(logits, batch["label"])}

    def predict(batch: Batch) -> torch.Tensor:
        return model(batch[m])[0]

    fields = dict(name=f"unimodal:{m}", module=model, step=step, predict=predict,
                  seed_key=seed_key(m), modalities=[m])
    fields.update(overrides)
    return Stage(**fields)


def unimodal_eval(model: UnimodalModel, batch: Batch) -> EvalOutput:
    logits, feats = model(batch[model.modality])
    return EvalOutput(logits, {model.modality: logits}, {model.modality: feats})


def unimodal_key(method: Method, modality: str, data: MultimodalData) -> dict[str, Any]:
    """Everything that determines a unimodal model's weights: the dataset with its options
    resolved (defaults included) and its content, the seed, the encoder, the optimiser settings."""
    cfg = method.cfg.to_dict()
    key = {name: cfg[name] for name in _KEY_FIELDS}
    registered = method.cfg.dataset in DATASETS  # data built in code (perf's tensors) is not
    if registered:  # the dataset's options but its locations (root, cache folder): keys hold on any machine
        options = resolve_dataset_options(method.cfg.dataset, method.cfg.dataset_options)
        key["dataset_options"] = {k: v for k, v in options_of(options).items() if k not in location_names(options)}
    else:
        key["dataset_options"] = dict(method.cfg.dataset_options)
    # the data themselves, wherever they were read from (a root or cache folder is not part of it)
    key["data"] = data_identity(data.manifest)
    key["epochs"], key["patience"] = unimodal_budget(method)
    key.update(modality=modality, encoder=method.encoder_name(modality), kind="unimodal-v3")
    weights = method.cfg.encoder_weights.get(modality, "")
    if weights:  # the starting weights (left out of the key while there are none: older keys stay valid)
        key["encoder_weights"] = weights_identity(weights)
    key["device_type"] = method.device.type if getattr(method, "device", None) is not None else "cpu"
    dtype = amp_dtype(method.cfg.amp, torch.device(key["device_type"]))
    key["precision"] = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    key["fingerprint"] = code_fingerprint(build_unimodal(method, modality))
    return key


def weights_identity(path: str) -> dict[str, Any]:
    """A weights file (or folder) as the key of what training starts from: its resolved path, size
    and modification time (a file replaced under the same name gives another key)."""
    p = Path(path).expanduser().resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    stats = [(str(f.relative_to(p)) if p.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns)
             for f in files if f.exists()]
    return {"path": str(p), "files": stats}


def _training_code() -> list[Any]:
    """Code whose change changes the weights a unimodal training produces (besides the model's)."""
    from benchmark.method import fused_on_cpu, make_optimizer, zero_momentum
    from benchmark.precise_bn import recompute_batchnorm
    from benchmark.trainer import Trainer

    return [unimodal_stage, Trainer.fit, Trainer.recalibrate, recompute_batchnorm, make_optimizer, fused_on_cpu,
            zero_momentum]


def code_fingerprint(model: nn.Module) -> str:
    """A hash of the code and architecture that produce a unimodal model's weights: the source of
    every class in the model that is not PyTorch's own, the module tree (repr), the names, shapes
    and dtypes of its parameters and buffers, and the source of the training code."""
    parts = [repr(model)]
    parts += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.state_dict().items()]
    classes = sorted({type(m) for m in model.modules() if not type(m).__module__.startswith("torch")},
                     key=lambda c: f"{c.__module__}.{c.__qualname__}")
    parts += [_source(obj) for obj in [*_training_code(), *classes]]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):  # defined interactively: its name stands for it
        return getattr(obj, "__qualname__", repr(obj))


def checkpoint_path(cache_dir: str, key: dict[str, Any]) -> Path:
    """The checkpoint's file: one per configuration, whatever code made it (so that a checkpoint of
    older code is found, replaced and reported rather than left beside the new one)."""
    slot = {k: v for k, v in key.items() if k != "fingerprint"}
    return Path(cache_dir, "unimodal", f"{config_hash(slot)}.pt")


def stale_reason(saved: dict[str, Any] | None, key: dict[str, Any]) -> str | None:
    """Why a checkpoint found for this configuration is not reused (None: nothing found, or it fits)."""
    if not isinstance(saved, dict) or saved == key:
        return None
    if saved.get("fingerprint") != key.get("fingerprint"):
        return (f"checkpoint made by other code or architecture (fingerprint {saved.get('fingerprint')}, "
                f"now {key.get('fingerprint')}): retrained")
    changed = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
    return f"checkpoint made with other settings ({', '.join(changed)}): retrained"


def train_unimodal(trainer: Trainer, method: Method, modality: str) -> tuple[UnimodalModel, dict[str, Any]]:
    """Train (or reuse) the unimodal model of ``modality``; returns it with facts for the record:
    best validation accuracy, epochs, whether it was reused and from where."""
    model = build_unimodal(method, modality)
    key = unimodal_key(method, modality, trainer.data)
    epochs, patience = unimodal_budget(method)
    stage = unimodal_stage(model, epochs=epochs, patience=patience, lr_decay_after=method.cfg.unimodal_lr_decay)
    if not trainer.cache_dir:
        result = trainer.fit(stage)
        return model, dict(_facts(modality, result), reused=False, checkpoint=None)
    path = checkpoint_path(trainer.cache_dir, key)
    stale = None
    # Another process (a parallel sweep worker) may be training the same model: wait for its
    # checkpoint rather than training it twice. The claim cannot go stale (see benchmark.claims).
    claim = None
    if not path.exists():
        claim = _claim_checkpoint(path, trainer.log)
    try:
        if path.exists():
            saved = load_checkpoint(path)
            if saved.get("key") == key:
                model.load_state_dict(saved["state"])
                model.to(trainer.device)
                trainer.log(f"[unimodal:{modality}] reused checkpoint {path}")
                trainer.history.extend(saved.get("history", []))
                return model, dict(saved["info"], reused=True, checkpoint=str(path))
            stale = stale_reason(saved.get("key"), key)
            if stale:
                trainer.log(f"[unimodal:{modality}] {stale}")
        result = trainer.fit(stage)
        info = _facts(modality, result)
        try:
            _save_atomic(path, {"key": key, "state": {k: v.cpu() for k, v in model.state_dict().items()},
                                "info": info, "history": result.history})
        except OSError as exc:  # a full cache disk costs the reuse, not the trained run
            trainer.log(f"[unimodal:{modality}] warning: {os_error_line(exc, path)}; the model is not cached")
            return model, dict(info, reused=False, checkpoint=None, retrained=stale)
        return model, dict(info, reused=False, checkpoint=str(path), retrained=stale)
    finally:
        if claim is not None:
            claim.release()


def _facts(modality: str, result: Any) -> dict[str, Any]:
    return {"modality": modality, "val_accuracy": result.best_val_accuracy,
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "convergence": {"budget": result.budget, "patience": result.patience,
                            "stopped_early": result.stopped_early, "still_improving": result.still_improving}}


def _claim_checkpoint(path: Path, log: Any) -> Any:
    """Hold the checkpoint's claim (waiting, and saying for whom, while another process trains
    it); leftovers of writers that died are removed once it is held."""
    lock = path.with_suffix(".lock")
    try:
        claim = wait_claim(lock, log, f"unimodal checkpoint {path.name}")
    except OSError as exc:
        raise UsageError(f"cannot write to the unimodal cache {path.parent} ({exc.strerror}); "
                         "set cache_dir to a writable folder") from None
    for tmp in path.parent.glob(f".{path.stem}.*.tmp"):
        tmp.unlink(missing_ok=True)
    return claim


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A cached checkpoint; UsageError naming the file when it is unreadable (cut short, corrupt)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, OSError
        raise UsageError(f"cached unimodal checkpoint {path} is unreadable ({type(exc).__name__}); "
                         "delete it and the model is trained again") from None
    if not isinstance(saved, dict) or not {"key", "state", "info"} <= set(saved):
        raise UsageError(f"cached unimodal checkpoint {path} is not one written by this benchmark; "
                         "delete it and the model is trained again")
    return saved


def _save_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # shared with colleagues, like the records
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

