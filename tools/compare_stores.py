"""Check that a store's records reproduce another's bit for bit (e.g. a refactor against the
committed results/): records are matched by key, and for each pair the test accuracy, validation
accuracy, macro-F1, probe and unimodal accuracies, every per-epoch history value (timings left
out), the Shapley values, the noise accuracies, the ρ trace and the method's facts (its paths
left out) must be equal, not close. Compare at the thread count the reference was made with.

    python -m benchmark sweep default --seed 0 --store /tmp/again
    python tools/compare_stores.py /tmp/again results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load(store: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in (json.loads(p.read_text()) for p in sorted(store.glob("records/*/*.json")))
            if r.get("status") == "ok"}


def _timeless(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in history]


def _pathless(value: Any) -> Any:
    """Method facts without file paths and timings (``checkpoint``, ``seconds``, ``*_seconds``:
    G-Blending's estimates and D&R's diagnoses time themselves), which say nothing of what was computed."""
    if isinstance(value, dict):
        return {k: _pathless(v) for k, v in value.items()
                if k not in ("checkpoint", "seconds") and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_pathless(v) for v in value]
    return value


def differences(new: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    a, b = new["metrics"], ref["metrics"]
    da, db = a.get("diagnostics") or {}, b.get("diagnostics") or {}
    checks = {
        "accuracy": a["accuracy"] == b["accuracy"], "val_accuracy": a["val_accuracy"] == b["val_accuracy"],
        "macro_f1": a["macro_f1"] == b["macro_f1"], "probes": a["probe_accuracy"] == b["probe_accuracy"],
        "unimodal": a["unimodal_accuracy"] == b["unimodal_accuracy"],
        "history": _timeless(new["history"]) == _timeless(ref["history"]),
        "shapley": da.get("shapley") == db.get("shapley"),
        "noise": da.get("noise_accuracy") == db.get("noise_accuracy"),
        "rho": [x["rho"] for x in da.get("rho", [])] == [x["rho"] for x in db.get("rho", [])],
        "method_record": _pathless(new.get("method_record")) == _pathless(ref.get("method_record")),
    }
    return [name for name, same in checks.items() if not same]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, help="the store to check")
    parser.add_argument("reference", type=Path, help="the store it should reproduce")
    args = parser.parse_args(argv)
    new, ref = load(args.store), load(args.reference)
    if not new:
        print(f"error: {args.store} holds no ok records", file=sys.stderr)
        return 2
    same = 0
    failed = False
    for key, record in new.items():
        where = f"{record['dataset']} {record.get('sweep', {}).get('label', record['method'])} seed {record['seed']}"
        if key not in ref:
            print(f"missing: {where} (key {key}) has no record in {args.reference}")
            failed = True
            continue
        diff = differences(record, ref[key])
        if diff:
            print(f"differs: {where}: {', '.join(diff)}")
            failed = True
        else:
            same += 1
    print(f"{same} of {len(new)} records identical to {args.reference} (accuracies, probes, per-epoch history, "
          "Shapley values, noise accuracies, rho, method facts)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
