"""``python -m benchmark bench``: every registered method once on the synthetic dataset, a quick
end-to-end check of the whole suite (a sweep is the full benchmark). The records go into --out
like those of ``run`` (default ``runs/``)."""

from __future__ import annotations

import argparse
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="quick end-to-end run of every method on the synthetic dataset",
                       description="Train and evaluate every registered method once on the synthetic dataset "
                                   "(one line each: test accuracy, macro-F1, probes, time), writing one record "
                                   "per method into --out.")
    p.add_argument("--epochs", type=int, default=10, help="epochs per phase [10]")
    p.add_argument("--seed", type=int, default=0, help="run seed [0]")
    p.add_argument("--out", default="runs", help="folder for the result records; its parent must exist [runs]")
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmark.config import build_config
    from benchmark.data import create_dataset
    from benchmark.registry import list_methods
    from benchmark.runner import check_output_dir, prepare, run_and_record

    methods = list_methods()
    configs = [build_config({"method": method, "dataset": "synthetic", "epochs": args.epochs, "seed": args.seed})
               for method in methods]  # every value checked before anything is built or written
    data = create_dataset("synthetic", {})  # loaded once, shared by the runs (as in a sweep)
    runs = [prepare(cfg, data) for cfg in configs]
    out = check_output_dir(args.out)
    start = time.perf_counter()
    for method, run in zip(methods, runs):
        _, record = run_and_record(run, out)
        m = record["metrics"]
        probes = " ".join(f"{k}={v:.3f}" for k, v in m["probe_accuracy"].items())
        print(f"{method:<12} acc {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
              f"probe {probes}  {m['wall_seconds']:.1f}s", flush=True)
    print(f"{len(methods)} methods in {time.perf_counter() - start:.1f}s; records in {out}", file=sys.stderr)
    return 0
