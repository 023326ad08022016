"""Command line: ``python -m benchmark run|list ...``. Bad input gives one line on stderr and
exit status 2; a diverging run gives exit status 3 and a record marked failed."""

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

from benchmark.config import RunConfig, build_config, options_help, parse_assignments
from benchmark.errors import DivergedError, UsageError
from benchmark.registry import DATASETS, METHODS, list_datasets, list_encoders, list_fusions, list_methods

# Modules that add sub-commands: each has ``register(subparsers)``, which adds its parser(s)
# with ``set_defaults(handler=function(args) -> exit status)``.
SUBCOMMAND_MODULES: tuple[str, ...] = ("benchmark.quick", "benchmark.perf", "benchmark.commands",
                                       "benchmark.data.commands", "benchmark.evaluate_cmd")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _options_text() -> str:
    lines = ["shared options (--set key=value):"]
    for name, default, help_text in options_help(RunConfig):
        if name not in ("method", "dataset", "method_options", "dataset_options"):
            lines.append(f"  {name:<16} {help_text} [default {default}]")
    for title, registry, names in (("method", METHODS, list_methods()), ("dataset", DATASETS, list_datasets())):
        for entry in names:
            rows = options_help(registry.get(entry).Options)
            if rows:
                lines.append(f"{title} {entry} options (--set {title}.<name>=value):")
                lines += [f"  {n:<16} {h} [default {d}]" for n, d, h in rows]
    lines.append(f"encoders (--set encoder.<modality>=name): {', '.join(list_encoders())}")
    lines.append(f"fusion heads (--set fusion=name): {', '.join(list_fusions())}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m benchmark", description="Balanced multimodal learning benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser(
        "run", help="train and evaluate one method on one dataset",
        description="Train METHOD on DATASET, select the best validation epoch, evaluate the test split "
                    "once, and write one JSON result record into --out.",
        epilog=_options_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--method", required=True, help=f"one of: {', '.join(list_methods())}")
    run.add_argument("--dataset", default="synthetic", help=f"one of: {', '.join(list_datasets())} [synthetic]")
    run.add_argument("--seed", type=int, help="run seed (initialisation and data order) [0]")
    run.add_argument("--epochs", type=int, help="training epochs per phase [20]")
    run.add_argument("--device", help="auto, cpu, cuda, cuda:<i> or mps [auto]")
    run.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                     help="any option below; repeat for several (e.g. --set lr=0.05 --set method.lambda_uni=0.5)")
    run.add_argument("--out", default="runs", help="folder for the result record; its parent must exist [runs]")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--print-record", action="store_true", help="print the whole record as JSON on stdout")

    run.set_defaults(handler=cmd_run)

    lst = sub.add_parser("list", help="list registered methods, datasets, encoders and fusion heads")
    lst.add_argument("kind", nargs="?", choices=("methods", "datasets", "encoders", "fusions"))
    lst.set_defaults(handler=cmd_list)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark.runner import check_output_dir, prepare, run_and_record

    assignments: dict[str, Any] = parse_assignments(args.assignments)
    assignments["method"] = args.method
    assignments["dataset"] = args.dataset
    for name in ("seed", "epochs", "device"):
        if getattr(args, name) is not None:
            assignments[name] = getattr(args, name)
    cfg = build_config(assignments)
    run = prepare(cfg)  # every name and value checked before anything is written
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
    from benchmark.method import resolve_method_options  # noqa: F401  (loads the registries)

    kinds = [args.kind] if args.kind else ["methods", "datasets", "encoders", "fusions"]
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
        parser = build_parser()
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
