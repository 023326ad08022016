"""Tables and figures from a result store (and nothing else: no training, no dataset access).

Per dataset: mean ± std over seeds of test accuracy and macro-F1, per-modality linear-probe
accuracy, the probe gap (strongest − weakest modality) and each probe against the same encoder
trained alone (the ``unimodal`` runs), the gap to ``joint`` with a paired
t-test over the seeds both have, wall time; as Markdown, CSV and LaTeX. Figures (seaborn):
accuracy by method, per-modality probe accuracy, UDI static vs dynamic weights, UDI anchor
sensitivity, UDI controller weights over epochs, learning curves. Where a dataset has published
figures (METHODS.md), they are printed beside ours. The results section of README.md (between
``<!-- results:begin -->`` and ``<!-- results:end -->``) gets the main table.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark.errors import UsageError
from benchmark.files import check_parent, check_writable_dir, os_error_line
from benchmark.report_diagnostics import diagnostics_section
from benchmark.store import Store

BASELINE = "joint"
# Table order; methods not listed come after, by name.
METHOD_ORDER = ("joint", "multi_loss", "unimodal", "ensemble", "ogm", "ogm_ge", "mla", "mcr", "udi")
README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
COMMAND = "python -m benchmark report"

# Published accuracies (%) to print beside ours (METHODS.md, "Published figures"): per dataset,
# per source, method → (mean, std or None).
PUBLISHED: dict[str, dict[str, dict[str, tuple[float, float | None]]]] = {
    "crema-d": {
        "MCR reruns (3 folds, val-selected)": {
            "joint": (62.6, 5.8), "ogm_ge": (65.6, 3.8), "ensemble": (71.7, 2.2), "mcr": (76.1, 1.6)},
        "BalanceBenchmark (1 run, test-selected)": {
            "joint": (65.50, None), "ogm": (67.76, None), "mla": (72.30, None), "MMPareto": (79.97, None)},
        "UDI paper": {"udi": (83.19, None)},
    },
    "cgmnist": {"UDI paper": {"udi": (99.11, None)}},
}
PUBLISHED_NOTE = ("CREMA-D numbers move by up to 10 points with preprocessing and optimiser: compare "
                  "each source's gap to its own joint baseline with ours.")


# --- loading ---------------------------------------------------------------------------------------
def load_frame(store: Store) -> pd.DataFrame:
    """One row per ok record: identifiers, metrics, probe and unimodal accuracies per modality."""
    rows = []
    for rec in store.records("ok"):
        m = rec.get("metrics", {})
        cfg = rec.get("config", {})
        sweep = rec.get("sweep") or {}
        row: dict[str, Any] = {
            "dataset": rec.get("dataset"), "method": rec.get("method"), "seed": rec.get("seed"),
            "label": sweep.get("label") or rec.get("method"), "key": rec.get("key"),
            "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"),
            "val_accuracy": m.get("val_accuracy"), "wall_seconds": m.get("wall_seconds"),
            "method_options": cfg.get("method_options", {}), "smoke": bool(rec.get("smoke")),
            "history": rec.get("history", []),
        }
        for name, value in (m.get("probe_accuracy") or {}).items():
            row[f"probe:{name}"] = value
        for name, value in (m.get("unimodal_accuracy") or {}).items():
            row[f"unimodal:{name}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


def _order_key(label: str, method: str) -> tuple[int, str]:
    idx = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return idx, label


def _modalities(df: pd.DataFrame, prefix: str) -> list[str]:
    return [c.split(":", 1)[1] for c in df.columns if c.startswith(prefix) and df[c].notna().any()]


# --- statistics -----------------------------------------------------------------------------------
def paired_gap(values: pd.Series, baseline: pd.Series) -> tuple[float, float, int]:
    """Mean paired difference (points), paired t-test p-value and number of pairs, over the seeds
    both have. p is NaN with fewer than two pairs or identical differences."""
    from scipy import stats

    common = values.index.intersection(baseline.index)
    if len(common) == 0:
        return math.nan, math.nan, 0
    diff = (values.loc[common] - baseline.loc[common]) * 100
    if len(common) < 2 or np.allclose(diff.to_numpy(), diff.iloc[0]):
        return float(diff.mean()), math.nan, len(common)
    p = stats.ttest_rel(values.loc[common], baseline.loc[common]).pvalue
    return float(diff.mean()), float(p), len(common)


def dataset_table(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric summary of one dataset's records: one row per label."""
    probes = _modalities(df, "probe:")
    base = df[df["label"] == BASELINE].groupby("seed")["accuracy"].mean()
    alone = df[df["method"] == "unimodal"]  # each encoder trained alone: the probe it can reach
    alone_probe = {m: alone[f"probe:{m}"].dropna().mean() * 100 for m in probes}
    rows = []
    for label, group in df.groupby("label", sort=False):
        method = group["method"].iloc[0]
        by_seed = group.groupby("seed")[["accuracy", "macro_f1"]].mean()
        row: dict[str, Any] = {"label": label, "method": method, "runs": len(by_seed)}
        for metric in ("accuracy", "macro_f1"):
            row[f"{metric}_mean"] = by_seed[metric].mean() * 100
            row[f"{metric}_std"] = by_seed[metric].std(ddof=1) * 100 if len(by_seed) > 1 else math.nan
        probe_means = []
        for mod in probes:
            vals = group[f"probe:{mod}"].dropna()
            row[f"probe_{mod}_mean"] = vals.mean() * 100 if len(vals) else math.nan
            row[f"probe_{mod}_std"] = vals.std(ddof=1) * 100 if len(vals) > 1 else math.nan
            if len(vals):
                probe_means.append(row[f"probe_{mod}_mean"])
        row["probe_gap"] = max(probe_means) - min(probe_means) if len(probe_means) > 1 else math.nan
        for mod in probes:  # how far each encoder falls short of the same encoder trained alone
            row[f"shortfall_{mod}"] = alone_probe[mod] - row[f"probe_{mod}_mean"] if method != "unimodal" else math.nan
        if label == BASELINE or base.empty:
            row.update(delta_joint=math.nan, p_value=math.nan, pairs=0)
        else:
            delta, p, n = paired_gap(by_seed["accuracy"], base)
            row.update(delta_joint=delta, p_value=p, pairs=n)
        row["seconds"] = group["wall_seconds"].mean()
        rows.append(row)
    table = pd.DataFrame(rows)
    order = sorted(range(len(table)), key=lambda i: _order_key(table["label"][i], table["method"][i]))
    return table.iloc[order].reset_index(drop=True)


