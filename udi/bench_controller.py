"""The dynamic controller's cost: one follower epoch with the controller computed once per
epoch against the same epoch with static weights, timed in one process.

    python -m udi.bench_controller [--dataset synthetic] [--set key=value ...] [--repeats 15]

The anchor phase runs once (its quality does not change the cost of a follower epoch). Then,
for each repeat, a fresh follower (same initial weights, same data order, fresh CLUB estimator)
trains one epoch with static weights and one with the dynamic controller, in alternating order
so that drifts in machine load fall on both; warm-up repeats are discarded. The time is the
trainer's training time of the epoch (validation excluded). Printed: the median epoch time of
each mode, the median of the per-repeat ratios dynamic / static, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import torch

from benchmark.config import build_config, parse_assignments
from benchmark.errors import UsageError
from benchmark.method import build_method
from benchmark.runner import prepare
from benchmark.trainer import Trainer
from udi.method import UDI, FollowerPhase


def time_epoch(method: UDI, trainer: Trainer, modality: str, mode: str) -> tuple[float, float]:
    """Training seconds of one fresh follower epoch in ``mode``, and the controller's share."""
    phase = FollowerPhase(method, trainer, modality, controller=mode)
    result = trainer.fit(phase.stage(epochs=1, patience=0))
    return result.train_seconds, phase.controller_seconds


def measure(assignments: dict[str, Any], repeats: int, warmup: int, log: Any = None) -> dict[str, Any]:
    settings = {"dataset": "synthetic", "probe": "false", **assignments, "method": "udi",
                "epochs": assignments.get("epochs", 1), "method.controller_every": "epoch"}
    run = prepare(build_config(settings))
    trainer = Trainer(run.cfg, run.data, run.device, log=log)
    method = run.method
    build_method(method)
    method.model.to(run.device)
    method.anchor_phase(trainer)
    modality = method.followers[0]
    times: dict[str, list[float]] = {"static": [], "dynamic": []}
    controller: list[float] = []
    for r in range(warmup + repeats):
        order = ("static", "dynamic") if r % 2 == 0 else ("dynamic", "static")
        for mode in order:
            seconds, ctrl = time_epoch(method, trainer, modality, mode)
            if r >= warmup:
                times[mode].append(seconds)
                if mode == "dynamic":
                    controller.append(ctrl)
    ratios = [d / s for d, s in zip(times["dynamic"], times["static"])]
    steps = -(-len(run.data.splits["train"]) // run.cfg.batch_size)
    return {
        "dataset": run.cfg.dataset, "follower": modality, "anchor": method.anchor, "device": str(run.device),
        "threads": torch.get_num_threads(), "steps_per_epoch": steps, "repeats": repeats, "warmup": warmup,
        "static_median_s": statistics.median(times["static"]),
        "dynamic_median_s": statistics.median(times["dynamic"]),
        "controller_median_s": statistics.median(controller),
        "ratio_of_medians": statistics.median(times["dynamic"]) / statistics.median(times["static"]),
        "median_paired_ratio": statistics.median(ratios),
        "times": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udi.bench_controller", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="run options, as for `python -m benchmark run` (e.g. dataset.n_train=2000)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats of each mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--limit", type=float, default=1.10, help="the ratio the controller must stay under")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        print("error: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        assignments = dict(parse_assignments(args.assignments), dataset=args.dataset)
        res = measure(assignments, args.repeats, args.warmup)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"dataset {res['dataset']}, follower {res['follower']} (anchor {res['anchor']}), device {res['device']}, "
          f"{res['threads']} threads, {res['steps_per_epoch']} steps per epoch, "
          f"{res['repeats']} repeats after {res['warmup']} warm-up, modes interleaved")
    print(f"static epoch   median {res['static_median_s'] * 1e3:.1f} ms")
    print(f"dynamic epoch  median {res['dynamic_median_s'] * 1e3:.1f} ms "
          f"(controller computation {res['controller_median_s'] * 1e3:.1f} ms)")
    print(f"ratio dynamic/static: median of paired ratios {res['median_paired_ratio']:.3f}, "
          f"ratio of medians {res['ratio_of_medians']:.3f} (limit {args.limit:.2f})")
    return 0 if res["median_paired_ratio"] <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
