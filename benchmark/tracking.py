"""Experiment tracking beside the JSON record (``--set log=tensorboard`` or ``log=mlflow``).

The record stays the source of truth; the logs are a view of it for TensorBoard or MLflow:

- during training, every numeric field of each per-epoch history row, tagged ``<stage>/<field>``
  at step = the stage's epoch (UDI's rows carry the controller's ``lambda_con``, ``lambda_com``,
  ``ip_con``, ``ip_com``: its weights per epoch);
- after the run: the test metrics (``test/accuracy``, ``test/macro_f1``, ``test/val_accuracy``,
  ``test/unimodal_accuracy/<m>``, ``test/probe_accuracy/<m>``), the method record's controller
  trace (UDI: ``udi/controller/<follower>/<field>`` per epoch) and the diagnostics' scalars
  (``diagnostics/shapley/<m>``, ``diagnostics/imbalance_degree``, ``diagnostics/noise_accuracy/<m>/sigma_<σ>``,
  ``diagnostics/noise_auc/<m>``, ``diagnostics/absent_accuracy/<m>``, ``diagnostics/utilisation/<m>``,
  ``diagnostics/d_util``, ``diagnostics/subset_accuracy/<subset>``, and ρ per epoch as
  ``<stage>/rho/<m>``).

A run writes TensorBoard events into ``<log_dir>/<record name>.tensorboard`` (``log_dir``: the
record's folder unless set), so that ``tensorboard --logdir <log_dir>`` shows every run by name;
MLflow runs go into the file store ``<log_dir>/mlruns`` (experiment ``balanced-mm-bench``, run
name = the record's name).

This module imports neither torch nor the tracking packages at its top level.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmark.errors import UsageError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
MLFLOW_EXPERIMENT = "balanced-mm-bench"

Scalar = tuple[str, float, int]  # (tag, value, step)


def check_tracking(log: str, log_dir: str) -> None:
    """Before any training: the backend's package is installed and ``log_dir`` can be a folder."""
    if not log:
        return
    package = PACKAGES[log]
    if importlib.util.find_spec(package) is None:
        extra = " (or 'balanced-mm-bench[log]')" if log == "tensorboard" else ""
        raise UsageError(f"log={log} needs the package {package}; pip install {package}{extra}, or leave log empty")
    if log_dir:
        path = Path(log_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise UsageError(f"log_dir {log_dir!r} is a file; give a folder with --set log_dir=...")
        if not path.exists() and not path.resolve().parent.is_dir():
            raise UsageError(f"log_dir's parent {str(path.resolve().parent)!r} does not exist; create it or "
                             "choose another log_dir")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def epoch_scalars(row: dict[str, Any]) -> list[Scalar]:
    """Every numeric field of a history row (but the epoch, its step), tagged by its stage."""
    stage, step = str(row.get("stage", "train")), int(row.get("epoch", 0))
    out = []
    for key, value in row.items():
        number = _number(value)
        if key not in ("stage", "epoch") and number is not None:
            out.append((f"{stage}/{key}", number, step))
    return out


def _flat(prefix: str, mapping: Any) -> Iterator[Scalar]:
    """``prefix/<key>`` for each number of a (nested) mapping, step 0."""
    if not isinstance(mapping, dict):
        return
    for key, value in mapping.items():
        number = _number(value)
        if number is not None:
            yield (f"{prefix}/{key}", number, 0)
        elif isinstance(value, dict):
            yield from _flat(f"{prefix}/{key}", value)


def final_scalars(record: dict[str, Any]) -> list[Scalar]:
    """The scalars of a finished run's record: test metrics, a method's controller trace and
    the diagnostics (see the module's docstring)."""
    metrics = record.get("metrics") or {}
    out: list[Scalar] = []
    for name in ("accuracy", "macro_f1", "val_accuracy"):
        number = _number(metrics.get(name))
        if number is not None:
            out.append((f"test/{name}", number, 0))
    for group in ("unimodal_accuracy", "probe_accuracy"):
        out.extend(_flat(f"test/{group}", metrics.get(group)))
    trace = ((record.get("method_record") or {}).get("controller") or {}).get("trace") or {}
    for follower, rows in trace.items():
        for i, row in enumerate(rows or []):
            step = row.get("epoch") if isinstance(row.get("epoch"), int) else i
            for key, value in row.items():
                number = _number(value)
                if key != "epoch" and number is not None:
                    out.append((f"{record.get('method', 'method')}/controller/{follower}/{key}", number, step))
    diag = metrics.get("diagnostics") or {}
    number = _number(diag.get("imbalance_degree"))
    if number is not None:
        out.append(("diagnostics/imbalance_degree", number, 0))
    number = _number(diag.get("d_util"))
    if number is not None:
        out.append(("diagnostics/d_util", number, 0))
    for group in ("shapley", "noise_auc", "absent_accuracy", "utilisation", "subset_accuracy"):
        out.extend(_flat(f"diagnostics/{group}", diag.get(group)))
    levels = diag.get("noise_levels") or []
    for m, accs in (diag.get("noise_accuracy") or {}).items():
        for sigma, acc in zip(levels, accs or []):
            number = _number(acc)
            if number is not None:
                out.append((f"diagnostics/noise_accuracy/{m}/sigma_{sigma:g}", number, 0))
    for entry in diag.get("rho") or []:
        step = entry.get("epoch") if isinstance(entry.get("epoch"), int) else 0
        for m, value in (entry.get("rho") or {}).items():
            number = _number(value)
            if number is not None:
                out.append((f"{entry.get('stage', 'train')}/rho/{m}", number, step))
    return out


class Tracker:
    """Receives each epoch's history row, then the finished record; ``close`` ends the logs
    (``ok`` False: the run failed)."""

    def epoch(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def finish(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self, ok: bool) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(log_dir=str(folder))

    def _write(self, scalars: list[Scalar]) -> None:
        for tag, value, step in scalars:
            self.writer.add_scalar(tag, value, step)

    def epoch(self, row: dict[str, Any]) -> None:
        self._write(epoch_scalars(row))

    def finish(self, record: dict[str, Any]) -> None:
        self._write(final_scalars(record))
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()


def mlflow_key(tag: str) -> str:
    """MLflow metric names take letters, digits, ``_ - . / space``: anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", tag)


class MLflowTracker(Tracker):
    """One MLflow run in the file store ``<folder>`` (the client API: no global active run)."""

    def __init__(self, folder: Path, run_name: str, params: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        folder.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=folder.resolve().as_uri())
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(MLFLOW_EXPERIMENT))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in params.items():
            self.client.log_param(self.run_id, mlflow_key(key), str(value)[:500])

    def _write(self, scalars: list[Scalar]) -> None:
        for tag, value, step in scalars:
            if math.isfinite(value):
                self.client.log_metric(self.run_id, mlflow_key(tag), value, step=step)

    def epoch(self, row: dict[str, Any]) -> None:
        self._write(epoch_scalars(row))

    def finish(self, record: dict[str, Any]) -> None:
        self._write(final_scalars(record))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def log_folder(log_dir: str, record_file: Path) -> Path:
    """The folder a run's logs go to: ``log_dir`` (default the record's folder)."""
    return Path(log_dir).expanduser() if log_dir else record_file.parent


def tracker_location(log: str, log_dir: str, record_file: Path) -> Path:
    """Where a run's tracking goes: ``<folder>/<record name>.tensorboard`` (TensorBoard) or the
    MLflow file store ``<folder>/mlruns``, the folder being :func:`log_folder`'s."""
    base = log_folder(log_dir, record_file)
    return base / f"{record_file.stem}.tensorboard" if log == "tensorboard" else base / "mlruns"


def open_tracker(log: str, log_dir: str, record_file: Path, params: dict[str, Any]) -> Tracker | None:
    if not log:
        return None
    where = tracker_location(log, log_dir, record_file)
    if log == "tensorboard":
        return TensorBoardTracker(where)
    return MLflowTracker(where, record_file.stem, params)


__all__ = ["MLflowTracker", "TensorBoardTracker", "Tracker", "check_tracking", "epoch_scalars", "final_scalars",
           "log_folder", "open_tracker"]
