"""Reports from the records alone: one row per configuration, statistics (CIs, Holm), formats,
published figures, README section, figures, where a report writes."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchmark.cli import main
from benchmark.report import (
    README_BEGIN,
    README_END,
    REPO,
    dataset_table,
    load_frame,
    paired_gap,
    write_report,
)
from benchmark.report_stats import holm, t_interval
from benchmark.store import Store

ACC = {"joint": [0.60, 0.62, 0.64], "ensemble": [0.65, 0.66, 0.70], "udi": [0.70, 0.71, 0.75]}
UDI_DEFAULTS = {"method.anchor": "auto", "method.controller": "dynamic", "method.lambda_con": 0.5,
                "method.lambda_com": 0.5}


def make_record(dataset, method, label, seed, acc, options=None, history=None):
    key = f"{abs(hash((dataset, label, seed))):016x}"[:16]
    return key, {
        "schema": 1, "status": "ok", "key": key, "method": method, "dataset": dataset, "seed": seed,
        "config": {"method": method, "dataset": dataset, "seed": seed, "epochs": 3, "method_options": options or {}},
        "defaults": {"epochs": 20, **(UDI_DEFAULTS if method == "udi" else {})},
        "metrics": {"accuracy": acc, "macro_f1": acc - 0.05, "val_accuracy": acc,
                    "probe_accuracy": {"audio": acc - 0.1, "visual": acc - 0.3},
                    "unimodal_accuracy": {}, "wall_seconds": 2.0},
        "history": history or [{"stage": method, "epoch": e, "val_accuracy": acc} for e in range(3)],
        "sweep": {"label": label},
    }


def fill_store(root, dataset="crema-d"):
    store = Store(root)
    for label, accs in ACC.items():
        method = label.split()[0]
        for seed, acc in enumerate(accs):
            opts = {"anchor": "auto", "controller": "dynamic", "lambda_con": 0.5, "lambda_com": 0.5} if method == "udi" else {}
            hist = None
            if method == "joint":  # a curve still rising at the end of its budget
                hist = [{"stage": "joint", "epoch": e, "val_accuracy": acc * (e + 1) / 3} for e in range(3)]
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
    assert table.loc["ensemble", "delta"] == pytest.approx(5.0)
    assert table.loc["ensemble", "probe_gap"] == pytest.approx(20.0)
    assert table.loc["udi", "runs"] == 3
    # a row per configuration, labelled by what differs from the method's defaults
    assert {"udi controller=static", "udi controller=static lambda_con=1 lambda_com=0"} <= set(table.index)
    lo, hi = table.loc["joint", ["accuracy_ci_low", "accuracy_ci_high"]]
    half = stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)
    assert (lo, hi) == (pytest.approx(62.0 - half), pytest.approx(62.0 + half))
    family = table["p_value"].to_numpy()
    assert np.allclose(table["p_holm"].to_numpy(), holm(family), equal_nan=True)
    assert (table["p_holm"].dropna() >= table["p_value"].dropna()).all()


def test_report_writes_every_format_published_figures_and_readme(tmp_path):
    store = fill_store(tmp_path / "store")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{README_BEGIN}\nold table\n{README_END}\n\noutro\n")
    out = tmp_path / "reports"
    written = write_report(store.root, out, readme)
    names = {p.name for p in written}
    assert {"crema-d.md", "crema-d.csv", "crema-d.tex", "summary.csv", "README.md", "runs.csv",
            "runs.parquet"} <= names
    for fig in ("accuracy", "probes", "udi-static-vs-dynamic", "udi-weights", "learning-curves"):
        assert {f"crema-d-{fig}.png", f"crema-d-{fig}.pdf"} <= names  # raster and vector
    assert all(p.stat().st_size > 1000 for p in written if p.suffix in (".png", ".pdf"))
    md = (out / "crema-d.md").read_text()
    assert "| joint † | 3 | 62.0 ± 2.0 | [57.0, 67.0] |" in md  # its curve still rises: marked
    assert "| p (paired t) | p (Holm) |" in md and "| 0.013 | 0.039 |" in md  # ensemble: raw and Holm-adjusted
    assert "Published figures beside ours" in md and "62.6 ± 5.8" in md and "76.1 ± 1.6" in md
    csv = pd.read_csv(out / "crema-d.csv").set_index("label")
    assert csv.loc["ensemble", "delta"] == pytest.approx(5.0)
    # four rows tested; the ensemble's p is the second smallest: Holm multiplies it by 4 - 1
    assert csv.loc["ensemble", "p_holm"] == pytest.approx(3 * csv.loc["ensemble", "p_value"], abs=2e-4)
    assert {"accuracy_ci_low", "accuracy_ci_high", "delta_ci_low", "delta_ci_high"} <= set(csv.columns)
    tex = (out / "crema-d.tex").read_text()
    assert r"\begin{tabular}" in tex and r"62.0 $\pm$ 2.0" in tex and "udi controller=static" in tex
    assert r"\caption{" in tex and r"\label{tab:crema-d}" in tex and "[57.0, 67.0]" in tex and "0.039" in tex
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs) == 3 * 3 + 2 * 2 + 1 and set(runs["status"]) == {"ok", "failed"}  # every record
    assert "cfg.epochs" in runs.columns and "method.anchor" in runs.columns
    assert len(pd.read_csv(out / "runs.csv")) == len(runs)
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


def test_holm_and_t_interval_by_hand():
    # Holm: sorted p (0.01, 0.02, 0.04) × (3, 2, 1) = (0.03, 0.04, 0.04), monotone; NaN stays out
    assert np.allclose(holm([0.04, math.nan, 0.01, 0.02]), [0.04, math.nan, 0.03, 0.04], equal_nan=True)
    assert np.allclose(holm([0.5, 0.6]), [1.0, 1.0])
    lo, hi = t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == (pytest.approx(2 - 4.302653 / math.sqrt(3)), pytest.approx(2 + 4.302653 / math.sqrt(3)))
    assert math.isnan(t_interval([1.0])[0])


RUN_TINY = ["--set", "dataset.n_train=96", "--set", "dataset.n_val=32", "--set", "dataset.n_test=32",
            "--set", "batch_size=32", "--set", "probe=false", "--quiet"]


def test_run_out_folder_two_budgets_and_smoke_records(tmp_path, capsys):
    folder = tmp_path / "runs"
    folder.mkdir()
    for epochs in (1, 2):
        for seed in (0, 1):
            assert main(["run", "--method", "joint", "--epochs", str(epochs), "--seed", str(seed),
                         "--out", str(folder), *RUN_TINY]) == 0
    sweep = tmp_path / "tiny.toml"
    sweep.write_text('seeds = [0]\n[settings]\nbatch_size = 32\nprobe = false\n[datasets.synthetic]\n'
                     'settings = { "dataset.n_train" = 96, "dataset.n_val" = 32, "dataset.n_test" = 32 }\n'
                     '[methods.joint]\n')
    smoke_store = tmp_path / "smoke"
    assert main(["sweep", str(sweep), "--smoke", "--smoke-samples", "16", "--store", str(smoke_store),
                 "--no-live", "--jobs", "1"]) == 0
    smoke_files = list((smoke_store / "records").glob("*/*.json"))
    assert smoke_files and all(json.loads(p.read_text())["smoke"] for p in smoke_files)
    full_files = list(folder.glob("*.json"))
    for p in smoke_files:  # smoke records in the same folder as the full ones
        shutil.copy(p, folder / p.name)
    assert len(list(folder.glob("*.json"))) == len(full_files) + len(smoke_files)  # no name taken twice
    assert all(json.loads(p.read_text())["smoke"] is False for p in full_files)
    capsys.readouterr()
    assert main(["report", "--store", str(folder), "--no-figures"]) == 0
    out = tmp_path / "reports"  # beside the folder
    table = pd.read_csv(out / "synthetic.csv")
    assert sorted(table["label"]) == ["joint epochs=1", "joint epochs=2"]
    assert list(table["runs"]) == [2, 2]
    md = (out / "synthetic.md").read_text()
    assert "smoke" not in md and "| joint epochs=1 | 2 |" in md
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 + len(smoke_files) and runs["smoke"].sum() == len(smoke_files)
    assert set(runs.loc[~runs["smoke"], "row"]) == {"joint epochs=1", "joint epochs=2"}
    # asked for, the smoke records are reported on their own
    assert main(["report", "--store", str(folder), "--no-figures", "--smoke", "--out", str(tmp_path / "s")]) == 0
    assert all(label.endswith("[smoke]") for label in pd.read_csv(tmp_path / "s" / "synthetic.csv")["label"])


def _repo_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                          capture_output=True, text=True, timeout=60).stdout


def test_report_outside_the_repository_writes_nothing_inside_it(tmp_path):
    store = fill_store(tmp_path / "store")
    readme = (REPO / "README.md").read_text()
    before = _repo_state()
    assert main(["report", "--store", str(store.root)]) == 0
    assert _repo_state() == before and (REPO / "README.md").read_text() == readme
    written = list((tmp_path / "reports").rglob("*"))
    assert {"crema-d.md", "crema-d-accuracy.png", "crema-d-accuracy.pdf"} <= {p.name for p in written}
