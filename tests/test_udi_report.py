"""UDI's report section: the paper's Tables 2-4 laid out from records, the Decoupled row, the
published numbers beside ours, the controller's summary; and the sweeps that feed it."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from benchmark.report import load_frame, write_report
from benchmark.store import Store
from benchmark.sweep import load_sweep
from udi.method import UDIOptions
from udi.report import DECOUPLED, REFERENCE, udi_cell, udi_section


def _record(dataset: str, method: str, seed: int, acc: float, options: dict, followers: list[str],
            modalities: list[str], lam_com: float = 0.0, ip_com: float = -1.0) -> dict:
    history = [{"stage": f"unimodal:{m}", "epoch": 0, "val_accuracy": 0.5} for m in modalities]
    for f in followers:
        history += [{"stage": f"udi:follower:{f}", "epoch": e, "val_accuracy": 0.5, "udi_follower": f,
                     "lambda_con": 1.0 - lam_com, "lambda_com": lam_com, "ip_con": 0.2, "ip_com": ip_com,
                     "train_com": 5.0 + e, "train_con": 0.1} for e in range(3)]
    key = f"{abs(hash((dataset, method, seed, str(sorted(options.items()))))):016x}"[:16]
    return {"schema": 1, "status": "ok", "key": key, "method": method, "dataset": dataset, "seed": seed,
            "config": {"method_options": options},
            "metrics": {"accuracy": acc, "macro_f1": acc - 0.02, "val_accuracy": acc,
                        "unimodal_accuracy": {m: 0.5 for m in modalities}, "wall_seconds": 1.0},
            "history": history, "sweep": {"label": method}}


def _fill(root, dataset: str, modalities: list[str], guidance: list[str]) -> Store:
    store = Store(root)
    anchor, followers = modalities[0], modalities[1:]
    cells = {  # options → accuracy offset (points)
        ("dynamic", 0.5, 0.5, "auto"): 6, ("static", 1.0, 0.0, "auto"): 4, ("static", 0.0, 1.0, "auto"): 3,
        ("static", 0.0, 0.0, "auto"): 0, **{("dynamic", 0.5, 0.5, m): 1 for m in modalities},
    }
    for seed in range(3):
        rec = _record(dataset, "joint", seed, 0.50 + 0.01 * seed, {}, [], modalities)
        store.write(store.record_path(dataset, "joint", seed, rec["key"]), rec)
        for g in guidance:
            for (controller, lc, lm, a), offset in cells.items():
                options = {"anchor": a, "controller": controller, "lambda_con": lc, "lambda_com": lm,
                           "guidance": g, **REFERENCE}
                used = anchor if a == "auto" else a
                rec = _record(dataset, "udi", seed, 0.60 + (offset + 0.1 * seed + (1 if g == "anchor" else 0)) / 100,
                              options, [m for m in modalities if m != used], modalities)
                store.write(store.record_path(dataset, "udi", seed, rec["key"]), rec)
    # a UDI run with another option is no cell of the tables
    odd = _record(dataset, "udi", 0, 0.99, {"controller": "dynamic", "controller_every": "batch"}, followers, modalities)
    store.write(store.record_path(dataset, "udi", 0, odd["key"]), odd)
    return store


def _table(md: str, caption: str) -> list[str]:
    lines = md.split(f"**{caption}")[1].split("\n\n")[1].splitlines()
    return lines[2:]


def test_tables_2_to_4_with_the_decoupled_row_and_the_papers_numbers(tmp_path) -> None:
    frame = load_frame(_fill(tmp_path / "s", "crema-d", ["visual", "audio"], ["progressive"]))
    md, figures = udi_section(frame, tmp_path)
    assert "### crema-d" in md and "guidance" not in md.split("### crema-d")[1].split("\n")[0]
    t2 = _table(md, "Table 2")
    assert [row.split("|")[3].strip() for row in t2] == ["joint (the paper's Sum)", DECOUPLED, "UDI (dynamic controller)"]
    # joint 51 ± 1, Decoupled 60.1 ± 0.1, UDI 66.1 ± 0.1; the paper's 66.40, 78.90, 82.80 beside them
    assert "51.00 ± 1.00" in t2[0] and "66.40" in t2[0]
    assert "60.10 ± 0.10" in t2[1] and "78.90" in t2[1] and "+0.00" in t2[1]
    assert "66.10 ± 0.10" in t2[2] and "82.80" in t2[2] and "+6.00" in t2[2]
    t3 = _table(md, "Table 3")
    assert [row.split("|")[1].strip() for row in t3] == ["static (0, 1)", "static (1, 0)", DECOUPLED,
                                                          "UDI (dynamic controller)"]
    assert "81.59" in t3[0] and "82.39" in t3[1] and "+4.00" in t3[1]
    t4 = _table(md, "Table 4")
    assert t4[0].split("|")[1].strip() == "auto (picked visual in 3 of 3)"
    assert any("anchor = visual" in row and "anchor visual: 82.80" in row for row in t4)
    assert "99.00" not in md  # the run with a non-default option is in no cell
    ctrl = _table(md, "The dynamic controller")
    assert ctrl and all("100%" in row.split("|")[3] for row in ctrl)  # λ_com = 0 in every epoch
    assert figures and all(p.exists() for p in figures)


def test_three_modalities_get_one_set_of_tables_per_guidance_mode(tmp_path) -> None:
    frame = load_frame(_fill(tmp_path / "s", "synthetic-3m", ["m0", "m1", "m2"], ["progressive", "anchor"]))
    md, _ = udi_section(frame, None)
    head = md.index("### synthetic-3m, guidance = progressive")
    assert head < md.index("### synthetic-3m, guidance = anchor")
    anchor_part = md.split("### synthetic-3m, guidance = anchor")[1]
    assert "67.10 ± 0.10" in _table(anchor_part, "Table 2")[2]  # the anchor-guided runs are one point up
    assert "—" in _table(anchor_part, "Table 2")[2].split("|")[-2]  # no published figure for this set
    assert len(_table(anchor_part, "Table 4")) == 4  # auto and each of the three forced


def test_report_writes_the_udi_section(tmp_path) -> None:
    store = _fill(tmp_path / "s", "synthetic", ["m0", "m1"], ["progressive"])
    out = tmp_path / "reports"
    written = write_report(store.root, out, None)
    assert out / "udi.md" in written
    assert "Table 3" in (out / "udi.md").read_text() and "Table 3" in (out / "README.md").read_text()
    assert any(p.name.endswith("udi-controller.png") for p in written)


def test_no_udi_records_no_section() -> None:
    assert udi_section(pd.DataFrame({"method": ["joint"]}), None) == ("", [])


def test_reference_options_are_the_methods_defaults() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(UDIOptions)}
    assert {k: defaults[k] for k in REFERENCE} == REFERENCE
    assert udi_cell({**REFERENCE, "controller": "static", "lambda_con": 0.0, "lambda_com": 0.0})["row"] == DECOUPLED
    assert udi_cell({"controller": "dynamic", "select_on": "follower"}) is None


@pytest.mark.parametrize("name", ["default", "paper"])
def test_sweeps_have_the_decoupled_row(name: str) -> None:
    variants = load_sweep(name).methods["udi"]["variants"]
    decoupled = [v for v in variants if v.get("label", "").startswith("Decoupled")]
    assert len(decoupled) == 1
    assert (decoupled[0]["method.controller"], decoupled[0]["method.lambda_con"], decoupled[0]["method.lambda_com"],
            decoupled[0]["method.follower_init"]) == ("static", 0.0, 0.0, "scratch")


def test_ablation_sweep_shares_the_default_settings_and_runs_both_guidance_modes() -> None:
    default, ablation = load_sweep("default"), load_sweep("udi-ablation")
    assert ablation.settings == default.settings and ablation.seeds == default.seeds == [0, 1, 2]
    for name in ("synthetic", "cg-digits", "av-digits"):
        assert ablation.datasets[name] == default.datasets[name]
    assert "synthetic-3m" in ablation.datasets
    three = [v for v in ablation.methods["udi"]["variants"] if v.get("datasets") == ["synthetic-3m"]]
    assert three and all(v["method.guidance"] == "anchor" for v in three)
    paper = load_sweep("udi-paper")
    assert paper.preset == "udi-paper" and set(paper.methods) == {"joint", "udi"}
    assert "preset" not in load_sweep("paper").methods["udi"]  # the paper sweep's protocol is shared


def test_ablation_cells_on_two_modalities_are_the_default_sweeps_runs(tmp_path) -> None:
    """`nox -s bench` runs both sweeps into one store: on the two-modality sets the ablation sweep
    must add no run (same keys); on the three-modality set it adds 15 cells per seed."""
    from benchmark.sweep import Filters, plan_sweep

    store = Store(tmp_path / "s")
    only = Filters(datasets=["synthetic"], seeds=[0])
    default = {r.key for r in plan_sweep(load_sweep("default"), store, only).runs}
    ablation = plan_sweep(load_sweep("udi-ablation"), store, only).runs
    assert len(ablation) == 7 and {r.key for r in ablation} <= default
    three = plan_sweep(load_sweep("udi-ablation"), store, Filters(datasets=["synthetic-3m"], seeds=[0])).runs
    assert len(three) == 15 and len({r.key for r in three}) == 15
    guidance = [r.assignments.get("method.guidance", "progressive") for r in three if r.method == "udi"]
    assert guidance.count("anchor") == guidance.count("progressive") == 7