# --- formatting ------------------------------------------------------------------------------------
def _pm(mean: float, std: float) -> str:
    if mean != mean:
        return "—"
    return f"{mean:.1f} ± {std:.1f}" if std == std else f"{mean:.1f}"


def _signed(x: float) -> str:
    if x != x:
        return "—"
    value = round(x, 1)
    return f"{value:+.1f}" if value != 0 else "0.0"


def _p(x: float) -> str:
    return "—" if x != x else (f"{x:.3f}" if x >= 0.001 else "<0.001")


def display_table(table: pd.DataFrame, probes: list[str]) -> pd.DataFrame:
    """The table as text cells (percent, one decimal)."""
    out = pd.DataFrame({"method": table["label"], "seeds": table["runs"].astype(str)})
    out["accuracy %"] = [_pm(m, s) for m, s in zip(table["accuracy_mean"], table["accuracy_std"])]
    out["macro-F1 %"] = [_pm(m, s) for m, s in zip(table["macro_f1_mean"], table["macro_f1_std"])]
    for mod in probes:
        out[f"probe {mod} %"] = [_pm(m, s) for m, s in zip(table[f"probe_{mod}_mean"], table[f"probe_{mod}_std"])]
    if len(probes) > 1:
        out["probe gap"] = [_signed(x).lstrip("+") for x in table["probe_gap"]]
    for mod in probes:
        if table[f"shortfall_{mod}"].notna().any():
            out[f"{mod} vs alone"] = [_signed(-x) for x in table[f"shortfall_{mod}"]]
    out["Δ joint"] = [_signed(x) for x in table["delta_joint"]]
    out["p (paired t)"] = [_p(x) for x in table["p_value"]]
    out["time s"] = [f"{x:.1f}" for x in table["seconds"]]
    return out


def markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


_LATEX_ESCAPE = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                 "±": r"$\pm$", "Δ": r"$\Delta$", "—": "--", "<": r"$<$", "λ": r"$\lambda$"}


def _tex(text: Any) -> str:
    return re.sub("|".join(map(re.escape, _LATEX_ESCAPE)), lambda m: _LATEX_ESCAPE[m.group()], str(text))


def latex(df: pd.DataFrame, caption: str) -> str:
    cols = list(df.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
    for _, row in df.iterrows():
        lines.append(" & ".join(_tex(row[c]) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def published_table(dataset: str, table: pd.DataFrame) -> pd.DataFrame | None:
    """Ours beside the published figures for ``dataset`` (None if it has none): accuracy and the
    gap to each source's own joint baseline."""
    sources = PUBLISHED.get(dataset)
    if not sources:
        return None
    ours = {row.label: (row.accuracy_mean, row.accuracy_std) for row in table.itertuples()}
    names = [m for m in METHOD_ORDER if any(m in s for s in sources.values()) or m in ours]
    names += sorted({m for s in sources.values() for m in s} - set(names))
    rows = []
    for name in names:
        mean, std = ours.get(name, (math.nan, math.nan))
        base = ours.get(BASELINE, (math.nan, math.nan))[0]
        row = {"method": name, "ours %": _pm(mean, std),
               "ours Δ joint": _signed(mean - base) if name != BASELINE else "—"}
        for source, figures in sources.items():
            if name in figures:
                pm, ps = figures[name]
                pb = figures.get(BASELINE, (math.nan, None))[0]
                row[source] = _pm(pm, ps if ps is not None else math.nan)
                row[f"{source} Δ joint"] = _signed(pm - pb) if name != BASELINE else "—"
            else:
                row[source] = row[f"{source} Δ joint"] = ""
        if any(v not in ("", "—") for k, v in row.items() if k != "method"):
            rows.append(row)
    return pd.DataFrame(rows)


# --- figures --------------------------------------------------------------------------------------
def _udi_frame(df: pd.DataFrame) -> pd.DataFrame:
    udi = df[df["method"] == "udi"].copy()
    if udi.empty:
        return udi
    opts = udi["method_options"]
    udi["anchor"] = [o.get("anchor", "?") for o in opts]
    udi["controller"] = [o.get("controller", "?") for o in opts]
    udi["weights"] = [
        "dynamic" if o.get("controller") == "dynamic"
        else f"static ({o.get('lambda_con', '?'):g}, {o.get('lambda_com', '?'):g})"
        if isinstance(o.get("lambda_con"), (int, float)) else "static"
        for o in opts]
    return udi


def make_figures(dataset: str, df: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    written: list[Path] = []
    labels = sorted(df["label"].unique(), key=lambda lab: _order_key(lab, df[df["label"] == lab]["method"].iloc[0]))

    def save(fig: Any, name: str) -> None:
        path = out / f"{dataset}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    acc = df.assign(accuracy=df["accuracy"] * 100)
    height = 0.32 * len(labels) + 1.2
    fig, ax = plt.subplots(figsize=(7, height))
    sns.barplot(acc, y="label", x="accuracy", order=labels, errorbar="sd", color="#8fb3d9", ax=ax)
    sns.stripplot(acc, y="label", x="accuracy", order=labels, color="black", size=3, jitter=False, ax=ax)
    base = acc[acc["label"] == BASELINE]["accuracy"].mean()
    if base == base:
        ax.axvline(base, color="#c0392b", ls="--", lw=1, label="joint")
        ax.legend(loc="lower right")
    ax.set(xlabel="test accuracy % (mean ± sd over seeds; dots: seeds)", ylabel="", title=dataset)
    save(fig, "accuracy")

    probe_cols = [c for c in df.columns if c.startswith("probe:") and df[c].notna().any()]
    if probe_cols:
        long = df.melt(id_vars=["label"], value_vars=probe_cols, var_name="modality", value_name="probe")
        long = long.dropna(subset=["probe"])
        long["modality"] = long["modality"].str.split(":", n=1).str[1]
        long["probe"] *= 100
        fig, ax = plt.subplots(figsize=(7, height))
        sns.barplot(long, y="label", x="probe", hue="modality", order=[lab for lab in labels if lab in set(long["label"])],
                    errorbar="sd", ax=ax)
        ax.set(xlabel="linear-probe accuracy % per modality (frozen encoder)", ylabel="",
               title=f"{dataset}: how much each encoder learned")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), title="modality")
        save(fig, "probes")

    udi = _udi_frame(df)
    if not udi.empty:
        ablations = (
            (udi[udi["anchor"] == "auto"], "weights", "dynamic", (6, 3.2), "#9bc49b", "(λ_con, λ_com)",
             "UDI static vs dynamic weights", "udi-static-vs-dynamic"),
            (udi[udi["controller"] == "dynamic"], "anchor", "auto", (5, 3.2), "#d9b38f", "anchor",
             "UDI anchor sensitivity", "udi-anchor"),
        )
        for frame, column, first, size, color, xlabel, title, name in ablations:
            if frame[column].nunique() > 1:
                fig, ax = plt.subplots(figsize=size)
                order = [first] + sorted(v for v in frame[column].unique() if v != first)
                sns.barplot(frame.assign(accuracy=frame["accuracy"] * 100), x=column, y="accuracy",
                            order=order, errorbar="sd", color=color, ax=ax)
                _ylim_around(ax, frame["accuracy"] * 100)
                ax.set(xlabel=xlabel, ylabel="test accuracy %", title=f"{dataset}: {title}")
                save(fig, name)
        trace = _controller_trace(udi[(udi["controller"] == "dynamic") & (udi["anchor"] == "auto")])
        if not trace.empty:
            fig, ax = plt.subplots(figsize=(6, 3.2))
            sns.lineplot(trace, x="epoch", y="weight", hue="term", style="follower", errorbar="sd", ax=ax)
            ax.set(ylabel="controller weight", ylim=(-0.05, 1.05),
                   title=f"{dataset}: UDI dynamic controller (mean ± sd over seeds)")
            save(fig, "udi-weights")

    curves = _learning_curves(df)
    if not curves.empty:
        fig, ax = plt.subplots(figsize=(7, 4))
        order = [lab for lab in labels if lab in set(curves["label"])]
        sns.lineplot(curves, x="epoch", y="val_accuracy", hue="label", hue_order=order, errorbar=None, ax=ax)
        ax.set(ylabel="validation accuracy %", title=f"{dataset}: learning curves (last stage, mean over seeds)")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title=None)
        save(fig, "learning-curves")
    return written


def _ylim_around(ax: Any, values: pd.Series) -> None:
    lo, hi = float(values.min()), float(values.max())
    pad = max(2.0, (hi - lo) * 0.5)
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))


