"""tools/compare_stores.py: equal records pass; any changed number, a missing record, fail."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _record(key: str) -> dict:
    return {"key": key, "status": "ok", "dataset": "synthetic", "method": "joint", "seed": 0,
            "sweep": {"label": "joint"}, "method_record": {"unimodal": {"m0": {"checkpoint": "/a/x.pt", "val": 1}},
                                                           "estimates": [{"weights": [0.5, 0.5], "seconds": 1.0}],
                                                           "copy_seconds": 1.0},
            "history": [{"epoch": 0, "val_accuracy": 0.5, "epoch_seconds": 1.0}],
            "metrics": {"accuracy": 0.75, "val_accuracy": 0.5, "macro_f1": 0.7, "probe_accuracy": {"m0": 0.6},
                        "unimodal_accuracy": {}, "diagnostics": {"shapley": {"m0": 0.2}, "noise_accuracy": {},
                                                                 "rho": [{"rho": {"m0": 1.0}}]}}}


def _store(root: Path, records: list[dict]) -> Path:
    for r in records:
        path = root / "records" / r["dataset"] / f"{r['method']}-{r['dataset']}-seed0-{r['key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    return root


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "compare_stores.py"), str(a), str(b)],
                          capture_output=True, text=True, timeout=60)


def test_identical_records_pass_and_any_change_fails(tmp_path):
    ref = _store(tmp_path / "ref", [_record("k1")])
    # timings and checkpoint paths may differ: they say nothing about what was computed
    moved = _record("k1")
    moved["history"][0]["epoch_seconds"] = 9.0
    moved["method_record"]["unimodal"]["m0"]["checkpoint"] = "/b/y.pt"
    moved["method_record"]["estimates"][0]["seconds"] = 3.0
    moved["method_record"]["copy_seconds"] = 3.0
    done = _compare(_store(tmp_path / "same", [moved]), ref)
    assert done.returncode == 0 and "1 of 1 records identical" in done.stdout
    for path, value in ((("metrics", "accuracy"), 0.7500001), (("history", 0, "val_accuracy"), 0.51),
                        (("metrics", "diagnostics", "shapley", "m0"), 0.21),
                        (("method_record", "estimates", 0, "weights"), [0.4, 0.6])):
        changed = copy.deepcopy(_record("k1"))
        target = changed
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        done = _compare(_store(tmp_path / f"changed-{path[-1]}", [changed]), ref)
        assert done.returncode == 1 and "differs: synthetic joint seed 0" in done.stdout, path
    done = _compare(_store(tmp_path / "other", [_record("k2")]), ref)
    assert done.returncode == 1 and "missing" in done.stdout
