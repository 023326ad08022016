"""The diagnostics part of the report: tables and figures from records alone."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmark.config import build_config
from benchmark.report import write_report
from benchmark.report_diagnostics import diagnostics_frame, diagnostics_section, summary_table
from benchmark.runner import execute, prepare
from benchmark.store import Store


def fake_diagnostics(phi_a: float, phi_b: float, absent: str = "zeros") -> dict:
    """A diagnostics block (as benchmark.diagnostics writes it) for two modalities a, b, 4 classes."""
    chance = 0.25
    v_ab = chance + phi_a + phi_b
    v_a, v_b = chance + phi_a, chance + phi_b  # additive game: φ are the single gains
    return {
        "absent": absent, "modalities": ["a", "b"], "chance": chance,
        "subset_accuracy": {"a+b": v_ab, "a": v_a, "b": v_b},
        "shapley": {"a": phi_a, "b": phi_b},
        "imbalance_degree": abs(phi_a - phi_b) / (phi_a + phi_b),
        "absent_accuracy": {"a": v_b, "b": v_a},
        "utilisation": {"a": (v_ab - v_b) / v_ab, "b": (v_ab - v_a) / v_ab},
        "d_util": (phi_a - phi_b) / v_ab,
        "noise_levels": [0.25, 0.5, 1.0, 2.0],
        "noise_accuracy": {"a": [v_ab, v_ab - 0.1, v_ab - 0.2, v_b], "b": [v_ab] * 4},
        "noise_auc": {"a": 0.6, "b": v_ab},
        "input_std": {"a": 1.0, "b": 1.0},
        "error_matrix": {"source": "readout", "rows": "a", "columns": "b",
                         "fused_right": [[0, 10], [50, 20]], "fused_wrong": [[15, 0], [5, 0]]},
        "rho": [{"stage": "x", "epoch": e, "rho": {"a": 1.5 + e, "b": 1 / (1.5 + e)}} for e in range(3)],
        "rho_samples": 256, "rho_seconds": 0.1, "seconds": 0.5,
    }


def fill(root) -> Store:
    store = Store(root)
    for method, label, (pa, pb), absent in [("joint", "joint", (0.5, 0.1), "zeros"),
                                            ("udi", "udi anchor=auto", (0.3, 0.3), "head"),
                                            ("ensemble", "ensemble", (0.4, 0.2), "head")]:
        for seed in (0, 1):
            key = f"{abs(hash((label, seed))):016x}"[:16]
            rec = {"schema": 1, "status": "ok", "key": key, "method": method, "dataset": "toy", "seed": seed,
                   "config": {"method_options": {}}, "sweep": {"label": label},
                   "metrics": {"accuracy": 0.25 + pa + pb, "macro_f1": 0.5, "val_accuracy": 0.5,
                               "probe_accuracy": {"a": 0.6, "b": 0.4}, "unimodal_accuracy": {},
                               "wall_seconds": 1.0, "diagnostics": fake_diagnostics(pa + 0.01 * seed, pb, absent)},
                   "history": [{"stage": method, "epoch": 0, "val_accuracy": 0.5}]}
            store.write(store.record_path("toy", method, seed, key), rec)
    return store


def test_summary_table_means_and_order(tmp_path):
    store = fill(tmp_path)
    frame = diagnostics_frame(store.records("ok"), "toy")
    table = summary_table(frame, order=("joint", "ensemble", "udi")).set_index("label")
    assert list(table.index) == ["joint", "ensemble", "udi anchor=auto"]
    assert table.loc["joint", "phi_a"] == pytest.approx(50.5)  # points, mean over seeds 0.50 and 0.51
    assert table.loc["udi anchor=auto", "imbalance"] == pytest.approx((0.0 + 0.01 / 0.61) / 2)  # seeds 0 and 1
    assert table.loc["ensemble", "absent"] == "head"
    assert diagnostics_frame(store.records("ok"), "other").empty


def test_section_renders_tables_and_figures(tmp_path):
    store = fill(tmp_path / "store")
    out = tmp_path / "reports"
    (out / "figures").mkdir(parents=True)
    md, paths = diagnostics_section(store.records("ok"), "toy", out, order=("joint", "ensemble", "udi"))
    names = {p.name for p in paths}
    assert {"toy-diagnostics.csv", "toy-shapley.png", "toy-noise-robustness.png", "toy-rho.png"} <= names
    assert all(p.stat().st_size > 1000 for p in paths if p.suffix == ".png")
    assert "| joint | 2 | zeros | 50.5 ± 0.7 | 10.0 ± 0.0 | 0.67 ± 0.00 | 59.1 | 11.7 | 47.4 ± 0.4 |" in md
    assert "u(a\\|rest) %" in md and "fused right: only a" in md and "| ensemble | readout | 20.0 | 50.0 | 10.0 | 0.0 | 0.0 | 5.0 | 0.0 | 15.0 |" in md
    csv = pd.read_csv(out / "toy-diagnostics.csv")
    assert set(csv["label"]) == {"joint", "ensemble", "udi anchor=auto"}
    assert diagnostics_section([], "toy", out) == ("", [])


def test_report_shows_diagnostics_of_real_runs(tmp_path, tiny):
    """Records written by the runner go through the whole report."""
    store = Store(tmp_path / "store")
    for method in ("joint", "ensemble", "udi"):
        run = prepare(build_config(dict(tiny, method=method)))
        record = execute(run, cache_dir=str(tmp_path / "cache"))
        store.write(store.record_path(record["dataset"], method, 0, record["key"]), record)
    out = tmp_path / "reports"
    written = write_report(store.root, out, readme=None)
    md = (out / "synthetic.md").read_text()
    assert "### Imbalance diagnostics" in md and "imbalance degree" in md and "noise AUC m0 %" in md
    names = {p.name for p in written}
    assert {"synthetic-shapley.png", "synthetic-noise-robustness.png", "synthetic-rho.png",
            "synthetic-diagnostics.csv"} <= names
    assert "![synthetic-shapley](figures/synthetic-shapley.png)" in md


def test_cost_section_gives_median_and_largest_share_per_method():
    from benchmark.report_diagnostics import cost_section

    def rec(method, seconds, wall):
        return {"method": method, "metrics": {"wall_seconds": wall, "diagnostics": {"seconds": seconds}}}

    text = cost_section([rec("joint", 1.0, 10.0), rec("joint", 3.0, 10.0), rec("joint", 2.0, 40.0),
                         rec("ensemble", 0.5, 2.0), {"method": "mla", "metrics": {"wall_seconds": 5.0}}])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "method" not in line}
    assert rows["joint"] == ["3", "10.0", "30.0", "3.00 / 10.00"]  # shares 10%, 30%, 5%: median 10%
    assert rows["ensemble"] == ["1", "25.0", "25.0", "0.50 / 2.00"]
    assert "mla" not in rows  # no diagnostics in its record
    assert "6.5 s of diagnostics on 62 s of runs (10.5%)" in text
    assert cost_section([{"method": "joint", "metrics": {}}]) == ""