def _controller_trace(udi: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for rec in udi.itertuples():
        for h in rec.history:
            if "lambda_con" in h and "lambda_com" in h:
                follower = h.get("udi_follower", h.get("stage", ""))
                for term in ("lambda_con", "lambda_com"):
                    rows.append({"epoch": h["epoch"], "weight": h[term], "term": term.replace("lambda_", "λ_"),
                                 "follower": str(follower), "seed": rec.seed})
    return pd.DataFrame(rows)


def _learning_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Validation accuracy per epoch of each record's last stage; one label per method (its default
    variant where it has one, else its first)."""
    keep = {}
    for label in sorted(df["label"].unique(), key=lambda lab: _order_key(lab, df[df["label"] == lab]["method"].iloc[0])):
        method = df[df["label"] == label]["method"].iloc[0]
        if label in (method, f"{method} anchor=auto"):  # the method's default variant first
            keep[method] = label
        keep.setdefault(method, label)
    rows = []
    for rec in df[df["label"].isin(set(keep.values()))].itertuples():
        history = [h for h in rec.history if "val_accuracy" in h]
        if not history:
            continue
        last = history[-1].get("stage")
        if rec.method != "unimodal" and str(last).startswith("unimodal:"):
            continue  # no stage of its own (the ensemble combines unimodal models)
        for h in history:
            if h.get("stage") == last:
                rows.append({"label": rec.label, "epoch": h["epoch"], "val_accuracy": h["val_accuracy"] * 100})
    return pd.DataFrame(rows)


# --- the report ------------------------------------------------------------------------------------
def _dataset_order(names: Iterable[str]) -> list[str]:
    first = ["synthetic", "cg-digits", "av-digits", "crema-d", "kinetics-sounds", "ave", "cgmnist", "ucf101"]
    names = list(names)
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def write_report(store_dir: Path, out: Path, readme: Path | None = None, figures: bool = True) -> list[Path]:
    """Write every table and figure of the store into ``out``; rewrite README's results section."""
    store = Store(store_dir)
    store.check_readable()
    check_parent(out, "--out")  # a typo in the path is refused, not created
    df = load_frame(store)
    records = list(store.records("ok"))  # the imbalance diagnostics read their own part of each record
    if df.empty:
        raise UsageError(f"store {str(store_dir)!r} has no successful run records; run a sweep into it first")
    if readme is not None and not readme.is_file():
        raise UsageError(f"README {str(readme)!r} does not exist; give --readme PATH or --readme none")
    if readme is not None and (README_BEGIN not in readme.read_text() or README_END not in readme.read_text()):
        raise UsageError(f"{readme} lacks the {README_BEGIN} / {README_END} markers; add them where the "
                         "results table goes")
    check_writable_dir(out, "--out")
    if figures:
        check_writable_dir(out / "figures", "--out")
    bad = getattr(store, "bad", [])
    if bad:  # unreadable or incomplete records are left out, and said so
        path, problem = bad[0]
        print(f"note: {len(bad)} record(s) left out as unreadable or incomplete (first: {path}: {problem}); "
              "re-run the sweep to replace them", file=sys.stderr)
    written: list[Path] = []
    summary_md = [f"# Results\n\nGenerated by `{COMMAND} --store {store_dir}` from {len(df)} run records "
                  f"(reads the store only). Accuracy and macro-F1: test split, best-validation checkpoint, "
                  f"mean ± sd over seeds (%). Probe: linear probe on each frozen encoder. Δ joint: mean paired "
                  f"difference to `joint` over the seeds both have (points), p from a paired t-test.\n"]
    if df["smoke"].any():
        summary_md.append("**Smoke records (tiny subsets): numbers are not meaningful.**\n")
    all_rows = []
    tables: dict[str, pd.DataFrame] = {}
    for dataset in _dataset_order(df["dataset"].unique()):
        sub = df[df["dataset"] == dataset]
        table = dataset_table(sub)
        tables[dataset] = table
        probes = _modalities(sub, "probe:")
        shown = display_table(table, probes)
        caption = f"{dataset}: test accuracy and macro-F1 (mean ± sd over seeds, %), linear-probe accuracy per modality, gap to joint with a paired t-test."
        md = [f"## {dataset}\n", markdown(shown) + "\n"]
        published = published_table(dataset, table)
        if published is not None and len(published):
            md += ["### Published figures beside ours\n", markdown(published) + "\n", PUBLISHED_NOTE + "\n"]
        if figures:
            paths = make_figures(dataset, sub, out / "figures")
            written += paths
            md += [f"![{p.stem}](figures/{p.name})\n" for p in paths]
        section, paths = diagnostics_section(records, dataset, out, figures=figures, order=METHOD_ORDER)
        md += [section] if section else []
        written += paths
        text = "\n".join(md)
        _write(out / f"{dataset}.md", f"# {dataset}\n\nGenerated by `{COMMAND}`.\n\n" + text.split("\n", 1)[1], written)
        _write(out / f"{dataset}.tex", latex(shown, caption), written)
        csv = table.assign(dataset=dataset)
        _write(out / f"{dataset}.csv", csv.to_csv(index=False, float_format="%.4f"), written)
        all_rows.append(csv)
        summary_md.append(text)
    from udi.report import udi_section  # UDI's ablation tables (paper Tables 2-4) and its controller

    udi_md, udi_figures = udi_section(df, out / "figures" if figures else None)
    if udi_md:
        written += udi_figures
        _write(out / "udi.md", f"# UDI ablations\n\nGenerated by `{COMMAND}`.\n\n" + udi_md.split("\n", 1)[1], written)
        summary_md.append(udi_md)
    _write(out / "summary.csv", pd.concat(all_rows).to_csv(index=False, float_format="%.4f"), written)
    _write(out / "README.md", "\n".join(summary_md), written)
    if readme is not None:
        update_readme(readme, readme_section(tables, df, store_dir, out))
    return written


