"""``python -m benchmark bench``: every registered method once on the synthetic imbalanced
preset, a quick end-to-end check of the whole suite (the sweep runner is the full benchmark)."""

from __future__ import annotations

import argparse
import sys
import time

from benchmark.config import build_config
from benchmark.registry import list_methods


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="quick end-to-end run of every method on the synthetic dataset")
    p.add_argument("--epochs", type=int, default=10, help="epochs per phase [10]")
    p.add_argument("--seed", type=int, default=0, help="run seed [0]")
    p.add_argument("--out", default="runs/bench", help="folder for the result records [runs/bench]")
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmark.runner import check_output_dir, prepare, run_and_record

    out = check_output_dir(args.out)
    rows = []
    start = time.perf_counter()
    for method in list_methods():
        cfg = build_config({"method": method, "dataset": "synthetic", "epochs": args.epochs,
                            "seed": args.seed})
        _, record = run_and_record(prepare(cfg), out)
        m = record["metrics"]
        probes = " ".join(f"{k}={v:.3f}" for k, v in m["probe_accuracy"].items())
        rows.append(f"{method:<12} acc {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
                    f"probe {probes}  {m['wall_seconds']:.1f}s")
        print(rows[-1], flush=True)
    print(f"{len(rows)} methods in {time.perf_counter() - start:.1f}s; records in {out}", file=sys.stderr)
    return 0
