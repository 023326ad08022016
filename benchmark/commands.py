"""Sub-commands ``sweep``, ``report``, ``tune``, ``perf`` and ``data`` (see ``python -m benchmark
<command> --help``). Registering them imports no torch, pandas, matplotlib or optuna: each handler
imports the module that does the work when it runs, so that every ``--help`` answers at once."""

from __future__ import annotations

import argparse
import sys
import tempfile

from benchmark.errors import UsageError

DEFAULT_STORE = "results"


def register(sub: argparse._SubParsersAction) -> None:
    _register_sweep(sub)
    _register_report(sub)
    _register_tune(sub)
    _register_perf(sub)
    _register_data(sub)


# --- sweep -----------------------------------------------------------------------------------------
def _register_sweep(sub: argparse._SubParsersAction) -> None:
    from benchmark.sweep import list_sweeps

    p = sub.add_parser(
        "sweep", help="run a sweep (a grid of runs) into a result store",
        description="Run every run of sweep NAME that the store lacks, over --jobs workers. A killed "
                    "sweep resumes where it stopped; several sweep processes may share one store.",
    )
    p.add_argument("name", nargs="+",
                   help=f"a packaged sweep ({', '.join(list_sweeps())}) or the path of a .toml file; several "
                        "run as one grid over one pool of workers (a run that two of them share runs once)")
    p.add_argument("--store", default=None,
                   help=f"result store folder; its parent must exist [{DEFAULT_STORE}; with --smoke a "
                        "temporary folder]")
    p.add_argument("--dataset", action="append", default=[], help="only these datasets (comma-separated, repeatable)")
    p.add_argument("--method", action="append", default=[], help="only these methods (comma-separated, repeatable)")
    p.add_argument("--seed", action="append", default=[], help="only these seeds (comma-separated, repeatable)")
    p.add_argument("--label", action="append", default=[],
                   help="only runs whose table label matches this glob, e.g. 'udi static*' (repeatable)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs with this assignment, e.g. method.anchor=auto (repeatable)")
    p.add_argument("--jobs", type=int, default=None,
                   help="workers: default --runs-per-gpu per visible GPU, else one worker per "
                        "--threads-per-run CPU cores")
    p.add_argument("--runs-per-gpu", type=int, default=1, metavar="N",
                   help="workers sharing each GPU (CUDA_VISIBLE_DEVICES is respected) [1]")
    p.add_argument("--threads-per-run", type=int, default=None, metavar="T",
                   help="CPU threads of each run; --jobs x T may not exceed the cores "
                        "[1 with the default --jobs, else cores // --jobs]")
    p.add_argument("--retry-failed", action="store_true", help="re-run the runs recorded as failed")
    p.add_argument("--tuned", action="append", default=[], metavar="PATH",
                   help="best-parameter file (or folder of them) written by `tune`: applied to the runs "
                        "of its method and dataset")
    p.add_argument("--smoke", action="store_true",
                   help="tiny stratified subsets and few epochs, first seed only, into a temporary store "
                        "unless --store is given: every cell of the sweep in minutes")
    p.add_argument("--smoke-samples", type=int, default=40, help="samples per split in smoke mode [40]")
    p.add_argument("--smoke-epochs", type=int, default=1, help="epochs (per phase) in smoke mode [1]")
    p.add_argument("--list", action="store_true", help="print the runs and whether the store has them; run nothing")
    p.add_argument("--no-live", action="store_true", help="one line per finished run instead of a live bar")
    p.add_argument("--slurm", type=int, default=0, metavar="N",
                   help="submit N SLURM jobs (through submitit), one GPU each, instead of running here")
    p.add_argument("--slurm-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit executor parameter, e.g. slurm_partition=gpu or timeout_min=600")
    p.add_argument("--slurm-wait", action="store_true", help="wait for the SLURM jobs to finish")
    p.add_argument("--slurm-cluster", default=None, help="submitit cluster: slurm, local or debug [auto]")
    p.set_defaults(handler=cmd_sweep)


def _ints(values: list[str], flag: str) -> list[int]:
    from benchmark.sweep import _split_list

    out = []
    for v in _split_list(values):
        try:
            out.append(int(v))
        except ValueError:
            raise UsageError(f"{flag} expects integers, got {v!r}") from None
    return out


