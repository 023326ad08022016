"""Command line: ``python -m benchmark run|list ...``. Bad input gives one line on stderr and
exit status 2; a diverging run gives exit status 3 and a record marked failed.

Building the parser imports no torch (nor pandas, matplotlib or optuna): every ``--help``
answers at once, and a command imports what it needs when its handler runs. The method and
dataset names and options that the help shows come from ``benchmark.help_index``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from benchmark.config import (
    RunConfig,
    build_config,
    options_help,
    parse_assignments,
    read_config_file,
    to_toml,
)
from benchmark.errors import DivergedError, UsageError
from benchmark.help_index import load_index, render_options

# Modules that add sub-commands: each has ``register(subparsers)``, which adds its parser(s)
# with ``set_defaults(handler=function(args) -> exit status)``. Importing them and calling
# ``register`` may not import torch (tests/test_cli_help.py checks every command's --help).
SUBCOMMAND_MODULES: tuple[str, ...] = ("benchmark.quick", "benchmark.commands", "benchmark.evaluate_cmd")

LIST_KINDS = ("methods", "datasets", "encoders", "fusions")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _option_value(argv: list[str], flag: str) -> str | None:
    """The value given to ``flag`` in ``argv`` (``--flag X`` or ``--flag=X``), read before parsing
    so that ``run --help --method M`` can show M's options."""
    for i, item in enumerate(argv):
        if item == flag and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith(flag + "="):
            return item.partition("=")[2]
    return None


def _options_text(argv: list[str]) -> str:
    """``run --help``'s epilog: the shared options, then the options of the method and dataset
    named on the command line, or where to find them."""
    index = load_index()
    rows = [row for row in options_help(RunConfig)
            if row[0] not in ("method", "dataset", "method_options", "dataset_options")]
    width = max(len(name) for name, _, _ in rows) + 1
    lines = ["shared options (--set key=value, or key = value in --config):"]
    lines += [f"  {name:<{width}} {help_text} [default {default}]" for name, default, help_text in rows]
    shown = False
    for kind, flag in (("method", "--method"), ("dataset", "--dataset")):
        name = _option_value(argv, flag)
        if name is None:
            continue
        shown = True
        entry = index[kind + "s"].get(name)
        if entry is None:
            entry = _plugin_entry(kind, name)
        if entry is None:
            lines.append(f"unknown {kind} {name!r}; known {kind}s: {', '.join(index[kind + 's']) or 'none'}")
        else:
            lines += [f"{kind} {name}: {entry['summary']}", *render_options(kind, name, entry["options"])]
    if not shown:
        lines += ["a method's or dataset's own options (--set method.<name>=value, dataset.<name>=value):",
                  "  python -m benchmark run --help --method M --dataset D   (or: python -m benchmark list M)"]
    lines.append(f"encoders (--set encoder.<modality>=name): {', '.join(index['encoders'])}")
    lines.append(f"fusion heads (--set fusion=name): {', '.join(index['fusions'])}")
    return "\n".join(lines)


def _plugin_entry(kind: str, name: str) -> dict[str, Any] | None:
    """A method or dataset of a plug-in written outside the suite (not in the committed index):
    read from the registries, which imports the plug-ins (and torch) only in that case."""
    from benchmark.registry import external_plugins

    if not external_plugins():
        return None
    from benchmark.config import options_help
    from benchmark.registry import DATASETS, METHODS

    registry = METHODS if kind == "method" else DATASETS
    if name not in registry:
        return None
    cls = registry.get(name)
    return {"summary": cls.summary, "options": [list(row) for row in options_help(cls.Options)]}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line. ``argv`` (default ``sys.argv[1:]``) only chooses which method's and
    dataset's options ``run --help`` shows."""
    argv = sys.argv[1:] if argv is None else argv
    index = load_index()
    parser = OneLineParser(prog="python -m benchmark", description="Balanced multimodal learning benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser(
        "run", help="train and evaluate one method on one dataset",
        description="Train METHOD on DATASET, select the best validation epoch, evaluate the test split "
                    "once, and write one JSON result record into --out.",
        epilog=_options_text(argv), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--method", help=f"one of: {', '.join(index['methods'])} (required, here or in --config)")
    run.add_argument("--dataset", help=f"one of: {', '.join(index['datasets'])} [synthetic]")
    run.add_argument("--seed", type=int, help="run seed (initialisation and data order) [0]")
    run.add_argument("--epochs", type=int, help="training epochs per phase [20]")
    run.add_argument("--device", help="auto, cpu, cuda, cuda:<i> or mps [auto]")
    run.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                     help="any option below; repeat for several (e.g. --set lr=0.05 --set method.lambda_uni=0.5)")
    run.add_argument("--config", metavar="FILE.toml",
                     help="options from a TOML file, with the keys of --set (lr = 0.05, \"method.lambda_uni\" = "
                          "0.5, or a [method] table); the command line wins over the file")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved configuration (every option, as TOML that --config reads) and "
                          "exit without training")
    run.add_argument("--log", choices=("tensorboard", "mlflow"),
                     help="experiment tracking beside the record (same as --set log=...)")
    run.add_argument("--save-checkpoint", action="store_true", default=None,
                     help="keep the selected model beside the record, for `evaluate` (same as --set save_checkpoint=true)")
    run.add_argument("--out", default="runs", help="folder for the result record; its parent must exist [runs]")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--print-record", action="store_true", help="print the whole record as JSON on stdout")

    run.set_defaults(handler=cmd_run)

    lst = sub.add_parser("list", help="list registered methods, datasets, encoders and fusion heads, or the "
                                      "options of one method or dataset")
    lst.add_argument("kind", nargs="?", metavar="KIND|NAME",
                     help=f"{', '.join(LIST_KINDS)}, or a method or dataset name (its options) [all kinds]")
    lst.set_defaults(handler=cmd_list)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _check_file_options(path: str, items: dict[str, Any], method: str, dataset: str) -> None:
    """The options that come from the config file alone, checked on their own (with the run's
    method and dataset), so that a bad key or value there is reported against the file."""
    from benchmark.data import resolve_dataset_options
    from benchmark.method import resolve_method_options
    from benchmark.registry import ENCODERS

    try:
        probe = build_config({**items, "method": method, "dataset": dataset})
        resolve_method_options(method, probe.method_options)
        resolve_dataset_options(dataset, probe.dataset_options)
        for name in probe.encoder.values():
            ENCODERS.get(name)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


