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

The code is split by concept: :mod:`benchmark.sweep_spec` (the files), :mod:`benchmark.sweep_plan`
(the grid of runs and their order), :mod:`benchmark.sweep_workers` (what each worker does),
:mod:`benchmark.sweep_progress` (the live display) and :mod:`benchmark.sweep_launch` (the local
pool, worker placement, SLURM). This module gathers their names.
"""

from __future__ import annotations

from benchmark.sweep_launch import (
    SLURM_CLUSTERS,
    Placement,
    SweepResult,
    _holder_pid,
    _lacks,
    _print_event,
    _run_processes,
    _wait_for_holders,
    check_slurm,
    default_placement,
    place_workers,
    run_plan,
    slurm_executor,
    submit_slurm,
    visible_gpus,
)
from benchmark.sweep_plan import (
    Filters,
    Plan,
    PlannedRun,
    Smoke,
    _DataCache,
    _expand_variant,
    _label,
    _selected,
    _split_list,
    _subset,
    _tuned_budget_note,
    load_tuned,
    plan_sweep,
    plan_sweeps,
)
from benchmark.sweep_progress import (
    Progress,
    _hms,
    live_bar,
)
from benchmark.sweep_spec import (
    DATASET_KEYS,
    METHOD_KEYS,
    MODALITIES,
    SWEEP_DIR,
    TOP_KEYS,
    VARIANT_DATASETS,
    SweepSpec,
    _check_keys,
    _table,
    list_sweeps,
    load_sweep,
    sweep_path,
)
from benchmark.sweep_workers import (
    WorkerSpec,
    _needs_run,
    _run_one,
    _work,
    _worker_main,
    work,
)

__all__ = [
    "SWEEP_DIR",
    "MODALITIES",
    "TOP_KEYS",
    "DATASET_KEYS",
    "METHOD_KEYS",
    "VARIANT_DATASETS",
    "SweepSpec",
    "list_sweeps",
    "sweep_path",
    "_table",
    "_check_keys",
    "load_sweep",
    "Filters",
    "Smoke",
    "_subset",
    "PlannedRun",
    "Plan",
    "_split_list",
    "_expand_variant",
    "_label",
    "load_tuned",
    "_tuned_budget_note",
    "_DataCache",
    "plan_sweep",
    "plan_sweeps",
    "_selected",
    "WorkerSpec",
    "_needs_run",
    "work",
    "_work",
    "_run_one",
    "_worker_main",
    "live_bar",
    "Progress",
    "_hms",
    "SweepResult",
    "visible_gpus",
    "Placement",
    "place_workers",
    "default_placement",
    "run_plan",
    "_holder_pid",
    "_wait_for_holders",
    "_lacks",
    "_run_processes",
    "SLURM_CLUSTERS",
    "check_slurm",
    "slurm_executor",
    "submit_slurm",
    "_print_event",
]