def _assignments(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def cmd_sweep(args: argparse.Namespace) -> int:
    from benchmark.store import Store
    from benchmark.sweep import (
        Filters,
        Smoke,
        _split_list,
        default_placement,
        load_sweep,
        load_tuned,
        plan_sweeps,
        run_plan,
    )

    specs = [load_sweep(name) for name in args.name]
    filters = Filters(_split_list(args.dataset), _split_list(args.method), _ints(args.seed, "--seed"),
                      list(args.label), _assignments(args.where, "--where"))
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    placement = None
    if not (args.list or args.slurm):
        placement = default_placement(args.jobs, args.runs_per_gpu, args.threads_per_run)
    smoke = None
    if args.smoke:
        if args.smoke_samples < 4 or args.smoke_epochs < 1:
            raise UsageError("--smoke-samples must be >= 4 and --smoke-epochs >= 1")
        smoke = Smoke(args.smoke_samples, args.smoke_epochs)
    if args.slurm < 0:
        raise UsageError(f"--slurm takes a number of jobs >= 1 (0: run here), got {args.slurm}")
    slurm_options = _assignments(args.slurm_opt, "--slurm-opt")
    tuned = load_tuned(args.tuned)
    store = Store(args.store or DEFAULT_STORE)
    plan = plan_sweeps(specs, store, filters, smoke, tuned)  # every value checked before the store is touched
    spec = plan.sweep
    if args.slurm:
        from benchmark.sweep import check_slurm

        check_slurm(plan, store, slurm_options, args.slurm_cluster)
    if smoke and not args.store:  # a temporary store, made only once everything is checked
        store = Store(tempfile.mkdtemp(prefix=f"bmb-smoke-{spec.name}-"))
        for run in plan.runs:
            run.path = str(store.record_path(run.dataset, run.method, run.seed, run.key))
    if not args.list:
        store.check_writable()
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.list:
        status = store.status_by_key() if store.root.is_dir() else {}
        for run in plan.runs:
            print(f"{status.get(run.key, 'todo'):<7} {run.dataset:<16} {run.label:<40} seed {run.seed}  {run.key}")
        print(f"{len(plan.runs)} runs")
        return 0
    if args.slurm:
        from benchmark.sweep import submit_slurm

        ids = submit_slurm(plan, store, args.slurm, slurm_options, args.slurm_cluster, args.slurm_wait,
                           args.retry_failed)
        print(f"submitted {len(ids)} SLURM job(s) for {len(plan.runs)} runs: {', '.join(ids)}; "
              f"logs in {store.root / 'slurm'}; re-run this command without --slurm to check or finish")
        return 0
    what = f"sweep {spec.name}" + (f" (smoke: {smoke.samples} samples per split, {smoke.epochs} epoch(s))"
                                   if smoke else "")
    print(f"{what}: {len(plan.runs)} runs into {store.root}", file=sys.stderr, flush=True)
    result = run_plan(plan, store, args.jobs, args.retry_failed, live=False if args.no_live else None,
                      placement=placement)
    minutes, seconds = divmod(int(round(result.seconds)), 60)
    print(f"{what}: {result.total} runs: {result.ok_in_store} ok ({result.ran - result.failed_now} new, "
          f"{result.already} already in the store), {result.failed_in_store} failed, {result.missing} "
          f"missing; unimodal models "
          f"trained {result.trained}, reused {result.reused}; {minutes}m{seconds:02d}s; store {store.root}",
          flush=True)
    for message in result.errors:
        print(f"error: {message}", file=sys.stderr)
    for run, why in result.lacking:  # every planned run without an ok record, and why
        name = f"{run.label} on {run.dataset} seed {run.seed} ({run.key})" if run else "left out"
        print(f"lacking: {name}: {why}", file=sys.stderr)
    if result.errors:
        return 2
    if result.lacking:
        fixes = []
        if result.failed_in_store:
            fixes.append(f"--retry-failed re-runs the failed (reasons in their records under "
                         f"{store.root / 'records'})")
        if result.missing:
            fixes.append("re-running the sweep finishes the lost runs")
        print(f"{len(result.lacking)} planned runs lack an ok record" + (f"; {'; '.join(fixes)}" if fixes else ""),
              file=sys.stderr)
        return 1
    return 0


# --- report ----------------------------------------------------------------------------------------
def _register_report(sub: argparse._SubParsersAction) -> None:
    from benchmark.report_args import DESCRIPTION, add_arguments

    p = sub.add_parser("report", help="tables and figures from a result store (no training)",
                       description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from benchmark.report import report_command

    return report_command(args)


# --- tune -------------------------------------------------------------------------------------------
def _register_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="tune a method's hyperparameters with Optuna on validation accuracy",
        epilog="Browse a study: pip install optuna-dashboard; optuna-dashboard sqlite:///tuned/optuna.db "
               "(or the --storage URL).",
        description="Optuna study over the method's search space (lr, weight decay and its own options), "
                    "maximising validation accuracy, pruning on per-epoch validation accuracy. Several "
                    "processes (or --jobs) may work on one study; re-running resumes it. The best "
                    "parameters are written to a JSON file that `sweep --tuned` applies.",
    )
    p.add_argument("--method", required=True,
                   help="method, or several comma-separated: one study each, all with the same --trials")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--trials", type=int, required=True,
                   help="trials in total for the study (completed or pruned), over all processes")
    p.add_argument("--datasets", default=None, metavar="A,B",
                   help="tune on several datasets at once: a trial's value is the mean validation accuracy "
                        "over every dataset and seed (overrides --dataset)")
    p.add_argument("--seed", type=int, default=0, help="run seed of every trial [0]")
    p.add_argument("--seeds", default=None, metavar="S,T",
                   help="several run seeds per trial, averaged (overrides --seed)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per phase [the run default]")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed settings for every trial (as in `run --set`)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL, e.g. postgresql://user@host/db [sqlite:///<out>/optuna.db]")
    p.add_argument("--study", default=None, help="study name [<method>-<dataset>]")
    p.add_argument("--out", default="tuned", help="folder for the best-parameter file and the default storage [tuned]")
    p.add_argument("--jobs", type=int, default=1, help="worker processes on this machine [1]")
    p.add_argument("--sampler-seed", type=int, default=None, help="seed of the TPE sampler (per process)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from benchmark.tune import tune_command

    return tune_command(args)


# --- perf -------------------------------------------------------------------------------------------
def _register_perf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perf", help="throughput of every method as ratios to a minimal loop",
                       description="Training throughput, step time and peak memory of every method, each as a "
                                   "ratio to a minimal PyTorch loop timed in the same process; the table goes "
                                   "to --out.")
    p.add_argument("--settings", default="small,resnet",
                   help="comma-separated: small (synthetic, MLP), resnet (ResNet18 on CREMA-D's shapes, reduced on "
                        "the CPU), crema-d (CREMA-D's audio 1×257×188 and one 112-pixel frame, B = 16) [small,resnet]")
    p.add_argument("--methods", default="", help="comma-separated methods [all registered]")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median reported) [3]")
    p.add_argument("--epochs", type=int, default=3, help="epochs per timed run; the first is warm-up [3]")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] [auto]")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory processes")
    p.add_argument("--out", default="reports/perf.md", help="where the table is written [reports/perf.md]")
    p.set_defaults(handler=cmd_perf)


