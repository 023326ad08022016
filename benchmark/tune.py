"""Hyperparameter tuning with Optuna on validation accuracy (the test split is never looked at).

Each method's search space is a function of the trial returning assignments (as ``--set``),
declared beside the method (``Method.search_space``: the shared optimiser settings plus the options
its paper tunes). Trials are pruned
on the per-epoch validation accuracy (median rule). The study lives in an Optuna storage: a local
SQLite file by default, or any database URL (PostgreSQL, MySQL) so that workers on many machines
share one study. The trial budget counts completed and pruned trials over all workers: each
worker takes a trial number and gives it back unused once the budget is reached, so N means N.
Re-running the command resumes the study. The best parameters go to ``<out>/<dataset>-<method>.json``,
which ``python -m benchmark sweep NAME --tuned FILE`` applies to that method's runs on that dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmark.claims import process_alive
from benchmark.config import build_config, parse_assignments
from benchmark.errors import UsageError
from benchmark.procs import start_workers, worker_init

Space = Callable[[Any], dict[str, Any]]
# A running trial is a lease: its worker renews the "heartbeat" every LEASE_SECONDS / 4 from a
# thread, and a trial not renewed for LEASE_SECONDS (an owner on another host that died, or no
# owner at all) is failed and queued again with its parameters. A dead owner on this host is
# seen at once.
LEASE_SECONDS = float(os.environ.get("BMB_TUNE_LEASE", "120"))
POLL_SECONDS = 1.0


def search_space(method: str) -> Space:
    """The method's own search space, declared beside it (``Method.search_space``)."""
    from benchmark.registry import METHODS

    return METHODS.get(method).search_space


# --- storage and study -----------------------------------------------------------------------------
MAX_RETRY = 3  # a trial whose worker died is run again at most this often


def _retry_class() -> tuple[Any, str]:
    """Optuna's retry of stale trials and the storage argument that takes it (renamed in Optuna 4.9)."""
    import optuna

    # Heartbeats and their retry are marked experimental by Optuna; the suite relies on them knowingly.
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        return optuna.storages.RetryHeartbeatStaleTrialCallback, "heartbeat_stale_trial_callback"
    return optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"


def retry_callback() -> Any:
    return _retry_class()[0](max_retry=MAX_RETRY)


