"""Reports from the store alone: statistics, formats, published figures, README section, figures."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from benchmark.cli import main
from benchmark.report import README_BEGIN, README_END, dataset_table, load_frame, paired_gap, write_report
from benchmark.store import Store

ACC = {"joint": [0.60, 0.62, 0.64], "ensemble": [0.65, 0.66, 0.70], "udi anchor=auto": [0.70, 0.71, 0.75]}


def make_record(dataset, method, label, seed, acc, options=None, history=None):
    key = f"{abs(hash((dataset, label, seed))):016x}"[:16]
    return key, {
        "schema": 1, "status": "ok", "key": key, "method": method, "dataset": dataset, "seed": seed,
        "config": {"method_options": options or {}},
        "metrics": {"accuracy": acc, "macro_f1": acc - 0.05, "val_accuracy": acc,
                    "probe_accuracy": {"audio": acc - 0.1, "visual": acc - 0.3},
                    "unimodal_accuracy": {}, "wall_seconds": 2.0},
        "history": history or [{"stage": method, "epoch": e, "val_accuracy": acc * (e + 1) / 3} for e in range(3)],
        "sweep": {"label": label},
    }


def fill_store(root, dataset="crema-d"):
    store = Store(root)
    for label, accs in ACC.items():
        method = label.split()[0]
        for seed, acc in enumerate(accs):
            opts = {"anchor": "auto", "controller": "dynamic"} if method == "udi" else {}
            hist = None
            if method == "udi":
                hist = [{"stage": "udi:follower:visual", "epoch": e, "val_accuracy": 0.5, "lambda_con": 0.3 + 0.1 * e,
                         "lambda_com": 0.7 - 0.1 * e, "udi_follower": "visual"} for e in range(3)]
            key, rec = make_record(dataset, method, label, seed, acc, opts, hist)
            store.write(store.record_path(dataset, method, seed, key), rec)
    for seed, lam in enumerate([(0.5, 0.5), (1.0, 0.0)]):
        opts = {"anchor": "auto", "controller": "static", "lambda_con": lam[0], "lambda_com": lam[1]}
        for s in range(2):
            key, rec = make_record(dataset, "udi", f"udi static {lam}", s, 0.7 + 0.01 * seed, opts)
            store.write(store.record_path(dataset, "udi", s, key), rec)
    failed = {"status": "failed", "key": "f" * 16, "method": "mla", "dataset": dataset, "seed": 0, "error": "x"}
    store.write(store.record_path(dataset, "mla", 0, "f" * 16), failed)
    return store


def test_paired_gap_matches_scipy():
    a = pd.Series([0.65, 0.66, 0.70], index=[0, 1, 2])
    b = pd.Series([0.60, 0.62, 0.64, 0.9], index=[0, 1, 2, 3])  # seed 3 has no pair
    delta, p, n = paired_gap(a, b)
    assert n == 3 and delta == pytest.approx(5.0)
    assert p == pytest.approx(stats.ttest_rel([0.65, 0.66, 0.70], [0.60, 0.62, 0.64]).pvalue)
    assert math.isnan(paired_gap(a.iloc[:1], b)[1])


def test_table_statistics(tmp_path):
    df = load_frame(fill_store(tmp_path))
    assert "mla" not in set(df["method"])  # failed records are not in tables
    table = dataset_table(df).set_index("label")
    assert list(table.index[:2]) == ["joint", "ensemble"]
    assert table.loc["joint", "accuracy_mean"] == pytest.approx(62.0)
    assert table.loc["joint", "accuracy_std"] == pytest.approx(2.0)
    assert table.loc["ensemble", "delta_joint"] == pytest.approx(5.0)
    assert table.loc["ensemble", "probe_gap"] == pytest.approx(20.0)
    assert table.loc["udi anchor=auto", "runs"] == 3


def test_report_writes_every_format_published_figures_and_readme(tmp_path):
    store = fill_store(tmp_path / "store")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{README_BEGIN}\nold table\n{README_END}\n\noutro\n")
    out = tmp_path / "reports"
    written = write_report(store.root, out, readme)
    names = {p.name for p in written}
    assert {"crema-d.md", "crema-d.csv", "crema-d.tex", "summary.csv", "README.md"} <= names
    assert {"crema-d-accuracy.png", "crema-d-probes.png", "crema-d-udi-static-vs-dynamic.png",
            "crema-d-udi-weights.png", "crema-d-learning-curves.png"} <= names
    assert all(p.stat().st_size > 1000 for p in written if p.suffix == ".png")
    md = (out / "crema-d.md").read_text()
    assert "| joint | 3 | 62.0 ± 2.0 |" in md
    assert "Published figures beside ours" in md and "62.6 ± 5.8" in md and "76.1 ± 1.6" in md
    csv = pd.read_csv(out / "crema-d.csv")
    assert csv.set_index("label").loc["ensemble", "delta_joint"] == pytest.approx(5.0)
    tex = (out / "crema-d.tex").read_text()
    assert r"\begin{tabular}" in tex and r"62.0 $\pm$ 2.0" in tex and "udi anchor=auto" in tex
    text = readme.read_text()
    assert text.startswith("intro\n") and text.rstrip().endswith("outro") and "old table" not in text
    assert "| ensemble | 67.0 ± 2.6 (+5.0) |" in text and "| udi | 72.0 ± 2.6 (+10.0) |" in text
    write_report(store.root, out, readme)  # idempotent
    assert readme.read_text() == text


def test_report_command_bad_input(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", "--store", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no successful run records" in capsys.readouterr().err
    fill_store(tmp_path / "s")
    readme = tmp_path / "R.md"
    readme.write_text("no markers")
    assert main(["report", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--readme", str(readme)]) == 2
    assert "markers" in capsys.readouterr().err and readme.read_text() == "no markers"
    assert main(["report", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--readme", "none",
                 "--no-figures"]) == 0