def _write(path: Path, text: str, written: list[Path]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:  # full or read-only: one line, no partial file
        tmp.unlink(missing_ok=True)
        raise UsageError(os_error_line(exc, path)) from None
    written.append(path)


def readme_section(tables: dict[str, pd.DataFrame], df: pd.DataFrame, store_dir: Path, out: Path) -> str:
    """The main table: one row per method (UDI with its default settings), one column per dataset."""
    datasets = list(tables)
    rows: dict[str, dict[str, str]] = {}
    order: list[tuple[tuple[int, str], str]] = []
    for dataset, table in tables.items():
        for row in table.itertuples():
            name = row.label
            if row.method == "udi":
                if name not in ("udi", "udi anchor=auto"):
                    continue
                name = "udi"
            if row.method == "unimodal":
                name = "unimodal (per modality)"
                cell = f"{row.label.split(' ', 1)[-1]} {row.accuracy_mean:.1f}"
                rows.setdefault(name, {})
                rows[name][dataset] = (rows[name].get(dataset, "") + " / " + cell).strip(" /")
            else:
                cell = _pm(row.accuracy_mean, row.accuracy_std)
                if row.method != BASELINE and row.delta_joint == row.delta_joint:
                    cell += f" ({_signed(row.delta_joint)})"
                rows.setdefault(name, {})[dataset] = cell
            if name not in [n for _, n in order]:
                order.append((_order_key(name, row.method), name))
    header = ["method"] + datasets
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, name in sorted(order):
        lines.append("| " + " | ".join([name] + [rows[name].get(d, "") for d in datasets]) + " |")
    seeds = int(df.groupby(["dataset", "label"])["seed"].nunique().max())
    return (f"Test accuracy % (mean ± sd over {seeds} seeds; in brackets the paired gap to `joint` in points), "
            f"regenerated by `{COMMAND} --store {store_dir}` from the records in `{store_dir}/`. "
            f"Per-dataset tables with macro-F1, linear probes per modality, p-values, the UDI ablations "
            f"and figures: [`{out}/README.md`]({out}/README.md).\n\n" + "\n".join(lines))


def update_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n{section}\n{README_END}{tail}"
    tmp = readme.with_name(f".{readme.name}.tmp")
    try:
        tmp.write_text(new)
        tmp.replace(readme)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(os_error_line(exc, readme)) from None


# --- command line (also ``python -m benchmark.report``: no torch needed) ------------------------------
DESCRIPTION = ("Per dataset: mean ± std over seeds of accuracy and macro-F1, per-modality probe accuracies, "
               "the gap to joint with a paired test over seeds (Markdown, CSV, LaTeX), and figures; "
               "rewrites the results section of README.md. Reads the result store only.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default="results", help="result store folder [results]")
    p.add_argument("--out", default="reports", help="folder for tables and figures [reports]")
    p.add_argument("--readme", default="README.md",
                   help="README whose results section is rewritten; 'none' leaves it [README.md]")
    p.add_argument("--no-figures", action="store_true", help="tables only")


def report_command(args: argparse.Namespace) -> int:
    readme = None if args.readme.lower() == "none" else Path(args.readme)
    written = write_report(Path(args.store), Path(args.out), readme, figures=not args.no_figures)
    print(f"report: {len(written)} files in {args.out}" + (f"; results section of {readme} rewritten"
                                                            if readme else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    parser = Parser(prog="python -m benchmark.report", description=DESCRIPTION)
    add_arguments(parser)
    try:
        return report_command(parser.parse_args(argv))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