def run_config(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any]]:
    """The run's configuration (defaults < the --config file < --set < the named flags), and the
    options that came from the file alone."""
    from benchmark.registry import DATASETS, METHODS

    given: dict[str, Any] = parse_assignments(args.assignments)
    for name in ("method", "dataset", "seed", "epochs", "device", "log", "save_checkpoint"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    from_file = read_config_file(args.config) if args.config else {}
    merged = {**from_file, **given}
    if "method" not in merged:
        raise UsageError("run needs a method: --method NAME (or method = \"NAME\" in the --config file); "
                         "`python -m benchmark list methods` lists them")
    file_only = {k: v for k, v in from_file.items() if k not in given}
    if file_only:
        for key, registry in (("method", METHODS), ("dataset", DATASETS)):
            try:
                registry.get(str(merged.get(key, getattr(RunConfig, key))))
            except UsageError as exc:
                raise UsageError(f"{args.config}: {exc}" if key in file_only else str(exc)) from None
        _check_file_options(args.config, file_only, str(merged["method"]),
                            str(merged.get("dataset", RunConfig.dataset)))
    return build_config(merged), file_only


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark.runner import check_output_dir, prepare, run_and_record

    cfg, file_only = run_config(args)
    try:
        run = prepare(cfg)  # every name and value checked before anything is written
    except UsageError as exc:  # an encoder for a modality the dataset lacks, set in the file
        if any(str(exc).startswith(f"{k}:") for k in file_only if k.startswith("encoder.")):
            raise UsageError(f"{args.config}: {exc}") from None
        raise
    if args.print_config:
        from benchmark.config import flat_options

        print(to_toml(flat_options(run.resolved), header=f"resolved configuration of {cfg.method} on "
                                                         f"{cfg.dataset} (python -m benchmark run --config FILE)"))
        return 0
    created = not Path(args.out).expanduser().exists()
    out = check_output_dir(args.out)  # created and test-written before training starts
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        path, record = run_and_record(run, out, log=log)
    except DivergedError as exc:
        print(f"error: run diverged: {exc}", file=sys.stderr)
        return 3
    except UsageError:  # refused while building (a bad weights file): leave no empty folder behind
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    m = record["metrics"]
    if args.print_record:
        print(json.dumps(record, indent=1, default=str))
    else:
        probes = ", ".join(f"{k} {v:.4f}" for k, v in m["probe_accuracy"].items())
        print(f"{cfg.method} on {cfg.dataset} seed {cfg.seed}: test accuracy {m['accuracy']:.4f}, "
              f"macro-F1 {m['macro_f1']:.4f}, probe [{probes}], {m['wall_seconds']:.1f}s → {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from benchmark.registry import DATASETS, METHODS, list_datasets, list_encoders, list_fusions, list_methods

    if args.kind and args.kind not in LIST_KINDS:
        name, shown = args.kind, False
        for kind, registry in (("method", METHODS), ("dataset", DATASETS)):
            if name in registry:
                entry = registry.get(name)
                print(f"{kind} {name}: {entry.summary}")
                print("\n".join(render_options(kind, name, options_help(entry.Options))))
                shown = True
        if not shown:
            raise UsageError(f"list takes {', '.join(LIST_KINDS)} or a method or dataset name, got {name!r}; "
                             f"methods: {', '.join(list_methods())}; datasets: {', '.join(list_datasets())}")
        return 0
    kinds = [args.kind] if args.kind else list(LIST_KINDS)
    for kind in kinds:
        if kind == "methods":
            print("methods:")
            for name in list_methods():
                print(f"  {name:<12} {METHODS.get(name).summary}")
        elif kind == "datasets":
            print("datasets:")
            for name in list_datasets():
                print(f"  {name:<12} {DATASETS.get(name).summary}")
        elif kind == "encoders":
            print("encoders: " + ", ".join(list_encoders()))
        else:
            print("fusion heads: " + ", ".join(list_fusions()))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that every ``finally`` (temporary files, claims,
    worker processes) runs before it ends."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        return args.handler(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DivergedError as exc:
        print(f"error: run diverged: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # a filesystem failure not caught nearer: still one line
        from benchmark.files import os_error_line

        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except Terminated:
        print("error: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


__all__ = ["OneLineParser", "build_parser", "main"]
