"""Sweep workers: each walks the planned runs, skips what the store has or another process
holds, and trains the rest (in a process of the local pool or in a SLURM job)."""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmark.config import build_config
from benchmark.errors import UsageError
from benchmark.files import os_error_line
from benchmark.procs import worker_init
from benchmark.record import Record
from benchmark.store import Store, count_unimodal_reuse
from benchmark.sweep_plan import PlannedRun, Smoke, _DataCache


# --- workers --------------------------------------------------------------------------------------
@dataclass
class WorkerSpec:
    store: str
    device: str = ""  # "" keeps each run's own device setting
    threads: int = 0
    smoke: Smoke | None = None
    retry_before: float = 0.0  # re-run failed records written before this time (0: never)
    plugins: tuple[str, ...] = ()  # plug-in modules of the submitting process ($BMB_PLUGINS, entry points)


def _needs_run(store: Store, item: PlannedRun, retry_before: float) -> bool:
    path = Path(item.path)
    if not path.exists():
        return True
    record = store.read(path)
    if record is None:
        return True  # unreadable: replace it
    if record.get("status") == "failed" and retry_before:
        return float(record.get("written_at", 0.0)) < retry_before
    return False


def work(items: list[PlannedRun], spec: WorkerSpec, emit: Callable[[dict[str, Any]], None]) -> None:
    """Run every item not yet in the store and not claimed by another process (with the
    worker's thread count for PyTorch and the BLAS and OpenMP pools, given back afterwards: a sweep
    run in-process leaves the caller's)."""
    from benchmark.device import process_threads
    from benchmark.registry import PLUGINS_ENV, load_plugins

    if spec.plugins:  # a SLURM job on another node imports the submitter's plug-ins too
        named = [n for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
        os.environ[PLUGINS_ENV] = ",".join(dict.fromkeys([*named, *spec.plugins]))
    load_plugins()
    with process_threads(spec.threads):
        _work(items, spec, emit)


def _work(items: list[PlannedRun], spec: WorkerSpec, emit: Callable[[dict[str, Any]], None]) -> None:
    from benchmark.runner import execute_with_outputs, failed_record, prepare

    store = Store(spec.store)
    cache = _DataCache(spec.smoke)
    for item in items:
        if not _needs_run(store, item, spec.retry_before):  # another process has finished it
            emit({"event": "skip", "key": item.key})
            continue
        claim = store.claim(item.key)
        if claim is None:
            emit({"event": "busy", "key": item.key})
            continue
        try:
            if not _needs_run(store, item, spec.retry_before):  # finished while we looked
                emit({"event": "skip", "key": item.key})
                continue
            emit({"event": "start", "key": item.key, "label": item.label, "dataset": item.dataset,
                  "seed": item.seed, "pid": os.getpid()})
            record = _run_one(item, spec, store, cache, prepare, execute_with_outputs, failed_record)
            store.write(Path(item.path), record)
            _emit_done(emit, item, record)
        finally:
            claim.release()
        if record.get("status") == "ok":
            _write_same_runs(item, record, items, spec, store, cache, prepare, emit)


def _emit_done(emit: Callable[[dict[str, Any]], None], item: PlannedRun, record: dict[str, Any]) -> None:
    # a record that shares another run's training trained and reused nothing of its own
    trained, reused = count_unimodal_reuse(record) if not record.get("same_run_as") else (0, 0)
    metrics = record.get("metrics", {})
    emit({"event": "done", "key": item.key, "status": record["status"], "label": item.label,
          "dataset": item.dataset, "seed": item.seed, "accuracy": metrics.get("accuracy"),
          "seconds": record.get("elapsed_seconds", 0.0), "error": record.get("error", ""),
          "trained": trained, "reused": reused})


def same_runs(done: PlannedRun, record: dict[str, Any], items: list[PlannedRun]
              ) -> list[tuple[PlannedRun, dict[str, Any]]]:
    """The planned runs that are ``done``'s computation under other settings of its method's
    resolved options (``Method.resolved_options``), each with the method facts it records
    differently."""
    from benchmark.registry import METHODS

    cls = METHODS.get(done.method)
    resolved = set(getattr(cls, "resolved_options", ()))
    if not resolved:
        return []

    def rest(run: PlannedRun) -> dict[str, Any]:
        return {k: v for k, v in run.assignments.items() if k not in resolved}

    base = rest(done)
    found = []
    for item in items:
        if item.key == done.key or (item.method, item.dataset, item.seed) != (done.method, done.dataset, done.seed):
            continue
        if rest(item) != base:
            continue
        facts = cls.same_run_facts(record, item.assignments)
        if facts is not None:
            found.append((item, facts))
    return found


def _write_same_runs(done: PlannedRun, record: dict[str, Any], items: list[PlannedRun], spec: WorkerSpec,
                     store: Store, cache: _DataCache, prepare: Callable,
                     emit: Callable[[dict[str, Any]], None]) -> None:
    """Write the record of every planned run that is ``done``'s computation (see :func:`same_runs`)
    and that the store lacks: ``done``'s record under the run's own configuration, key, table label
    and method facts, with ``same_run_as`` naming ``done``. One training, two rows' records."""
    from benchmark.runner import defaults_of

    for item, facts in same_runs(done, record, items):
        if not _needs_run(store, item, spec.retry_before):
            continue
        claim = store.claim(item.key)
        if claim is None:  # another process is on it
            continue
        try:
            if not _needs_run(store, item, spec.retry_before):
                continue
            t0 = time.perf_counter()
            try:
                cfg = build_config(_assignments(item, spec, store))
                run = prepare(cfg, cache.get(cfg.dataset, cfg.dataset_options))
            except Exception:  # whatever stops it here stops the run too: trained and recorded in its turn
                continue
            if run.key != item.run_key:
                continue  # not the run planned: train it instead
            out = Record.from_json(record)
            _sweep_fields(out, item)
            out.config, out.defaults = run.resolved, defaults_of(run)
            out.method_record = dict(record.get("method_record") or {}, **facts)
            out.same_run_as = done.key
            out.previous_errors = None
            out.elapsed_seconds = time.perf_counter() - t0
            out.written_at = time.time()
            log_path = store.log_path(item.key)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log_file:
                log_file.write(f"{_log_header(item)}\n"
                               f"the same computation as {done.label} (key {done.key}): its record, with this "
                               f"run's configuration and {', '.join(sorted(facts))}\n")
            twin = out.to_json()
            store.write(Path(item.path), twin)
            emit({"event": "start", "key": item.key, "label": item.label, "dataset": item.dataset,
                  "seed": item.seed, "pid": os.getpid()})
            _emit_done(emit, item, twin)
        finally:
            claim.release()


def _assignments(item: PlannedRun, spec: WorkerSpec, store: Store) -> dict[str, Any]:
    """The planned run's assignments as the worker runs them: the worker's device (where the run
    leaves it to auto) and the store's unimodal cache."""
    assignments = dict(item.assignments)
    if spec.device and str(assignments.get("device", "auto")) == "auto":
        assignments["device"] = spec.device
    assignments["cache_dir"] = str(store.cache_dir)
    return assignments


def _log_header(item: PlannedRun) -> str:
    return f"== {item.label} on {item.dataset} seed {item.seed} (key {item.key}) pid {os.getpid()}"


def _sweep_fields(out: Record, item: PlannedRun) -> None:
    """The fields a sweep adds to the record of ``item``: its key (and its own run key where they
    differ) and its table label, variant and tuned file."""
    out.key = item.key
    out.run_key = item.run_key if item.key != item.run_key else None
    out.sweep = {"label": item.label, "variant": item.variant, "tuned": item.tuned}


def _run_one(item: PlannedRun, spec: WorkerSpec, store: Store, cache: _DataCache,
             prepare: Callable, execute: Callable, failed_record: Callable) -> dict[str, Any]:
    assignments = _assignments(item, spec, store)
    t0 = time.perf_counter()
    previous = store.read(Path(item.path)) if Path(item.path).exists() else None
    log_path = store.log_path(item.key)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_file:
        def log(msg: str) -> None:
            log_file.write(msg + "\n")
            log_file.flush()

        log(_log_header(item))
        run = None
        try:
            cfg = build_config(assignments)
            run = prepare(cfg, cache.get(cfg.dataset, cfg.dataset_options))
            if run.key != item.run_key:  # the planned configuration must resolve to itself
                raise RuntimeError(f"the run resolved to key {run.key} in the worker, {item.run_key} when planned")
            # the tracking logs and the checkpoint (options log, save_checkpoint) go beside the record
            record = execute(run, Path(item.path), log=log, cache_dir=str(store.cache_dir))
        except Exception as exc:  # diverged (non-finite loss) or any error: recorded, the sweep goes on
            log("".join(traceback.format_exception(exc)))
            record = failed_record(run, exc, assignments=dict(assignments, method=item.method,
                                                              dataset=item.dataset, seed=item.seed))
            record["traceback"] = traceback.format_exception(exc)[-3:]
    out = Record.from_json(record)  # the sweep's fields, on the one record definition
    _sweep_fields(out, item)
    if spec.smoke:
        out.smoke = asdict(spec.smoke)
    if previous and previous.get("status") == "failed":
        out.previous_errors = previous.get("previous_errors", []) + [previous.get("error", "")]
    out.elapsed_seconds = time.perf_counter() - t0
    out.written_at = time.time()
    return out.to_json()


def _worker_main(items: list[PlannedRun], spec: WorkerSpec, events: Any) -> None:
    worker_init()
    try:
        work(items, spec, events.put)
    except (UsageError, OSError) as exc:  # the store cannot be written (full, read-only): one line
        message = os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        events.put({"event": "error", "pid": os.getpid(), "message": message})
        sys.exit(2)
    events.put({"event": "exit", "pid": os.getpid()})