def make_storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats: a running trial whose worker stops beating for the
    lease is failed by the next worker that starts a trial, and queued again with its parameters
    (Optuna's RetryFailedTrialCallback)."""
    import optuna

    retry, argument = _retry_class()
    kwargs: dict[str, Any] = {"heartbeat_interval": max(1, int(LEASE_SECONDS / 4)),
                              "grace_period": max(2, int(LEASE_SECONDS)),
                              argument: retry(max_retry=MAX_RETRY)}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:  # bad URL, missing driver, unreachable server
            # Two workers creating the same new database race on its tables: try again.
            if ("already exists" in str(exc) or "UNIQUE constraint" in str(exc)) and attempt < 5:
                time.sleep(0.5 + attempt)
                continue
            raise UsageError(f"Optuna storage {url!r} cannot be opened ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); check the URL") from None
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _creation_lock(url: str) -> Iterator[None]:
    """Workers on one machine open a new SQLite file one at a time (its tables are created once)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == prefix + ":memory:":
        yield
        return
    lock = Path(url[len(prefix):] + ".lock")
    if not lock.parent.is_dir():
        yield
        return
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_study(storage_url: str, name: str, fixed: dict[str, Any], sampler_seed: int | None) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported in our own words
    with _creation_lock(storage_url):  # workers starting together create the file and study once
        study = optuna.create_study(
            storage=make_storage(storage_url), study_name=name, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=sampler_seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
        known = study.user_attrs.get("fixed")
        if known is None:
            study.set_user_attr("fixed", fixed)
    if known is not None and known != json.loads(json.dumps(fixed, default=str)):
        raise UsageError(f"study {name!r} was started with other fixed settings ({known}); resume it with "
                         "the same --method/--dataset/--seed/--epochs/--set, or give another --study")
    return study


def _counted_states() -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def _fail_dead_trials(study: Any) -> int:
    """Fail the running trials that no worker will finish and queue each again with its parameters
    (the same retry as Optuna's heartbeat check, which covers owners on other hosts): an owner on this
    host that is gone is seen at once; a trial that never had an owner (left by a process killed
    between asking for it and starting it) once the lease has passed. Returns how many."""
    from optuna.trial import TrialState

    host, now, failed = socket.gethostname(), time.time(), 0
    retry = retry_callback()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(t.user_attrs.get("owner", ""))
        started = t.datetime_start.timestamp() if t.datetime_start else now
        o_host, _, pid = owner.rpartition(":")
        gone = o_host == host and pid.isdigit() and not process_alive(int(pid))
        if not (gone or (not owner and now - started > LEASE_SECONDS)):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        except Exception:  # another worker did it first
            continue
        frozen = next(f for f in study.get_trials(deepcopy=False) if f.number == t.number)
        if frozen.state == TrialState.FAIL:
            retry(study, frozen)
            failed += 1
    return failed


def retried_from(trial: Any) -> int | None:
    """The number of the trial that ``trial`` runs again, if it is a retry."""
    return _retry_class()[0].retried_trial_number(trial)


# --- the objective ---------------------------------------------------------------------------------
def run_trial(trial: Any, fixed: dict[str, Any], data: Any, space: Space, report_epochs: bool = True) -> float:
    """Train one configuration; report per-epoch validation accuracy (pruning on it); return the
    final validation accuracy of the selected checkpoint."""
    import optuna

    from benchmark.runner import execute, prepare

    params = space(trial)
    cfg = build_config({"diagnostics": False, **fixed, **params})  # trials are judged on validation only
    run = prepare(cfg, data)
    step = 0

    def on_epoch_end(row: dict[str, Any]) -> None:
        nonlocal step
        value = row.get("val_accuracy")
        if report_epochs and isinstance(value, float) and math.isfinite(value):
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {value:.4f} at step {step}")
        step += 1

    record = execute(run, on_epoch_end=on_epoch_end)
    return float(record["metrics"]["val_accuracy"])


# A study may average several runs per trial (tune --datasets/--seeds): the lists ride in the
# study's fixed settings under these keys, next to the first run's dataset and seed.
CELL_KEYS = ("datasets", "seeds")


def trial_cells(fixed: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """The settings every run of a trial shares, and its (dataset, seed) runs."""
    base = {k: v for k, v in fixed.items() if k not in CELL_KEYS}
    datasets = list(fixed.get("datasets") or [fixed["dataset"]])
    seeds = [int(x) for x in fixed.get("seeds") or [fixed.get("seed", 0)]]
    return base, [(d, s) for d in datasets for s in seeds]


def trial_value(trial: Any, fixed: dict[str, Any], datas: dict[str, Any], space: Space) -> float:
    """One run: its validation accuracy, pruned per epoch. Several (datasets x seeds): their mean,
    reported (and pruned on) after each run."""
    import optuna

    base, cells = trial_cells(fixed)
    if len(cells) == 1:
        (dataset, seed), = cells
        return run_trial(trial, {**base, "dataset": dataset, "seed": seed}, datas[dataset], space)
    values = []
    for step, (dataset, seed) in enumerate(cells):
        values.append(run_trial(trial, {**base, "dataset": dataset, "seed": seed}, datas[dataset], space,
                                report_epochs=False))
        mean = sum(values) / len(values)
        trial.report(mean, step)
        if step + 1 < len(cells) and trial.should_prune():
            raise optuna.TrialPruned(f"mean validation accuracy {mean:.4f} after {step + 1} runs")
    return sum(values) / len(values)


class SurplusTrial(Exception):
    """A trial asked for after the budget was taken by other workers: failed, never counted."""


def work(storage_url: str, study_name: str, fixed: dict[str, Any], trials: int, sampler_seed: int | None,
         quiet: bool = False) -> int:
    """Run trials until the study has ``trials`` completed or pruned ones; returns how many this
    process finished. Trials run through ``study.optimize`` (Optuna's heartbeat and retry of dead
    workers' trials); the budget is exact: a trial asked for once the budget is taken is given back."""
    import optuna
    from optuna.trial import TrialState

    from benchmark.data import create_dataset

    study = open_study(storage_url, study_name, fixed, sampler_seed)
    base, cells = trial_cells(fixed)
    datas = {}
    for dataset, _ in cells:
        if dataset not in datas:
            cfg = build_config({**base, "dataset": dataset})
            datas[dataset] = create_dataset(dataset, cfg.dataset_options)
    space = search_space(cfg.method)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    counted = _counted_states()
    tally = {"done": 0, "failures": 0}

    def objective(trial: Any) -> float:
        trial.set_user_attr("owner", owner)
        ahead = [t for t in study.get_trials(deepcopy=False, states=counted) if t.number < trial.number]
        if len(ahead) >= trials:  # another worker took the last trial first
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise SurplusTrial(f"the budget of {trials} trials is taken")
        try:
            return trial_value(trial, fixed, datas, space)
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except Exception as exc:  # a refused value, a diverged run or a bug: recorded, the study goes on
            trial.set_user_attr("error", str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}")
            raise

    def after(study: Any, trial: Any) -> None:
        seconds = (trial.duration.total_seconds() if trial.duration else 0.0)
        if trial.state == TrialState.COMPLETE:
            tally["done"] += 1
            _say(quiet, f"trial {trial.number}: validation accuracy {trial.value:.4f} {trial.params} "
                        f"{seconds:.1f}s")
        elif trial.state == TrialState.PRUNED:
            tally["done"] += 1
            _say(quiet, f"trial {trial.number} pruned {seconds:.1f}s")
        elif trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
            tally["failures"] += 1
            _say(quiet, f"trial {trial.number} failed: {trial.user_attrs.get('error', '')}")
            if tally["failures"] > trials:
                study.stop()

    budget = optuna.study.MaxTrialsCallback(trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    while tally["failures"] <= trials:
        _fail_dead_trials(study)
        if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) >= trials:
            break
        if (len(study.get_trials(deepcopy=False, states=counted)) >= trials
                and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
            time.sleep(POLL_SECONDS)  # other workers run the last trials: wait for them or their lease
            continue
        study.optimize(objective, callbacks=[budget, after], catch=(Exception,), gc_after_trial=False)
    return tally["done"]


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _worker_main(storage_url: str, study_name: str, fixed: dict[str, Any], trials: int,
                 sampler_seed: int | None, quiet: bool) -> None:
    worker_init()  # dies with the parent; Ctrl-C is the parent's to handle
    from benchmark.device import process_threads

    signal.signal(signal.SIGTERM, _interrupt)  # the parent ending us: give the trial back first
    try:
        with process_threads(1):  # the study's workers share the cores: one thread each
            work(storage_url, study_name, fixed, trials, sampler_seed, quiet)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _wait_for_running(study: Any, poll: float = 1.0) -> None:
    """Wait until no trial of the study is running (other workers finishing their last trial);
    trials of dead workers are failed on the way."""
    from optuna.trial import TrialState

    while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _fail_dead_trials(study)
        time.sleep(poll)


def best_file(out: Path, method: str, dataset: str) -> Path:
    return out / f"{dataset}-{method}.json"


def write_best(study: Any, path: Path, fixed: dict[str, Any], storage_url: str) -> dict[str, Any]:
    from optuna.trial import TrialState

    from benchmark.files import write_json_atomic

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UsageError(f"study {study.study_name!r} has no completed trial yet; run more trials")
    best = study.best_trial
    states = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED)}
    states["fail"] = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                         if not t.user_attrs.get("surplus"))
    data = {"method": fixed["method"], "dataset": fixed["dataset"], "params": best.params,
            "val_accuracy": best.value, "trial": best.number, "trials": states,
            "study": study.study_name, "storage": storage_url, "fixed": fixed,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(path, data)
    return data


def tune_command(args: argparse.Namespace) -> int:
    """``tune``: one study per method named in --method (comma-separated), each with the same budget."""
    from benchmark.config import MAX_SEED
    from benchmark.files import check_parent
    from benchmark.runner import prepare

    if args.trials < 1 or args.jobs < 1:
        raise UsageError("--trials and --jobs must be >= 1")
    if args.sampler_seed is not None and not 0 <= args.sampler_seed <= MAX_SEED - args.jobs:
        raise UsageError(f"--sampler-seed must be in [0, {MAX_SEED - args.jobs}], got {args.sampler_seed}")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise UsageError("--method needs at least one method name")
    datasets = _names(args.datasets, "--datasets") if args.datasets else [args.dataset]
    seeds = [_seed(x) for x in _names(args.seeds, "--seeds")] if args.seeds else [args.seed]
    fixed_by_method = {}
    for method in methods:
        fixed: dict[str, Any] = parse_assignments(args.assignments)
        fixed.update(method=method, dataset=datasets[0], seed=seeds[0])
        if args.epochs is not None:
            fixed["epochs"] = args.epochs
        fixed.setdefault("probe", False)  # trials are judged on validation accuracy only
        if len(datasets) > 1 or len(seeds) > 1:
            fixed.update(datasets=datasets, seeds=seeds)
        base, cells = trial_cells(fixed)
        for dataset, seed in cells:  # every name and value checked before any study is touched
            prepare(build_config({**base, "dataset": dataset, "seed": seed}))
        fixed_by_method[method] = fixed
    if not str(args.out).strip():
        raise UsageError("--out is empty; give a folder for the best-parameter file")
    out = Path(args.out).expanduser()
    check_parent(out, "--out")
    if args.storage:  # a bad URL is refused before any folder is made
        make_storage(args.storage)
    try:
        out.mkdir(exist_ok=True)  # another worker may create it at the same moment
    except OSError as exc:
        raise UsageError(f"cannot create --out {str(out)!r} ({exc.strerror}); choose another folder") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {str(out)!r} is not writable; choose another folder")
    storage_url = args.storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    for method, fixed in fixed_by_method.items():
        name = f"{method}-{'+'.join(datasets)}" if not args.study else (
            args.study if len(methods) == 1 else f"{args.study}-{method}")
        _tune_one(args, method, fixed, storage_url, name, out)
    return 0


def _names(text: str, flag: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise UsageError(f"{flag} needs at least one comma-separated value")
    return names


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--seeds takes whole numbers, got {text!r}") from None


def _tune_one(args: argparse.Namespace, method: str, fixed: dict[str, Any], storage_url: str, name: str,
              out: Path) -> None:
    study = open_study(storage_url, name, fixed, args.sampler_seed)  # create it (and check) once here
    t0 = time.perf_counter()
    if args.jobs == 1:
        work(storage_url, name, fixed, args.trials, args.sampler_seed, args.quiet)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(storage_url, name, fixed, args.trials,
                                                        None if args.sampler_seed is None else args.sampler_seed + i,
                                                        args.quiet))
                 for i in range(args.jobs)]
        start_workers(procs)
        try:
            for proc in procs:
                proc.join()
        finally:  # Ctrl-C or an error here: the workers end before us (their trials are given back)
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():  # stuck giving its trial back: its lease will expire instead
                    proc.kill()
                    proc.join(timeout=10)
        if any(proc.exitcode == 2 for proc in procs):
            raise UsageError(f"the workers of study {name!r} stopped on an error (above)")
    _wait_for_running(study)  # so that every worker writes the same, final best parameters
    datasets = list(fixed.get("datasets") or [fixed["dataset"]])
    for dataset in datasets:  # one file per dataset, which `sweep --tuned` applies to its runs
        path = best_file(out, method, dataset)
        best = write_best(study, path, {**fixed, "dataset": dataset}, storage_url)
    counts = best["trials"]
    print(f"tune {method} on {'+'.join(datasets)}: study {name!r} has {counts['complete']} complete, "
          f"{counts['pruned']} pruned, {counts['fail']} failed trials; best validation accuracy "
          f"{best['val_accuracy']:.4f} with {best['params']} ({time.perf_counter() - t0:.0f}s) → {path}")
