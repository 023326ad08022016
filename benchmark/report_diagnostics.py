"""The imbalance-diagnostics part of the report (records' ``metrics["diagnostics"]``, written by
:mod:`benchmark.diagnostics`), per dataset:

- a table of the Shapley values φ_m (points of accuracy), the imbalance degree, the conditional
  utilisation rates and d_util, mean ± sd over seeds, per method label;
- a robustness table: accuracy with each modality absent, and the area under accuracy-vs-noise;
- for two modalities, the error matrix (share of test samples, mean over seeds);
- figures: φ per modality by method, accuracy against the noise level σ per modality, ρ per epoch.

Reads the records only; :func:`diagnostics_section` returns Markdown and the files it wrote.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark import method_facts
from benchmark.report_plot import save_figure


def diagnostics_frame(records: Iterable[dict[str, Any]], dataset: str) -> pd.DataFrame:
    """One row per ok record of ``dataset`` that carries diagnostics."""
    rows = []
    for rec in records:
        d = (rec.get("metrics") or {}).get("diagnostics")
        if rec.get("status", "ok") != "ok" or rec.get("dataset") != dataset or not d:
            continue
        rows.append({"label": (rec.get("sweep") or {}).get("label") or rec.get("method"),
                     "method": rec.get("method"), "seed": rec.get("seed"),
                     "accuracy": rec["metrics"].get("accuracy"), "diagnostics": d})
    return pd.DataFrame(rows)


def _ordered(frame: pd.DataFrame, order: Sequence[str]) -> list[str]:
    methods = dict(zip(frame["label"], frame["method"]))

    def key(label: str) -> tuple[int, str]:
        method = methods[label]
        if not order:  # the methods' declared table order
            return method_facts.order_key(method)[0], label
        return (order.index(method) if method in order else len(order), label)

    return sorted(methods, key=key)


def _mean_sd(values: Iterable[Any], scale: float = 1.0) -> tuple[float, float]:
    vals = [v * scale for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan


def _pm(mean: float, sd: float, digits: int = 1) -> str:
    if mean != mean:
        return "—"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if sd == sd else f"{mean:.{digits}f}"


def _markdown(df: pd.DataFrame) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")

    cols = list(df.columns)
    lines = ["| " + " | ".join(map(cell, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(row[c]) for c in cols) + " |" for _, row in df.iterrows()]
    return "\n".join(lines)


def summary_table(frame: pd.DataFrame, order: Sequence[str] = ()) -> pd.DataFrame:
    """Numeric means and sds per label (φ and d_util in points, utilisation in %)."""
    modalities = frame["diagnostics"].iloc[0]["modalities"]
    rows = []
    for label in _ordered(frame, order):
        ds = list(frame[frame["label"] == label]["diagnostics"])
        row: dict[str, Any] = {"label": label, "runs": len(ds), "absent": "/".join(sorted({d["absent"] for d in ds}))}
        for m in modalities:
            row[f"phi_{m}"], row[f"phi_{m}_sd"] = _mean_sd(((d.get("shapley") or {}).get(m) for d in ds), 100)
        row["imbalance"], row["imbalance_sd"] = _mean_sd(d.get("imbalance_degree") for d in ds)
        for m in modalities:
            row[f"util_{m}"], _ = _mean_sd((d["utilisation"].get(m) for d in ds), 100)
            row[f"without_{m}"], _ = _mean_sd((d["absent_accuracy"].get(m) for d in ds), 100)
            row[f"noise_auc_{m}"], _ = _mean_sd((d["noise_auc"].get(m) for d in ds), 100)
        row["d_util"], row["d_util_sd"] = _mean_sd((d.get("d_util") for d in ds), 100)
        row["seconds"], _ = _mean_sd(d.get("seconds") for d in ds)
        rows.append(row)
    return pd.DataFrame(rows)


def _error_table(frame: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame | None:
    """Share of test samples (%) in each cell of the error matrix, mean over seeds."""
    rows = []
    for label in _ordered(frame, order):
        mats = [d["error_matrix"] for d in frame[frame["label"] == label]["diagnostics"] if d.get("error_matrix")]
        if not mats:
            continue
        a, b = mats[0]["rows"], mats[0]["columns"]
        row: dict[str, Any] = {"method": label, "from": "/".join(sorted({x["source"] for x in mats}))}
        for fused in ("fused_right", "fused_wrong"):
            share = np.mean([np.asarray(x[fused], float) / (np.sum(x["fused_right"]) + np.sum(x["fused_wrong"]))
                             for x in mats], axis=0) * 100
            word = "fused right" if fused == "fused_right" else "fused wrong"
            for (i, j), cell in (((1, 1), "both"), ((1, 0), f"only {a}"), ((0, 1), f"only {b}"), ((0, 0), "neither")):
                row[f"{word}: {cell}"] = f"{share[i][j]:.1f}"
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


def diagnostics_section(records: Iterable[dict[str, Any]], dataset: str, out: Path, *, figures: bool = True,
                        order: Sequence[str] = ()) -> tuple[str, list[Path]]:
    """Markdown of ``dataset``'s diagnostics and the files written (``out/<dataset>-diagnostics.csv``
    and figures under ``out/figures``); ``("", [])`` if no record carries diagnostics.
    ``order``: method names in table order (others after, by name)."""
    frame = diagnostics_frame(records, dataset)
    if frame.empty:
        return "", []
    modalities = frame["diagnostics"].iloc[0]["modalities"]
    table = summary_table(frame, order)
    written = [out / f"{dataset}-diagnostics.csv"]
    tmp = written[0].with_name(f".{written[0].name}.tmp")  # a reader never sees half a file
    tmp.write_text(table.assign(dataset=dataset).to_csv(index=False, float_format="%.4f"))
    tmp.replace(written[0])

    shown = pd.DataFrame({"method": table["label"], "seeds": table["runs"].astype(str), "absent": table["absent"]})
    for m in modalities:
        shown[f"φ {m}"] = [_pm(x, s) for x, s in zip(table[f"phi_{m}"], table[f"phi_{m}_sd"])]
    shown["imbalance degree"] = [_pm(x, s, 2) for x, s in zip(table["imbalance"], table["imbalance_sd"])]
    for m in modalities:
        shown[f"u({m}|rest) %"] = [_pm(x, math.nan) for x in table[f"util_{m}"]]
    if len(modalities) == 2:
        shown["d_util"] = [_pm(x, s) for x, s in zip(table["d_util"], table["d_util_sd"])]
    robust = pd.DataFrame({"method": table["label"]})
    for m in modalities:
        robust[f"without {m} %"] = [_pm(x, math.nan) for x in table[f"without_{m}"]]
    for m in modalities:
        robust[f"noise AUC {m} %"] = [_pm(x, math.nan) for x in table[f"noise_auc_{m}"]]
    robust["diagnostics s"] = [f"{x:.1f}" for x in table["seconds"]]

    md = ["### Imbalance diagnostics\n",
          "Test split, selected checkpoint. φ: modality Shapley values in points of accuracy (v(∅) = chance, "
          "so Σ φ = accuracy − chance); imbalance degree |φ₁ − φ₂| / (φ₁ + φ₂) (more modalities: "
          "(max − min) / Σ); u(m|rest) = (v(N) − v(N∖m)) / v(N); d_util = u(first) − u(second) in points. "
          "absent: how a modality was removed (zeros or mean input; head: its head left out of the late fusion).\n",
          _markdown(shown) + "\n",
          "Robustness: accuracy with each modality absent; area under accuracy against Gaussian noise "
          "σ·std(input) on one modality, σ from 0 to 2, divided by 2 (the mean accuracy over that range).\n",
          _markdown(robust) + "\n"]
    errors = _error_table(frame, order) if len(modalities) == 2 else None
    if errors is not None:
        md += ["Error matrix: share of test samples (%) by which unimodal readouts (or probes) are right, split by "
               "whether the fused prediction is right.\n", _markdown(errors) + "\n"]
    if figures:
        paths = _figures(frame, dataset, out / "figures", modalities, order)
        written += paths
        md += [f"![{p.stem}](figures/{p.name})\n" for p in paths]
    return "\n".join(md), written


# --- figures ----------------------------------------------------------------------------------------------
def _default_labels(frame: pd.DataFrame, order: Sequence[str]) -> list[str]:
    """One label per method: its default variant where it has one, else its first."""
    keep: dict[str, str] = {}
    for label in _ordered(frame, order):
        method = frame[frame["label"] == label]["method"].iloc[0]
        if label in (method, f"{method} anchor=auto"):
            keep[method] = label
        keep.setdefault(method, label)
    return [lab for lab in _ordered(frame, order) if lab in set(keep.values())]


def _figures(frame: pd.DataFrame, dataset: str, folder: Path, modalities: list[str],
             order: Sequence[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Any, name: str, tight: bool = True) -> None:
        # raster for the Markdown, vector for print; the legends outside the axes included
        paths = [folder / f"{dataset}-{name}.{fmt}" for fmt in ("png", "pdf")]
        save_figure(fig, paths, tight=tight, dpi=120, bbox_inches="tight")
        written.extend(paths)

    labels = _ordered(frame, order)
    phi = pd.DataFrame([{"label": r.label, "modality": m, "phi": d["shapley"][m] * 100}
                        for r in frame.itertuples() if (d := r.diagnostics).get("shapley") for m in modalities])
    if not phi.empty:
        fig, ax = plt.subplots(figsize=(7, 0.32 * len(labels) + 1.2))
        sns.barplot(phi, y="label", x="phi", hue="modality", order=[lab for lab in labels if lab in set(phi["label"])],
                    errorbar="sd", ax=ax)
        ax.axvline(0, color="black", lw=0.8)
        ax.set(xlabel="Shapley value φ per modality (points of test accuracy; Σ φ = accuracy − chance)",
               ylabel="", title=f"{dataset}: how much each modality contributes")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), title="modality")
        save(fig, "shapley")

    shown = _default_labels(frame, order)
    curves = []
    for r in frame[frame["label"].isin(shown)].itertuples():
        d = r.diagnostics
        for m in modalities:
            if m not in d["noise_accuracy"]:  # token inputs: no noise
                continue
            for sigma, acc in zip([0.0, *d["noise_levels"]], [r.accuracy, *d["noise_accuracy"][m]]):
                curves.append({"label": r.label, "modality": m, "sigma": sigma, "accuracy": acc * 100})
    if curves:
        grid = sns.relplot(pd.DataFrame(curves), x="sigma", y="accuracy", hue="label", hue_order=shown,
                           col="modality", kind="line", marker="o", errorbar="sd", height=3, aspect=1.1)
        grid.set_axis_labels("noise σ (× std of the input)", "test accuracy %")
        grid.figure.suptitle(f"{dataset}: accuracy with Gaussian noise on one modality", y=1.03)
        save(grid.figure, "noise-robustness", tight=False)  # the grid has laid itself out

    trace = []
    for r in frame[frame["label"].isin(shown)].itertuples():
        for step, row in enumerate(r.diagnostics.get("rho") or []):
            values = [v for v in row["rho"].values() if v]
            if len(modalities) == 2:
                value = row["rho"].get(modalities[0])
            else:
                value = max(values) if values else None
            if value:
                trace.append({"label": r.label, "epoch": step, "rho": value})
    if trace:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        data = pd.DataFrame(trace)
        sns.lineplot(data, x="epoch", y="rho", hue="label", hue_order=[lab for lab in shown if lab in set(data["label"])],
                     errorbar=None, ax=ax)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        what = f"ρ_{modalities[0]} = Σ p_{modalities[0]}[y] / Σ p_{modalities[1]}[y]" if len(modalities) == 2 \
            else "largest ρ (strongest over weakest modality)"
        ax.set(xlabel="epoch (stages in training order)", ylabel=what,
               title=f"{dataset}: unimodal readouts on training samples, per epoch (mean over seeds)")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title=None)
        save(fig, "rho")
    return written


def cost_section(records: Iterable[dict[str, Any]]) -> str:
    """What the diagnostics add to a run's wall time: per method (over every dataset and seed), the
    median and the largest ``seconds / wall_seconds`` (``wall_seconds`` leaves them out), and the
    share of all the records' time. Empty when no record has diagnostics."""
    rows: dict[str, list[tuple[float, float]]] = {}
    for rec in records:
        metrics = rec.get("metrics") or {}
        d, wall = metrics.get("diagnostics"), metrics.get("wall_seconds")
        if not isinstance(d, dict) or not isinstance(wall, (int, float)) or wall <= 0:
            continue
        rows.setdefault(str(rec.get("method")), []).append((float(d.get("seconds", 0.0)), float(wall)))
    if not rows:
        return ""
    table = []
    for method in sorted(rows):
        pairs = rows[method]
        added = sorted(s / w for s, w in pairs)
        worst = max(pairs, key=lambda p: p[0] / p[1])
        table.append({"method": method, "runs": len(pairs),
                      "median added %": f"{100 * statistics.median(added):.1f}",
                      "largest added %": f"{100 * added[-1]:.1f}",
                      "largest: diagnostics s / wall s": f"{worst[0]:.2f} / {worst[1]:.2f}"})
    spent = sum(s for pairs in rows.values() for s, _ in pairs)
    wall = sum(w for pairs in rows.values() for _, w in pairs)
    return ("## What the diagnostics cost\n\nPer run: the diagnostics' seconds (ρ trace included) over the "
            "run's wall time without them (`metrics.diagnostics.seconds / metrics.wall_seconds`), over "
            f"every dataset and seed. All records together: {spent:.1f} s of diagnostics on {wall:.0f} s of "
            f"runs ({100 * spent / wall:.1f}%).\n\n" + _markdown(pd.DataFrame(table)) + "\n")
