"""``python -m benchmark data list|prepare``: what datasets exist and whether they are here, and
turning a release on disk (or a generated set) into its prepared cache. The command line itself
is registered in benchmark.commands (importing this package imports torch)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from benchmark.config import parse_assignments
from benchmark.errors import UsageError
from benchmark.registry import DATASETS, list_datasets


def builder_for(name: str, overrides: dict[str, Any]) -> Any:
    from benchmark.data.builder import resolve_dataset_options

    return DATASETS.get(name)(resolve_dataset_options(name, overrides))


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name in list_datasets():
        try:
            facts = builder_for(name, {}).describe()
        except UsageError as exc:
            facts = {"modalities": [], "classes": "?", "size": "?", "present": False, "where": str(exc)}
        present = "yes" if facts.get("present") else "no"
        if facts.get("present") and "prepared" in facts:
            present += ", prepared" if facts["prepared"] else ", not prepared"
        rows.append((name, "+".join(facts["modalities"]), str(facts["classes"]), str(facts["size"]), present,
                     facts.get("where", "built offline")))
    header = ("dataset", "modalities", "classes", "size", "present", "where")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5])
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for key, value in parse_assignments(args.assignments).items():
        overrides[key.removeprefix("dataset.")] = value
    fields = {f.name for f in dataclasses.fields(DATASETS.get(args.name).Options)}
    for option, value in (("root", args.root), ("cache_dir", args.cache_dir)):
        if value is None:
            continue
        if option not in fields:
            raise UsageError(f"{args.name} takes no --{option.replace('_', '-')}"
                             + ("; it is built offline" if option == "root" else ""))
        overrides[option] = value
    builder = builder_for(args.name, overrides)
    start = time.perf_counter()
    summary = builder.prepare()
    print(f"{summary} ({time.perf_counter() - start:.1f}s)")
    sys.stdout.flush()
    return 0
