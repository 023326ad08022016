"""Sweeps: a TOML file describes a grid of runs; the runner spreads it over workers into a store.

A sweep file (``benchmark/sweeps/<name>.toml``, or any path) has::

    description = "..."
    seeds = [0, 1, 2]
    use_recommended = false        # apply each method's ``recommended`` shared settings
    preset = "udi-paper"           # optional: a named preset's settings for each dataset
    [settings]                     # assignments for every run (as ``--set key=value``)
    epochs = 20
    [datasets.<name>]              # one table per dataset, in run order
    settings = { "dataset.preset" = "imbalanced" }
    [methods.<name>]               # one table per method
    settings = { lr = 0.01 }       # assignments for this method's runs
    datasets = ["synthetic"]       # optional: only on these datasets
    preset = "udi-paper"           # optional: this method's preset (over the sweep's)
    variants = [                   # optional: one or more option sets, each a grid
      { "method.anchor" = ["auto", "@modalities"], "method.controller" = "dynamic" },
      { "method.guidance" = ["progressive", "anchor"], datasets = ["synthetic-3m"] },
    ]

In a variant a list is a grid axis (one run per value, the product over the lists), the string
``"@modalities"`` stands for each modality of the dataset, and ``label`` names the variant in
tables (a template over the variant's options: ``label = "udi static ({lambda_con}, {lambda_com})"``);
a variant's ``datasets`` limits it to those datasets. A method's ``preset`` names a set of shared
settings per dataset (``benchmark.presets``; e.g. ``udi-paper``, the UDI paper's); a top-level
``preset`` applies to every method that names none.
Later settings win: sweep < dataset < method's recommended < preset < method < tuned file < variant.

Runs are ordered so that unimodal models come first, which lets the methods that need them
(``ensemble``, UDI's anchor phase, MCR) reuse their checkpoints.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmark.config import build_config, config_hash
from benchmark.errors import UsageError
from benchmark.files import os_error_line
from benchmark.procs import start_workers, worker_init
from benchmark.store import Store, check_record, count_unimodal_reuse

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SWEEP_DIR = Path(__file__).resolve().parent / "sweeps"
MODALITIES = "@modalities"
TOP_KEYS = {"description", "seeds", "settings", "datasets", "methods", "use_recommended", "preset"}
DATASET_KEYS = {"settings"}
METHOD_KEYS = {"settings", "variants", "datasets", "use_recommended", "preset"}
VARIANT_DATASETS = "datasets"  # a variant's own dataset filter (not an option)
# Work order: unimodal models first so that later runs reuse their checkpoints. The runs that
# read those checkpoints (ensemble, UDI, MCR) keep their plan order, well after them: run right
# after the unimodal models, an ensemble would wait on the claim of a checkpoint still training.
PRIORITY = {"unimodal": 0}


# --- sweep files --------------------------------------------------------------------------------
@dataclass
class SweepSpec:
    name: str
    source: str
    description: str
    seeds: list[int]
    settings: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    use_recommended: bool = False
    preset: str = ""


def list_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEP_DIR.glob("*.toml"))


def sweep_path(name: str) -> Path:
    """The file of sweep ``name``: a packaged sweep, or a path to a TOML file."""
    if name.endswith(".toml") or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UsageError(f"sweep file {name!r} does not exist; give a packaged sweep "
                             f"({', '.join(list_sweeps())}) or the path of a .toml file")
        return path
    path = SWEEP_DIR / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown sweep {name!r}; known sweeps: {', '.join(list_sweeps())} "
                         "(or give the path of a .toml file)")
    return path


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a table, got {value!r}")
    return value


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}")


def load_sweep(name: str) -> SweepSpec:
    """Parse and check the structure of a sweep file (its values are checked when planning)."""
    path = sweep_path(name)
    label = path.stem if path.parent == SWEEP_DIR else str(path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"sweep {label}: not valid TOML ({exc}); fix the file") from None
    _check_keys(data, TOP_KEYS, f"sweep {label}")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise UsageError(f"sweep {label}: seeds must be a non-empty list of integers, got {seeds!r}")
    datasets = _table(data.get("datasets", {}), f"sweep {label}: [datasets]")
    methods = _table(data.get("methods", {}), f"sweep {label}: [methods]")
    if not datasets or not methods:
        raise UsageError(f"sweep {label}: needs at least one [datasets.<name>] and one [methods.<name>] table")
    for dname, entry in datasets.items():
        where = f"sweep {label}: [datasets.{dname}]"
        _check_keys(_table(entry, where), DATASET_KEYS, where)
        _table(entry.get("settings", {}), f"{where} settings")
    for mname, entry in methods.items():
        where = f"sweep {label}: [methods.{mname}]"
        _check_keys(_table(entry, where), METHOD_KEYS, where)
        _table(entry.get("settings", {}), f"{where} settings")
        variants = entry.get("variants", [{}])
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
            raise UsageError(f"{where}: variants must be a list of tables, got {variants!r}")
        only = entry.get("datasets", list(datasets))
        if not isinstance(only, list) or not set(only) <= set(datasets):
            raise UsageError(f"{where}: datasets must list datasets of this sweep ({', '.join(datasets)}), "
                             f"got {only!r}")
        for v_index, variant in enumerate(variants):
            only = variant.get(VARIANT_DATASETS, list(datasets))
            if not isinstance(only, list) or not set(only) <= set(datasets):
                raise UsageError(f"{where} variant {v_index + 1}: datasets must list datasets of this sweep "
                                 f"({', '.join(datasets)}), got {only!r}")
        if "preset" in entry:
            from benchmark.presets import check_preset
            check_preset(entry["preset"], f"{where}: preset")
    use_rec = data.get("use_recommended", False)
    if not isinstance(use_rec, bool):
        raise UsageError(f"sweep {label}: use_recommended must be true or false, got {use_rec!r}")
    preset = data.get("preset", "")
    if preset:
        from benchmark.presets import check_preset
        check_preset(preset, f"sweep {label}: preset")
    return SweepSpec(label, str(path), str(data.get("description", "")), list(seeds),
                     _table(data.get("settings", {}), f"sweep {label}: [settings]"), datasets, methods,
                     use_rec, preset)


# --- planning -------------------------------------------------------------------------------------
@dataclass
class Filters:
    datasets: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # glob patterns over variant labels
    where: dict[str, str] = field(default_factory=dict)  # assignments a run must have

    def describe(self) -> str:
        parts = [f"--dataset {','.join(self.datasets)}" if self.datasets else "",
                 f"--method {','.join(self.methods)}" if self.methods else "",
                 f"--seed {','.join(map(str, self.seeds))}" if self.seeds else "",
                 " ".join(f"--label {p!r}" for p in self.labels),
                 " ".join(f"--where {k}={v}" for k, v in self.where.items())]
        return " ".join(p for p in parts if p) or "(none)"


@dataclass
class Smoke:
    """Tiny stratified subsets and few epochs, to exercise every cell of a sweep quickly."""

    samples: int = 40
    epochs: int = 1

    def apply(self, data: Any, seed: int = 0) -> Any:
        from benchmark.data.base import MultimodalData
        return MultimodalData(data.info, {name: _subset(split, self.samples, seed)
                                          for name, split in data.splits.items()}, data.manifest)


def _subset(split: Any, n: int, seed: int) -> Any:
    """A stratified subset of about ``n`` samples of a split (every class kept where possible)."""
    import numpy as np
    from torch.utils.data import Subset

    from benchmark.data.base import TensorSplit, split_labels, stratified_split

    labels = split_labels(split)
    if len(labels) <= n:
        return split
    _, idx = stratified_split(labels, n / len(labels), seed)
    if isinstance(split, TensorSplit):
        return split.subset(idx)
    sub = Subset(split, idx.tolist())
    sub.labels = np.asarray(labels)[idx]  # type: ignore[attr-defined]
    return sub


@dataclass
class PlannedRun:
    """One run of a sweep: its assignments, where its record goes, and how tables name it."""

    assignments: dict[str, Any]
    method: str
    dataset: str
    seed: int
    label: str
    variant: dict[str, Any]
    tuned: str = ""
    key: str = ""
    run_key: str = ""
    path: str = ""

    @property
    def priority(self) -> int:
        return PRIORITY.get(self.method, 1)


@dataclass
class Plan:
    sweep: SweepSpec
    runs: list[PlannedRun]
    notes: list[str]
    smoke: Smoke | None = None
    left_out: list[str] = field(default_factory=list)  # planned runs that cannot run here, and why


def _split_list(values: Iterable[str]) -> list[str]:
    return [v.strip() for value in values for v in str(value).split(",") if v.strip()]


def _expand_variant(variant: dict[str, Any], modalities: list[str], where: str
                    ) -> list[tuple[dict[str, Any], str]]:
    """One variant table → [(assignments, label template)], lists as grid axes."""
    template = variant.get("label", "")
    if not isinstance(template, str):
        raise UsageError(f"{where}: label must be a string, got {template!r}")
    axes: list[tuple[str, list[Any]]] = []
    for key, value in variant.items():
        if key in ("label", VARIANT_DATASETS):
            continue
        values = value if isinstance(value, list) else [value]
        expanded: list[Any] = []
        for v in values:
            if isinstance(v, (dict, list)):
                raise UsageError(f"{where}: {key} must be a value or a list of values, got {value!r}")
            expanded.extend(modalities if v == MODALITIES else [v])
        if not expanded:
            raise UsageError(f"{where}: {key} is an empty list")
        axes.append((key, expanded))
    out = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        out.append(({k: v for (k, _), v in zip(axes, combo)}, template))
    return out


def _label(method: str, options: dict[str, Any], template: str, where: str) -> str:
    short = {k.split(".", 1)[1] if k.startswith("method.") else k: v for k, v in options.items()}
    if template:
        try:
            return template.format(method=method, **short)
        except (KeyError, IndexError, ValueError) as exc:
            raise UsageError(f"{where}: label {template!r} names {exc} that the variant does not set") from None
    if not short:
        return method
    return method + " " + " ".join(f"{k}={v}" for k, v in short.items())


def load_tuned(paths: Iterable[str]) -> dict[tuple[str, str], tuple[dict[str, Any], str, dict[str, Any]]]:
    """Best-parameter files written by ``tune`` (files or folders of them):
    (method, dataset) → (assignments, file, the study's fixed settings)."""
    out: dict[tuple[str, str], tuple[dict[str, Any], str, dict[str, Any]]] = {}
    for given in paths:
        path = Path(given).expanduser()
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        if not path.exists() or not files:
            raise UsageError(f"tuned parameters {given!r}: no such file (or no .json in the folder); "
                             "give a file written by `python -m benchmark tune`")
        for file in files:
            try:
                data = json.loads(file.read_text())
                key = (str(data["method"]), str(data["dataset"]))
                params = dict(data["params"])
                fixed = dict(data.get("fixed") or {})
            except (OSError, ValueError, KeyError, TypeError):
                raise UsageError(f"tuned parameters {str(file)!r} are not a file written by "
                                 "`python -m benchmark tune`; re-run tune or remove the file") from None
            out[key] = (params, str(file), fixed)
    return out


def _tuned_budget_note(file: str, fixed: dict[str, Any], cfg: Any) -> str:
    """A warning when parameters were tuned under another training budget than the sweep's."""
    tuned_at = build_config({k: v for k, v in fixed.items() if k not in ("seeds", "datasets")})
    differ = [f"{name} {getattr(tuned_at, name)} (sweep: {getattr(cfg, name)})"
              for name in ("epochs", "batch_size", "patience") if getattr(tuned_at, name) != getattr(cfg, name)]
    if not differ:
        return ""
    return (f"warning: {file} was tuned with {', '.join(differ)} for {cfg.method} on {cfg.dataset}: tuned "
            "values may not carry over; re-tune with the sweep's budget (tune --epochs/--set)")


class _DataCache:
    """Datasets loaded once per (name, options) while planning or working."""

    def __init__(self, smoke: Smoke | None = None) -> None:
        self.smoke = smoke
        self.loaded: dict[str, Any] = {}

    def get(self, name: str, options: dict[str, Any]) -> Any:
        from benchmark.data import create_dataset

        key = json.dumps([name, options], sort_keys=True, default=str)
        if key not in self.loaded:
            data = create_dataset(name, options)
            self.loaded[key] = self.smoke.apply(data) if self.smoke else data
        return self.loaded[key]


def plan_sweep(spec: SweepSpec, store: Store, filters: Filters | None = None,
               smoke: Smoke | None = None, tuned: dict | None = None,
               log: Callable[[str], None] = lambda msg: None) -> Plan:
    """Every run of the sweep that the filters select, each resolved (config checked, key known).

    A method or dataset that is not registered, or a dataset whose files are absent, is left out
    with a note, unless a filter names it (then it is an error). Raises UsageError for any bad
    key or value in the sweep file."""
    from benchmark.data import resolve_dataset_options
    from benchmark.method import resolve_method_options
    from benchmark.registry import DATASETS, METHODS
    from benchmark.runner import prepare

    filters = filters or Filters()
    tuned = tuned or {}
    notes: list[str] = []
    for kind, chosen, known in (("dataset", filters.datasets, spec.datasets),
                                ("method", filters.methods, spec.methods)):
        for name in chosen:
            if name not in known:
                raise UsageError(f"filter --{kind} {name!r} matches no {kind} of sweep {spec.name} "
                                 f"(its {kind}s: {', '.join(known)})")
    if filters.seeds and not set(filters.seeds) & set(spec.seeds):
        raise UsageError(f"filter --seed {','.join(map(str, filters.seeds))} matches no seed of sweep "
                         f"{spec.name} (its seeds: {', '.join(map(str, spec.seeds))})")
    seeds = [s for s in spec.seeds if not filters.seeds or s in filters.seeds]
    if smoke:
        seeds = seeds[:1]
    datasets = [d for d in spec.datasets if not filters.datasets or d in filters.datasets]
    methods = [m for m in spec.methods if not filters.methods or m in filters.methods]
    for kind, names, registry in (("methods", spec.methods, METHODS), ("datasets", spec.datasets, DATASETS)):
        for name in names:  # a misspelt name is refused as on the command line, never skipped
            if name not in registry:
                try:
                    registry.get(name)
                except UsageError as exc:
                    raise UsageError(f"sweep {spec.name}: [{kind}.{name}]: {exc}") from None
    for (mname, dname), (_, file, _fixed) in tuned.items():
        if mname not in spec.methods or dname not in spec.datasets:
            raise UsageError(f"tuned parameters {file!r} are for {mname} on {dname}, which sweep {spec.name} "
                             "does not run; drop that --tuned or tune a method of the sweep")
    left_out: list[str] = []
    cache = _DataCache(smoke)
    runs: list[PlannedRun] = []
    for dname in datasets:
        dentry = spec.datasets[dname]
        base = {**spec.settings, **dentry.get("settings", {}), "dataset": dname}
        try:  # name the table a bad shared value comes from
            build_config({**spec.settings, "dataset": dname})
        except UsageError as exc:
            raise UsageError(f"sweep {spec.name}: [settings]: {exc}") from None
        try:
            resolve_dataset_options(dname, build_config(base).dataset_options)
        except UsageError as exc:
            raise UsageError(f"sweep {spec.name}: [datasets.{dname}] settings: {exc}") from None
        for mname in methods:
            mentry = spec.methods[mname]
            if dname not in mentry.get("datasets", list(spec.datasets)):
                continue
            where = f"sweep {spec.name}: [methods.{mname}]"
            settings = dict(base)
            if mentry.get("use_recommended", spec.use_recommended):
                settings.update(METHODS.get(mname).recommended)
            if mentry.get("preset", spec.preset):
                from benchmark.presets import preset_settings
                settings.update(preset_settings(mentry.get("preset", spec.preset), dname))
            settings.update(mentry.get("settings", {}))
            tuned_params, tuned_file, tuned_fixed = tuned.get((mname, dname), ({}, "", {}))
            settings.update(tuned_params)
            settings["method"] = mname
            try:  # everything but the data: options of the dataset and the method, shared settings
                cfg0 = build_config(settings)
                resolve_dataset_options(dname, cfg0.dataset_options)
                resolve_method_options(mname, cfg0.method_options)
            except UsageError as exc:
                raise UsageError(f"{where} on {dname}: {exc}") from None
            if tuned_file and not smoke:
                budget = _tuned_budget_note(tuned_file, tuned_fixed, cfg0)
                if budget:
                    notes.append(budget)
            try:
                data = cache.get(dname, cfg0.dataset_options)
            except UsageError as exc:
                if filters.datasets:
                    raise UsageError(f"dataset {dname!r} cannot be loaded: {exc}") from None
                notes.append(f"dataset {dname!r} is not available here ({exc}): its runs are left out")
                left_out.append(f"dataset {dname}: {exc}")
                break
            modalities = data.info.modality_names
            for v_index, variant in enumerate(mentry.get("variants", [{}])):
                if dname not in variant.get(VARIANT_DATASETS, [dname]):
                    continue
                vwhere = f"{where} variant {v_index + 1}"
                for options, template in _expand_variant(variant, modalities, vwhere):
                    label = _label(mname, options, template, vwhere) + (" [tuned]" if tuned_file else "")
                    for seed in seeds:
                        assignments = {**settings, **options, "seed": seed}
                        if smoke:
                            assignments["epochs"] = assignments["unimodal_epochs"] = smoke.epochs
                        if not _selected(filters, label, assignments):
                            continue
                        try:
                            run = prepare(build_config(assignments), data)
                        except UsageError as exc:
                            raise UsageError(f"{vwhere} on {dname}: {exc}") from None
                        key = run.key
                        if smoke:  # smoke runs see subsets: never confused with full runs
                            key = config_hash({"run": run.key, "smoke": asdict(smoke)})
                        runs.append(PlannedRun(assignments, mname, dname, seed, label, options,
                                               tuned_file, key, run.key,
                                               str(store.record_path(dname, mname, seed, key))))
    if not runs and notes:
        raise UsageError(f"no run of sweep {spec.name} can run here: " + "; ".join(notes))
    if not runs:
        raise UsageError(f"filters {filters.describe()} match no run of sweep {spec.name}; "
                         "see `python -m benchmark sweep " + spec.name + " --list`")
    seen: dict[str, PlannedRun] = {}
    for run in runs:  # the same config twice (two variants resolving alike) runs once
        seen.setdefault(run.key, run)
    if len(seen) < len(runs):
        notes.append(f"{len(runs) - len(seen)} runs repeat another run's config and are run once")
    ordered = sorted(seen.values(), key=lambda r: r.priority)
    return Plan(spec, ordered, notes, smoke, left_out)


def _selected(filters: Filters, label: str, assignments: dict[str, Any]) -> bool:
    if filters.labels and not any(fnmatch.fnmatchcase(label, p) for p in filters.labels):
        return False
    for key, value in filters.where.items():
        if str(assignments.get(key, "")) != value:
            return False
    return True


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
    worker's thread count, given back afterwards: a sweep run in-process leaves the caller's)."""
    import torch

    from benchmark.registry import PLUGINS_ENV, load_plugins

    if spec.plugins:  # a SLURM job on another node imports the submitter's plug-ins too
        named = [n for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
        os.environ[PLUGINS_ENV] = ",".join(dict.fromkeys([*named, *spec.plugins]))
    load_plugins()
    previous = torch.get_num_threads()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    try:
        _work(items, spec, emit)
    finally:
        torch.set_num_threads(previous)


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
            trained, reused = count_unimodal_reuse(record)
            metrics = record.get("metrics", {})
            emit({"event": "done", "key": item.key, "status": record["status"], "label": item.label,
                  "dataset": item.dataset, "seed": item.seed, "accuracy": metrics.get("accuracy"),
                  "seconds": record.get("elapsed_seconds", 0.0), "error": record.get("error", ""),
                  "trained": trained, "reused": reused})
        finally:
            claim.release()


def _run_one(item: PlannedRun, spec: WorkerSpec, store: Store, cache: _DataCache,
             prepare: Callable, execute: Callable, failed_record: Callable) -> dict[str, Any]:
    assignments = dict(item.assignments)
    if spec.device and str(assignments.get("device", "auto")) == "auto":
        assignments["device"] = spec.device
    assignments["cache_dir"] = str(store.cache_dir)
    t0 = time.perf_counter()
    previous = store.read(Path(item.path)) if Path(item.path).exists() else None
    log_path = store.log_path(item.key)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log_file:
        def log(msg: str) -> None:
            log_file.write(msg + "\n")
            log_file.flush()

        log(f"== {item.label} on {item.dataset} seed {item.seed} (key {item.key}) pid {os.getpid()}")
        run = None
        try:
            cfg = build_config(assignments)
            run = prepare(cfg, cache.get(cfg.dataset, cfg.dataset_options))
            # the tracking logs and the checkpoint (options log, save_checkpoint) go beside the record
            record = execute(run, Path(item.path), log=log, cache_dir=str(store.cache_dir))
        except Exception as exc:  # diverged (non-finite loss) or any error: recorded, the sweep goes on
            log("".join(traceback.format_exception(exc)))
            if run is None:
                record = {"schema": 1, "status": "failed", "method": item.method, "dataset": item.dataset,
                          "seed": item.seed, "config": assignments, "error": f"{type(exc).__name__}: {exc}"}
            else:
                record = failed_record(run, exc)
            record["traceback"] = traceback.format_exception(exc)[-3:]
    record["key"] = item.key
    if item.key != item.run_key:
        record["run_key"] = item.run_key
    record["sweep"] = {"label": item.label, "variant": item.variant, "tuned": item.tuned}
    if spec.smoke:
        record["smoke"] = asdict(spec.smoke)
    if previous and previous.get("status") == "failed":
        record["previous_errors"] = previous.get("previous_errors", []) + [previous.get("error", "")]
    record["elapsed_seconds"] = time.perf_counter() - t0
    record["written_at"] = time.time()
    return record


def _worker_main(items: list[PlannedRun], spec: WorkerSpec, events: Any) -> None:
    worker_init()
    try:
        work(items, spec, events.put)
    except (UsageError, OSError) as exc:  # the store cannot be written (full, read-only): one line
        message = os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        events.put({"event": "error", "pid": os.getpid(), "message": message})
        sys.exit(2)
    events.put({"event": "exit", "pid": os.getpid()})


# --- progress ---------------------------------------------------------------------------------------
def live_bar(console: Any = None) -> Any:
    """The live display: the bar with its counts and times on one line, the last finished run on
    the next, cut to the terminal's width, so that a long run label never squeezes the bar out
    (it fits in 80 columns)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class SweepBar(RichProgress):
        def get_renderables(self) -> Any:
            yield self.make_tasks_table(self.tasks)
            for task in self.tasks:
                if task.fields.get("last"):
                    yield Text(f"  last: {task.fields['last']}", no_wrap=True, overflow="ellipsis")

    return SweepBar(TextColumn("[bold]{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
                    TextColumn("failed {task.fields[failed]}"), TextColumn("elapsed"), TimeElapsedColumn(),
                    TextColumn("eta {task.fields[eta]}"), transient=False, console=console)


class Progress:
    """Runs done, failed, remaining, elapsed and estimated time: a live bar on a terminal,
    one line per finished run otherwise. ``console``: where the bar goes (rich's; tests)."""

    def __init__(self, total: int, already: int, todo: list[PlannedRun], jobs: int = 1,
                 live: bool | None = None, console: Any = None) -> None:
        self.total, self.already, self.to_run, self.jobs = total, already, len(todo), jobs
        self.done = self.failed = self.trained = self.reused = 0
        self.busy_keys: set[str] = set()  # held by another process when this one reached them
        self.started: dict[str, int] = {}  # key → pid of the worker running it
        self.errors: set[str] = set()  # one line per distinct worker error
        self.pending = {r.key: (r.dataset, r.method) for r in todo}
        self.skipped: set[str] = set()
        self.seconds: dict[tuple[str, str], list[float]] = {}
        self.start = time.perf_counter()
        self.live = sys.stderr.isatty() if live is None else live
        self._bar = None
        if self.live and todo:
            self._bar = live_bar(console)
            self._task = self._bar.add_task("sweep", total=self.to_run, failed=0, eta="?", last="")
            self._bar.start()

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def busy(self) -> int:
        return len(self.busy_keys)

    @property
    def remaining(self) -> int:
        return max(self.to_run - self.finished, 0)

    def eta(self) -> float:
        """Seconds left: each pending run costs the mean of finished runs of its method on its
        dataset (else of its dataset, else of all), spread over the workers."""
        if not self.seconds:
            return float("nan")
        everything = [x for v in self.seconds.values() for x in v]
        by_dataset: dict[str, list[float]] = {}
        for (dataset, _), values in self.seconds.items():
            by_dataset.setdefault(dataset, []).extend(values)
        total = 0.0
        for dataset, method in self.pending.values():
            values = self.seconds.get((dataset, method)) or by_dataset.get(dataset) or everything
            total += sum(values) / len(values)
        return total / max(self.jobs, 1)

    def update(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            self.started[event["key"]] = event.get("pid", 0)
        if kind == "error":
            self.errors.add(event["message"])
        if kind == "busy":
            self.busy_keys.add(event["key"])
        if kind == "skip":  # finished by another process (or by a sibling worker: undone below)
            self.busy_keys.discard(event["key"])
            if self.pending.pop(event["key"], None) is None:
                return  # a sibling worker of this sweep finished it: counted by its "done"
            self.skipped.add(event["key"])
            self.to_run -= 1
            if self._bar is not None:
                self._bar.update(self._task, total=self.to_run)
        if kind != "done":
            return
        self.busy_keys.discard(event["key"])
        self.started.pop(event["key"], None)
        if event["key"] in self.skipped:  # its "skip" from a sibling came first
            self.skipped.discard(event["key"])
            self.to_run += 1
        where = self.pending.pop(event["key"], None)
        if where is not None:
            self.seconds.setdefault(where, []).append(float(event.get("seconds") or 0.0))
        if event["status"] == "ok":
            self.done += 1
        else:
            self.failed += 1
        self.trained += event.get("trained", 0)
        self.reused += event.get("reused", 0)
        acc = event.get("accuracy")
        what = (f"acc {acc:.4f}" if isinstance(acc, float) else "") if event["status"] == "ok" else \
            f"FAILED: {event.get('error', '')[:120]}"
        run = f"{event['label']} on {event['dataset']} seed {event['seed']}"
        if self._bar is not None:
            self._bar.update(self._task, advance=1, failed=self.failed, eta=_hms(self.eta()),
                             last=f"{run} {what}")
            return
        print(f"[{self.finished}/{self.to_run}] {event['status']:<6} {run}  {what}  "
              f"{event.get('seconds', 0.0):.1f}s | done {self.done} failed {self.failed} remaining "
              f"{self.remaining} elapsed {_hms(time.perf_counter() - self.start)}"
              f" eta {_hms(self.eta())}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _hms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --- the runner ------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    total: int
    already: int  # records the store had before (ok, or failed when not retrying)
    ran: int  # runs this process finished
    failed_now: int
    ok_in_store: int
    failed_in_store: int
    missing: int  # no record at the end (a worker was killed, or the holder of its claim)
    trained: int
    reused: int
    seconds: float
    lacking: list[tuple[PlannedRun | None, str]] = field(default_factory=list)  # no ok record: why
    errors: list[str] = field(default_factory=list)  # workers stopped by a filesystem error


def visible_gpus(count: int, env: dict[str, str] | None = None) -> list[str]:
    """The physical ids of the ``count`` GPUs this process sees, as CUDA_VISIBLE_DEVICES names them
    (``cuda:i`` is the i-th of these); without the variable, 0..count-1."""
    listed = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    ids = [part.strip() for part in listed.split(",") if part.strip()]
    return ids[:count]


@dataclass
class Placement:
    """Where each local worker runs: its device ("" = the run's own, i.e. the CPU) and its threads."""
    devices: list[str]
    threads: int
    labels: list[str]  # what each worker is told it runs on, e.g. "cuda:0 (GPU 3)"

    @property
    def jobs(self) -> int:
        return len(self.devices)


def place_workers(gpus: list[str], cores: int, jobs: int | None = None, runs_per_gpu: int = 1,
                  threads_per_run: int | None = None) -> Placement:
    """Workers for a local sweep. With GPUs (their physical ids in ``gpus``): ``runs_per_gpu`` workers
    share each GPU, spread over the GPUs first (``--jobs`` may take fewer). On the CPU: ``jobs`` x
    ``threads_per_run`` never exceeds the cores (one thread per run and one run per core by default,
    at most 8 runs)."""
    if runs_per_gpu < 1:
        raise UsageError(f"--runs-per-gpu must be >= 1, got {runs_per_gpu}")
    if threads_per_run is not None and threads_per_run < 1:
        raise UsageError(f"--threads-per-run must be >= 1, got {threads_per_run}")
    if gpus:
        slots = [(f"cuda:{i}", phys) for _ in range(runs_per_gpu) for i, phys in enumerate(gpus)]
        jobs = len(slots) if jobs is None else jobs
        if jobs > len(slots):  # more workers than slots: keep cycling over the GPUs
            slots = [slots[i % len(slots)] for i in range(jobs)]
        slots = slots[:jobs]
        threads = threads_per_run or max(1, cores // max(1, jobs))
        return Placement([d for d, _ in slots], threads, [f"{d} (GPU {phys})" for d, phys in slots])
    if runs_per_gpu != 1:
        raise UsageError("--runs-per-gpu needs a GPU; on the CPU use --jobs and --threads-per-run")
    if jobs is None:
        threads = threads_per_run or 1
        jobs = max(1, min(8, cores // threads))
    else:
        threads = threads_per_run or max(1, cores // jobs)
    if jobs * threads > cores:
        raise UsageError(f"--jobs {jobs} x --threads-per-run {threads} = {jobs * threads} threads on "
                         f"{cores} CPU cores; lower --jobs or --threads-per-run")
    return Placement([""] * jobs, threads, ["cpu"] * jobs)


def default_placement(jobs: int | None = None, runs_per_gpu: int = 1,
                      threads_per_run: int | None = None) -> Placement:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if threads_per_run is None:  # OMP_NUM_THREADS, when set, is the user's threads per process
        with contextlib.suppress(ValueError):
            threads_per_run = int(os.environ.get("OMP_NUM_THREADS", "")) or None
    cores = os.cpu_count() or 1
    if threads_per_run is not None and jobs is None:
        threads_per_run = min(threads_per_run, cores)
    return place_workers(visible_gpus(count), cores, jobs, runs_per_gpu, threads_per_run)


def run_plan(plan: Plan, store: Store, jobs: int | None = None, retry_failed: bool = False,
             live: bool | None = None, placement: Placement | None = None) -> SweepResult:
    """Run what the store lacks, over ``jobs`` workers (processes when more than one); then wait
    for the runs that other processes hold, and say why each run still without an ok record lacks it."""
    start = time.perf_counter()
    for tmp in store.sweep_temporary():
        print(f"note: removed {tmp}, left by a writer that was killed", file=sys.stderr)
    status = {}
    for run in plan.runs:
        record, problem = check_record(Path(run.path)) if Path(run.path).exists() else (None, "")
        if problem:
            print(f"note: record {run.path} is left aside ({problem}): the run is done again",
                  file=sys.stderr)
        status[run.key] = None if record is None else record["status"]
    already = sum(1 for s in status.values() if s == "ok" or (s == "failed" and not retry_failed))
    todo = [r for r in plan.runs if status[r.key] is None or (status[r.key] == "failed" and retry_failed)]
    placement = placement or default_placement(jobs)
    jobs = max(1, min(placement.jobs, max(len(todo), 1)))
    devices, threads = placement.devices[:jobs], placement.threads
    retry_before = time.time() if retry_failed else 0.0
    progress = Progress(len(plan.runs), already, todo, jobs, live)
    crashed: dict[int, int] = {}
    try:
        if jobs == 1:
            work(todo, WorkerSpec(str(store.root), devices[0], threads, plan.smoke, retry_before),
                 progress.update)
        else:
            crashed = _run_processes(todo, store, jobs, devices, threads, plan.smoke, retry_before, progress)
    finally:
        progress.close()
    lost = {key: pid for key, pid in progress.started.items() if pid in crashed}
    for r in plan.runs:  # a worker killed before its "start" event left: its claim file names it
        if crashed and r.key not in lost and store.read(Path(r.path)) is None:
            pid = _holder_pid(store.holder(r.key))
            if pid in crashed:
                lost[r.key] = pid
    ended = _wait_for_holders(plan, store, set(lost))
    lacking = []
    for r in plan.runs:
        reason = _lacks(store, r, lost, crashed, ended)
        if reason:
            lacking.append((r, reason))
    lacking += [(None, why) for why in plan.left_out]
    final = [store.read(Path(r.path)) for r in plan.runs]
    ok = sum(1 for r in final if r and r["status"] == "ok")
    failed = sum(1 for r in final if r and r["status"] == "failed")
    return SweepResult(len(plan.runs), already, progress.finished, progress.failed, ok, failed,
                       len(plan.runs) - ok - failed, progress.trained, progress.reused,
                       time.perf_counter() - start, lacking, sorted(progress.errors))


def _holder_pid(text: str) -> int:
    """The pid in a claim's ``host:pid since ...`` when the host is this one, else 0."""
    host, _, rest = text.split(" ", 1)[0].rpartition(":")
    return int(rest) if host == socket.gethostname() and rest.isdigit() else 0


def _wait_for_holders(plan: Plan, store: Store, lost: set[str]) -> dict[str, str]:
    """Wait for the runs without a record that another process (another sweep, a SLURM job) still
    holds; returns {key: holder} for those whose holder ended without writing one."""
    ended = {}
    for r in plan.runs:
        if r.key in lost or store.read(Path(r.path)) is not None:
            continue
        claim = store.claim(r.key)
        if claim is None:
            who = store.holder(r.key)
            claim = store.wait(r.key, lambda msg: print(f"note: {msg}", file=sys.stderr, flush=True),
                               f"{r.label} on {r.dataset} seed {r.seed}")
            if store.read(Path(r.path)) is None:
                ended[r.key] = who
        claim.release()
    return ended


def _lacks(store: Store, run: PlannedRun, lost: dict[str, int], crashed: dict[int, int],
           ended: dict[str, str]) -> str:
    """Why ``run`` has no ok record at the end of the sweep ("" when it has one)."""
    path = Path(run.path)
    record, problem = check_record(path) if path.exists() else (None, "")
    if record is not None:
        return "" if record["status"] == "ok" else f"failed: {str(record.get('error', ''))[:200]}"
    if problem:
        return f"its record {path} is {problem}"
    if run.key in lost:
        pid = lost[run.key]
        return f"lost: its worker (pid {pid}) ended abnormally (exit code {crashed[pid]}) while running it"
    if run.key in ended:
        return f"lost: {ended[run.key]} held it and ended without writing a record"
    return "not run (a worker stopped early; see the errors above)"


def _run_processes(todo: list[PlannedRun], store: Store, jobs: int, devices: list[str], threads: int,
                   smoke: Smoke | None, retry_before: float, progress: Progress) -> dict[int, int]:
    """Run the workers; returns {pid: exit code} of those that ended abnormally."""
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    procs = []
    for i in range(jobs):
        spec = WorkerSpec(str(store.root), devices[i % len(devices)], threads, smoke, retry_before)
        # Every worker walks the same ordered list; claims keep them apart.
        procs.append(ctx.Process(target=_worker_main, args=(todo, spec, events), daemon=True))
    start_workers(procs)
    exited = 0
    try:
        while exited < len(procs):
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    # drain what is left, then stop
                    while True:
                        try:
                            event = events.get_nowait()
                        except queue.Empty:
                            break
                        if event["event"] != "exit":
                            progress.update(event)
                    break
                continue
            if event["event"] == "exit":
                exited += 1
            else:
                progress.update(event)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)
    crashed = {p.pid: p.exitcode for p in procs if p.exitcode not in (0, None, 2, -signal.SIGTERM)}
    if crashed:
        print(f"warning: {len(crashed)} worker(s) ended abnormally (exit codes {list(crashed.values())}); "
              "re-run the sweep to finish their runs", file=sys.stderr)
    return crashed


# --- SLURM ---------------------------------------------------------------------------------------------
SLURM_CLUSTERS = ("slurm", "local", "debug")


def slurm_executor(plan: Plan, store: Store, options: dict[str, str], cluster: str | None = None) -> Any:
    """A submitit executor with the sweep's parameters; UsageError for a bad cluster or parameter.
    Creates nothing on disk (the log folder appears at the first submission)."""
    import submitit

    if cluster is not None and cluster not in SLURM_CLUSTERS:
        raise UsageError(f"--slurm-cluster must be one of {', '.join(SLURM_CLUSTERS)}, got {cluster!r}")
    try:
        executor = submitit.AutoExecutor(folder=str(store.root / "slurm" / "%j"), cluster=cluster)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--slurm-cluster {cluster or 'auto'}: {str(exc).splitlines()[0]}") from None
    params: dict[str, Any] = {"timeout_min": 24 * 60, "gpus_per_node": 1, "cpus_per_task": 8,
                              "tasks_per_node": 1, "nodes": 1, "name": f"sweep-{plan.sweep.name}"}
    for key, value in options.items():
        params[key] = int(value) if str(value).isdigit() else value
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError, NameError) as exc:
        raise UsageError(f"--slurm-opt: {str(exc).splitlines()[0]}; see submitit's executor parameters "
                         "(e.g. slurm_partition=gpu, timeout_min=600)") from None
    return executor


def submit_slurm(plan: Plan, store: Store, jobs: int, options: dict[str, str], cluster: str | None = None,
                 wait: bool = False, retry_failed: bool = False, executor: Any = None) -> list[str]:
    """Submit ``jobs`` SLURM jobs (through submitit), each a worker over the whole plan on one GPU;
    claims in the shared store keep them apart. Returns the job ids."""
    executor = executor or slurm_executor(plan, store, options, cluster)
    retry_before = time.time() if retry_failed else 0.0
    from benchmark.registry import external_plugins

    spec = WorkerSpec(str(store.root.resolve()), "", 0, plan.smoke, retry_before, tuple(external_plugins()))
    submitted = [executor.submit(work, plan.runs, spec, _print_event) for _ in range(jobs)]
    if wait:
        for job in submitted:
            job.result()
    return [str(job.job_id) for job in submitted]


def _print_event(event: dict[str, Any]) -> None:
    if event["event"] == "done":
        print(json.dumps(event, default=str), flush=True)
