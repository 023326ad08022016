"""The throughput benchmark's bookkeeping: ratios to the floor and to the reference method, bounds
(declared by each method), the table."""

from __future__ import annotations

import torch

from benchmark.data import create_dataset
from benchmark.perf import SINGLE, Setting, check_bounds, format_table, measure


def test_measure_gives_ratios_to_the_floor_and_to_joint() -> None:
    data = create_dataset("synthetic", {"n_train": 256, "n_val": 32, "n_test": 32})
    rows = measure(Setting("tiny", data, 64), torch.device("cpu"), ["joint", "udi"], repeats=1, epochs=2)
    by = {row["method"]: row for row in rows}
    assert {"floor", "joint", SINGLE, "udi (dynamic)", "udi (static)"} <= set(by)
    assert by["floor"]["throughput_vs_floor"] == 1.0 and by["joint"]["step_vs_reference"] == 1.0
    for row in rows:
        assert row["samples_per_s"] > 0 and row["step_ms"] > 0
    udi = by["udi (dynamic)"]
    assert udi["stage"].startswith("udi:follower")  # the follower's stage is timed, not the anchor's
    assert udi["step_vs_single"] == udi["step_ms"] / by[SINGLE]["step_ms"]
    table = format_table("tiny", rows, "cpu")
    assert table.count("\n| ") == len(rows) + 1  # header and one line per row


def test_bounds_are_judged_in_the_right_direction() -> None:
    rows = [
        {"method": "joint", "name": "joint", "throughput_vs_floor": 0.9, "step_vs_reference": 1.0},
        {"method": "ogm_ge", "name": "ogm_ge", "step_vs_reference": 1.1},
        {"method": "mcr", "name": "mcr", "step_vs_reference": 1.6},
        {"method": "udi (static)", "name": "udi", "step_vs_single": 1.4},
    ]
    verdicts = check_bounds(rows)
    assert any(v.startswith("joint throughput") and v.endswith("MISSED") for v in verdicts)
    assert any(v.startswith("ogm_ge") and v.endswith("met") for v in verdicts)
    assert any(v.startswith("mcr") and v.endswith("MISSED") for v in verdicts)
    assert any(v.startswith("udi (static)") and v.endswith("met") for v in verdicts)


def test_the_whole_run_per_epoch_counts_work_between_steps() -> None:
    """G-Blending trains copies of its model at the start of its first super-epoch (outside the
    timed training epochs): its step is about joint's, its whole run per epoch is not."""
    data = create_dataset("synthetic", {"n_train": 256, "n_val": 32, "n_test": 32})
    rows = measure(Setting("tiny", data, 64), torch.device("cpu"), ["joint", "gblending"], repeats=1, epochs=2)
    by = {row["method"]: row for row in rows}
    assert by["joint"]["run_vs_reference"] == 1.0 and "run_epoch_s" not in by["floor"]
    gb = by["gblending"]
    assert gb["run_vs_reference"] == gb["run_epoch_s"] / by["joint"]["run_epoch_s"]
    assert gb["run_vs_reference"] > 1.5 * gb["step_vs_reference"]  # two copies trained 2 epochs each
    assert "| run s / epoch | run × joint |" in format_table("tiny", rows, "cpu")
