"""The result record: one JSON object per run, defined here and nowhere else.

Every writer builds a record through :class:`Record` (``run``, ``sweep`` workers, failed runs),
and every reader checks one through :func:`check` (the store, the report). Its file is named by
:func:`record_name` wherever it is written: ``<out>/<name>`` by ``run --out``, and
``records/<dataset>/<name>`` in a sweep store.

Fields (JSON, in this order; a field that is None is left out):

- ``schema`` (1), ``status`` ("ok" or "failed"), ``key`` (the run's key: hash of its resolved
  configuration without locations), ``method``, ``dataset``, ``seed``;
- ``config``: the resolved configuration (every option, typed values); ``defaults``: the method's
  and dataset's option defaults (tables label a row by what differs from them);
- ok runs: ``metrics`` (test accuracy, macro-F1, probes, diagnostics, time, memory),
  ``method_record`` (the method's own facts), ``stages``, ``history`` (one row per epoch per
  stage), ``convergence`` and ``convergence_rule``, ``smoke``, ``environment``, ``device``,
  ``started``;
- failed runs: ``error`` (one line), ``traceback`` (its last lines, sweeps);
- provenance: ``git_commit``, ``versions``, ``finished``;
- outputs beside the record: ``checkpoint`` (its file name, ``save_checkpoint``), ``tracking``
  (``log``: the tracker and its folder);
- sweeps add: ``run_key`` (the run's own key where a smoke run's key differs), ``sweep`` (label,
  variant, tuned file), ``previous_errors``, ``elapsed_seconds``, ``written_at``, and
  ``same_run_as``: the key of the run whose training this record shares (a run whose option
  resolved, during training, to another planned run's computation: UDI's anchor=auto and the
  anchor it picked; see ``Method.same_run_facts``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = 1
STATUSES = ("ok", "failed")


def record_name(method: str, dataset: str, seed: int, key: str) -> str:
    """The file name of a run's record, the same in a store and in a ``run --out`` folder."""
    return f"{method}-{dataset}-seed{seed}-{key}.json"


def key_of(path: Path) -> str:
    """The run key in a record's file name."""
    return path.stem.rsplit("-", 1)[-1]


@dataclass
class Record:
    """A run's record (see the module docstring for what each field holds)."""

    status: str
    key: str
    method: str
    dataset: str
    seed: int
    config: dict[str, Any]
    defaults: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    method_record: dict[str, Any] | None = None
    stages: dict[str, Any] | None = None
    history: list[dict[str, Any]] | None = None
    convergence: dict[str, Any] | None = None
    convergence_rule: str | None = None
    smoke: Any = None
    environment: dict[str, Any] | None = None
    device: str | None = None
    error: str | None = None
    traceback: list[str] | None = None
    git_commit: str | None = None
    versions: dict[str, str] | None = None
    started: str | None = None
    finished: str | None = None
    checkpoint: str | None = None
    tracking: dict[str, Any] | None = None
    run_key: str | None = None
    sweep: dict[str, Any] | None = None
    previous_errors: list[str] | None = None
    elapsed_seconds: float | None = None
    written_at: float | None = None
    same_run_as: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"a record's status is one of {STATUSES}, got {self.status!r}")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        """The record of a JSON object this module wrote (a field it does not define is refused)."""
        unknown = set(data) - set(FIELDS) - {"schema"}
        if unknown:
            raise ValueError(f"a record has no field {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in data.items() if k != "schema"})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


FIELDS = tuple(f.name for f in dataclasses.fields(Record))
REQUIRED = {"status": str, "method": str, "dataset": str, "seed": int}


def check(record: Any) -> str:
    """What is wrong with a record read from disk ("" if it is whole)."""
    if not isinstance(record, dict):
        return "not a JSON object (unreadable or cut short)"
    for name, kind in REQUIRED.items():
        value = record.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"field {name!r} is missing or not a {kind.__name__}"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is neither ok nor failed"
    if record["status"] == "ok":
        metrics = record.get("metrics")
        acc = metrics.get("accuracy") if isinstance(metrics, dict) else None
        if not isinstance(acc, (int, float)) or isinstance(acc, bool):
            return "an ok record without a numeric metrics.accuracy"
    return ""
