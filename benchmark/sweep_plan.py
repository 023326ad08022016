"""Planning a sweep: expanding its grid into runs, each checked and keyed before any work, in
work order (unimodal models first)."""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmark.config import build_config, config_hash
from benchmark.errors import FilterMatchesNothing, UsageError
from benchmark.store import Store
from benchmark.sweep_spec import MODALITIES, VARIANT_DATASETS, SweepSpec

# Work order: the methods that train the shared unimodal checkpoints (``Method.run_first``) come
# first, so that later runs reuse them. The runs that read those checkpoints (ensemble, UDI, MCR)
# keep their plan order, well after them: run right after, an ensemble would wait on the claim
# of a checkpoint still training.


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
    """One run of a sweep: its resolved configuration as assignments (every option at the value the
    planner resolved, locations aside: benchmark.runner.PreparedRun.handed), where its record
    goes, and how tables name it."""

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
        from benchmark.registry import METHODS

        return 0 if METHODS.get(self.method).run_first else 1


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


def plan_sweeps(specs: list[SweepSpec], store: Store, filters: Filters | None = None,
                smoke: Smoke | None = None, tuned: dict | None = None) -> Plan:
    """One plan for several sweeps: their runs in the order given, each run once (a run two sweeps
    share has one key; the first sweep's label names it, as when the sweeps run one after the
    other). A filter that selects none of one sweep's runs leaves that sweep out with a note; one
    that selects no run of any of them is an error."""
    if len(specs) == 1:
        return plan_sweep(specs[0], store, filters, smoke, tuned)
    plans, refused = [], []
    for spec in specs:
        try:
            plans.append(plan_sweep(spec, store, filters, smoke, tuned))
        except FilterMatchesNothing as exc:
            refused.append(str(exc))
    if not plans:
        raise UsageError(refused[0])
    runs: dict[str, PlannedRun] = {}
    for plan in plans:
        for run in plan.runs:
            runs.setdefault(run.key, run)
    name = "+".join(spec.name for spec in specs)
    merged = dataclasses.replace(plans[0].sweep, name=name, source=", ".join(p.sweep.source for p in plans),
                                 description="; ".join(p.sweep.description for p in plans))
    notes = [note for plan in plans for note in plan.notes] + [f"left out: {why}" for why in refused]
    return Plan(merged, list(runs.values()), list(dict.fromkeys(notes)), smoke,
                [why for plan in plans for why in plan.left_out])


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
                raise FilterMatchesNothing(f"filter --{kind} {name!r} matches no {kind} of sweep {spec.name} "
                                 f"(its {kind}s: {', '.join(known)})")
    if filters.seeds and not set(filters.seeds) & set(spec.seeds):
        raise FilterMatchesNothing(f"filter --seed {','.join(map(str, filters.seeds))} matches no seed of sweep "
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
                        # handed to its worker resolved: every option at the value planned here
                        runs.append(PlannedRun(run.handed(), mname, dname, seed, label, options,
                                               tuned_file, key, run.key,
                                               str(store.record_path(dname, mname, seed, key))))
    if not runs and notes:
        raise UsageError(f"no run of sweep {spec.name} can run here: " + "; ".join(notes))
    if not runs:
        raise FilterMatchesNothing(f"filters {filters.describe()} match no run of sweep {spec.name}; "
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