def cmd_perf(args: argparse.Namespace) -> int:
    from benchmark.perf import perf_command

    return perf_command(args)


# --- data -------------------------------------------------------------------------------------------
def _register_data(sub: argparse._SubParsersAction) -> None:
    from benchmark.help_index import load_index

    p = sub.add_parser("data", help="list the datasets, or prepare one",
                       description="List every dataset with its modalities, classes, size and whether it is "
                                   "present on this machine, or prepare one into the dataset cache.")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))
    lst = verbs.add_parser("list", help="every dataset: modalities, classes, size, present here")
    lst.set_defaults(handler=cmd_data_list)
    prep = verbs.add_parser("prepare", help="decode a dataset once into the cache (or generate it)")
    prep.add_argument("name", help=f"one of: {', '.join(load_index()['datasets'])}")
    prep.add_argument("--root", "--data-root", dest="root", help="folder holding the release (on-disk datasets)")
    prep.add_argument("--cache-dir", help="dataset cache folder (default $BMB_CACHE_DIR or "
                                          "~/.cache/balanced-mm-bench)")
    prep.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                      help="dataset option, e.g. --set frames=3 (a leading 'dataset.' is optional)")
    prep.set_defaults(handler=cmd_data_prepare)


def cmd_data_list(args: argparse.Namespace) -> int:
    from benchmark.data.commands import cmd_list

    return cmd_list(args)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from benchmark.data.commands import cmd_prepare

    return cmd_prepare(args)
