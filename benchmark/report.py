"""Tables and figures from a folder of run records (and nothing else: no training, no dataset access).

Reads a sweep store or any folder of ``run --out`` records. One table row per configuration
(benchmark.report_data: every resolved option but the seed and locations; smoke records apart and
left out unless asked for), labelled by the options in which it differs from the method's defaults
or the table's shared settings. Per dataset: mean ± sd over seeds, Student-t 95% confidence interval and number of seeds
of test accuracy and macro-F1; per-modality linear-probe accuracy, the probe gap and each probe
against the same encoder trained alone (the single-modality method's rows); the paired difference
to a baseline row (``--baseline``, default the reference method) over the seeds both have, with its 95% interval, the
paired t-test p-value and Holm's adjustment across the rows of the table; rows whose runs were
still improving at the end of their budget are marked. As Markdown, CSV and LaTeX, plus a
one-row-per-run export (CSV and Parquet) of every record with its resolved options as columns.
Figures (PNG and PDF): accuracy by row (dot and interval), per-modality probes (zero-based bars),
learning curves, and each method's own (its report module, benchmark.method_facts: UDI's weight
and anchor ablations and controller trace). Where a dataset has published figures (METHODS.md), they are printed
beside ours. README.md's results section (between ``<!-- results:begin -->`` and
``<!-- results:end -->``) is rewritten only with ``--readme`` or when the store is the
repository's own ``results/``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark import method_facts, report_data
from benchmark.errors import UsageError
from benchmark.files import check_parent, check_writable_dir, os_error_line
from benchmark.report_args import DESCRIPTION, add_arguments
from benchmark.report_diagnostics import cost_section, diagnostics_section
from benchmark.report_plot import FIGURE_FORMATS, dot_interval, figure_workers, save_figure
from benchmark.report_stats import CI_KIND, holm, paired_gap, paired_interval, t_interval
from benchmark.store import Store

REPO = Path(__file__).resolve().parent.parent

README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
COMMAND = "python -m benchmark report"

PUBLISHED_NOTE = ("CREMA-D numbers move by up to 10 points with preprocessing and optimiser: compare "
                  "each source's gap to its own baseline with ours.")


# --- loading ---------------------------------------------------------------------------------------
def load_frame(store: Store | Path | str, smoke: bool | None = None) -> pd.DataFrame:
    """One row per ok record: identifiers, the configuration row it belongs to (``identity``,
    ``label``), metrics, probe and unimodal accuracies per modality, convergence. ``smoke``: True
    keeps only smoke records, False only full ones, None full ones where there are any (else the
    smoke ones)."""
    root = store.root if isinstance(store, Store) else Path(store)
    records = [r for r in report_data.load_records(root) if r.get("status") == "ok"]
    if smoke is None:
        smoke = not any(not r.get("smoke") for r in records)
    records = [r for r in records if bool(r.get("smoke")) == smoke]
    return _frame(records)


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    labels = _labels(records)
    rows = []
    for rec in records:
        m = rec.get("metrics", {})
        cfg = rec.get("config", {})
        key = report_data.identity_key(rec)
        row: dict[str, Any] = {
            "dataset": rec.get("dataset"), "method": rec.get("method"), "seed": rec.get("seed"),
            "label": labels[key], "identity": key, "key": rec.get("key"),
            "variant": (rec.get("sweep") or {}).get("label"),
            "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"),
            "val_accuracy": m.get("val_accuracy"), "wall_seconds": m.get("wall_seconds"),
            "method_options": cfg.get("method_options", {}), "smoke": bool(rec.get("smoke")),
            "still_improving": report_data.still_improving(rec),
            "history": rec.get("history", []),
        }
        for name, value in (m.get("probe_accuracy") or {}).items():
            row[f"probe:{name}"] = value
        for name, value in (m.get("unimodal_accuracy") or {}).items():
            row[f"unimodal:{name}"] = value
        rows.append(row)
    return pd.DataFrame(rows)


def _labels(records: list[dict[str, Any]]) -> dict[str, str]:
    """Row labels, made per dataset (a label names what differs within its own table)."""
    labels: dict[str, str] = {}
    by_dataset: dict[str, dict[str, dict[str, Any]]] = {}
    for rec in records:
        key = report_data.identity_key(rec)
        by_dataset.setdefault(str(rec.get("dataset")), {}).setdefault(key, {
            "key": key, "method": rec.get("method"), "options": report_data.identity(rec),
            "defaults": report_data.defaults_of(rec)})
    for rows in by_dataset.values():
        labels.update(report_data.row_labels(list(rows.values())))
    return labels


def _order_key(label: str, method: str) -> tuple[int, str]:
    return method_facts.order_key(method)[0], label


def _modalities(df: pd.DataFrame, prefix: str) -> list[str]:
    return [c.split(":", 1)[1] for c in df.columns if c.startswith(prefix) and df[c].notna().any()]


# --- statistics -----------------------------------------------------------------------------------
def baseline_label(table_labels: list[str], methods: list[str], baseline: str) -> str | None:
    """The row the others are compared with: the one labelled ``baseline``, else the only row of
    the method ``baseline`` (None when there is none or several)."""
    if baseline in table_labels:
        return baseline
    rows = [lab for lab, meth in zip(table_labels, methods) if meth == baseline]
    return rows[0] if len(rows) == 1 else None


def dataset_table(df: pd.DataFrame, baseline: str = "") -> pd.DataFrame:
    """Numeric summary of one dataset's records: one row per configuration (label)."""
    baseline = baseline or method_facts.reference_method()
    probes = _modalities(df, "probe:")
    firsts = df.drop_duplicates("label")
    base_label = baseline_label(list(firsts["label"]), list(firsts["method"]), baseline)
    base = (df[df["label"] == base_label].groupby("seed")["accuracy"].mean() if base_label
            else pd.Series(dtype=float))
    single = df["method"].map(method_facts.is_single_modality).astype(bool)
    alone = df[single]  # each encoder trained alone: the probe it can reach
    alone_probe = {m: alone[f"probe:{m}"].dropna().mean() * 100 for m in probes}
    rows = []
    for label, group in df.groupby("label", sort=False):
        method = group["method"].iloc[0]
        by_seed = group.groupby("seed")[["accuracy", "macro_f1"]].mean()
        row: dict[str, Any] = {"label": label, "method": method, "runs": len(by_seed),
                               "baseline": base_label or ""}
        for metric in ("accuracy", "macro_f1"):
            row[f"{metric}_mean"] = by_seed[metric].mean() * 100
            row[f"{metric}_std"] = by_seed[metric].std(ddof=1) * 100 if len(by_seed) > 1 else math.nan
            lo, hi = t_interval(by_seed[metric] * 100)
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = lo, hi
        probe_means = []
        for mod in probes:
            vals = group[f"probe:{mod}"].dropna()
            row[f"probe_{mod}_mean"] = vals.mean() * 100 if len(vals) else math.nan
            row[f"probe_{mod}_std"] = vals.std(ddof=1) * 100 if len(vals) > 1 else math.nan
            if len(vals):
                probe_means.append(row[f"probe_{mod}_mean"])
        row["probe_gap"] = max(probe_means) - min(probe_means) if len(probe_means) > 1 else math.nan
        for mod in probes:  # how far each encoder falls short of the same encoder trained alone
            row[f"shortfall_{mod}"] = (alone_probe[mod] - row[f"probe_{mod}_mean"]
                                       if not method_facts.is_single_modality(method) else math.nan)
        if label == base_label or base.empty:
            row.update(delta=math.nan, delta_ci_low=math.nan, delta_ci_high=math.nan, p_value=math.nan, pairs=0)
        else:
            delta, p, n = paired_gap(by_seed["accuracy"], base)
            lo, hi = paired_interval(by_seed["accuracy"], base)
            row.update(delta=delta, delta_ci_low=lo, delta_ci_high=hi, p_value=p, pairs=n)
        row["still_improving"] = int(group["still_improving"].sum())
        row["seconds"] = group["wall_seconds"].mean()
        rows.append(row)
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(table["p_value"].to_numpy())
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


def _ci(lo: float, hi: float) -> str:
    return "—" if lo != lo else f"[{lo:.1f}, {hi:.1f}]"


def _converged(row: Any) -> str:
    return "yes" if not row.still_improving else f"no ({row.still_improving}/{row.runs} runs)"


def display_table(table: pd.DataFrame, probes: list[str]) -> pd.DataFrame:
    """The table as text cells (percent, one decimal); rows still improving are marked †."""
    base = next((b for b in table.get("baseline", []) if b), "") or method_facts.reference_method()
    out = pd.DataFrame({"method": [lab + (" †" if n else "") for lab, n in zip(table["label"], table["still_improving"])],
                        "seeds": table["runs"].astype(str)})
    out["accuracy %"] = [_pm(m, s) for m, s in zip(table["accuracy_mean"], table["accuracy_std"])]
    out["95% CI"] = [_ci(lo, hi) for lo, hi in zip(table["accuracy_ci_low"], table["accuracy_ci_high"])]
    out["macro-F1 %"] = [_pm(m, s) for m, s in zip(table["macro_f1_mean"], table["macro_f1_std"])]
    for mod in probes:
        out[f"probe {mod} %"] = [_pm(m, s) for m, s in zip(table[f"probe_{mod}_mean"], table[f"probe_{mod}_std"])]
    if len(probes) > 1:
        out["probe gap"] = [_signed(x).lstrip("+") for x in table["probe_gap"]]
    for mod in probes:
        if table[f"shortfall_{mod}"].notna().any():
            out[f"{mod} vs alone"] = [_signed(-x) for x in table[f"shortfall_{mod}"]]
    out[f"Δ {base}"] = [_signed(x) for x in table["delta"]]
    out["Δ 95% CI"] = [_ci(lo, hi) for lo, hi in zip(table["delta_ci_low"], table["delta_ci_high"])]
    out["p (paired t)"] = [_p(x) for x in table["p_value"]]
    out["p (Holm)"] = [_p(x) for x in table["p_holm"]]
    out["converged"] = [_converged(r) for r in table.itertuples()]
    out["time s"] = [f"{x:.1f}" for x in table["seconds"]]
    return out


def markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


_LATEX_ESCAPE = {"&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                 "±": r"$\pm$", "Δ": r"$\Delta$", "—": "--", "<": r"$<$", "λ": r"$\lambda$", "†": r"$^\dagger$"}


def _tex(text: Any) -> str:
    return re.sub("|".join(map(re.escape, _LATEX_ESCAPE)), lambda m: _LATEX_ESCAPE[m.group()], str(text))


def latex(df: pd.DataFrame, caption: str, label: str = "") -> str:
    cols = list(df.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", r"\toprule",
             " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
    for _, row in df.iterrows():
        lines.append(" & ".join(_tex(row[c]) for c in cols) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex(caption)}}}"]
    if label:
        lines.append(rf"\label{{{label}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def published_table(dataset: str, table: pd.DataFrame) -> pd.DataFrame | None:
    """Ours beside the published figures for ``dataset`` (None if it has none): accuracy and the
    gap to each source's own baseline (the reference method's figure)."""
    sources = method_facts.published().get(dataset)
    if not sources:
        return None
    ours = {row.label: (row.accuracy_mean, row.accuracy_std) for row in table.itertuples()}
    base_name = method_facts.reference_method()
    names = sorted({m for s in sources.values() for m in s} | {m for m in ours if m in method_facts.known_methods()},
                   key=method_facts.order_key)
    rows = []
    for name in names:
        mean, std = ours.get(name, (math.nan, math.nan))
        base = ours.get(base_name, (math.nan, math.nan))[0]
        row = {"method": name, "ours %": _pm(mean, std),
               f"ours Δ {base_name}": _signed(mean - base) if name != base_name else "—"}
        for source, figures in sources.items():
            if name in figures:
                pm, ps = figures[name]
                pb = figures.get(base_name, (math.nan, None))[0]
                row[source] = _pm(pm, ps if ps is not None else math.nan)
                row[f"{source} Δ {base_name}"] = _signed(pm - pb) if name != base_name else "—"
            else:
                row[source] = row[f"{source} Δ {base_name}"] = ""
        if any(v not in ("", "—") for k, v in row.items() if k != "method"):
            rows.append(row)
    return pd.DataFrame(rows)


# --- figures --------------------------------------------------------------------------------------
def make_figures(dataset: str, df: pd.DataFrame, out: Path, baseline: str = "") -> list[Path]:
    """The dataset's figures, each as PNG and PDF; returns every file written. A method's report
    module (benchmark.method_facts) may add its own through ``dataset_figures(dataset, df, save)``,
    ``save(fig, name)`` writing ``<dataset>-<name>.png/.pdf``."""
    baseline = baseline or method_facts.reference_method()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    written: list[Path] = []
    labels = sorted(df["label"].unique(), key=lambda lab: _order_key(lab, df[df["label"] == lab]["method"].iloc[0]))

    def save(fig: Any, name: str) -> None:
        paths = [out / f"{dataset}-{name}.{fmt}" for fmt in FIGURE_FORMATS]
        save_figure(fig, paths, dpi=120)
        written.extend(paths)

    height = 0.32 * len(labels) + 1.2
    fig, ax = plt.subplots(figsize=(7, height))
    groups = [(lab, df[df["label"] == lab].groupby("seed")["accuracy"].mean().to_numpy() * 100) for lab in labels]
    dot_interval(ax, groups, horizontal=True, color="#2f6db3")
    firsts = df.drop_duplicates("label")
    base_label = baseline_label(list(firsts["label"]), list(firsts["method"]), baseline)
    if base_label:
        ax.axvline(df[df["label"] == base_label]["accuracy"].mean() * 100, color="#c0392b", ls="--", lw=1,
                   label=base_label)
        ax.legend(loc="lower right")
    ax.set(xlabel=f"test accuracy % (mean, {CI_KIND} interval; small dots: seeds)", ylabel="", title=dataset)
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
        ax.set_xlim(0, 100)  # bars start at zero
        ax.set(xlabel="linear-probe accuracy % per modality (frozen encoder; mean ± sd)", ylabel="",
               title=f"{dataset}: how much each encoder learned")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), title="modality")
        save(fig, "probes")

    for module in method_facts.report_modules().values():  # a method's own figures (UDI's ablations)
        if hasattr(module, "dataset_figures"):
            module.dataset_figures(dataset, df, save)

    curves = _learning_curves(df)
    if not curves.empty:
        fig, ax = plt.subplots(figsize=(7, 4))
        order = [lab for lab in labels if lab in set(curves["label"])]
        sns.lineplot(curves, x="epoch", y="val_accuracy", hue="label", hue_order=order, errorbar=None, ax=ax)
        ax.set(ylabel="validation accuracy %", title=f"{dataset}: learning curves (last stage, mean over seeds)")
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title=None)
        save(fig, "learning-curves")
    return written


def _learning_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Validation accuracy per epoch of each record's last stage; one label per method (its default
    variant where it has one, else its first)."""
    keep = {}
    for label in sorted(df["label"].unique(), key=lambda lab: _order_key(lab, df[df["label"] == lab]["method"].iloc[0])):
        method = df[df["label"] == label]["method"].iloc[0]
        if label == method:  # the method's default variant (a label names what differs from it)
            keep[method] = label
        keep.setdefault(method, label)
    rows = []
    for rec in df[df["label"].isin(set(keep.values()))].itertuples():
        history = [h for h in rec.history if "val_accuracy" in h]
        if not history:
            continue
        last = history[-1].get("stage")
        if not method_facts.is_single_modality(rec.method) and str(last).startswith("unimodal:"):
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


def default_out(store_dir: Path) -> Path:
    """Where a report goes unless told: a ``reports/`` folder beside the store."""
    return store_dir.expanduser().resolve().parent / "reports"


def repository_readme(store_dir: Path) -> Path | None:
    """The repository's README.md when ``store_dir`` is the repository's own ``results/`` (only then
    is its results section rewritten without ``--readme``)."""
    readme = REPO / "README.md"
    if store_dir.expanduser().resolve() == (REPO / "results").resolve() and readme.is_file():
        return readme
    return None


def _check_readme(readme: Path) -> None:
    if not readme.is_file():
        raise UsageError(f"README {str(readme)!r} does not exist; give --readme PATH or --readme none")
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise UsageError(f"{readme} lacks the {README_BEGIN} / {README_END} markers; add them where the "
                         "results table goes")


def write_report(store_dir: Path, out: Path | None = None, readme: Path | None = None, figures: bool = True,
                 baseline: str = "", smoke: bool | None = None, figure_processes: int | None = None) -> list[Path]:
    """Write every table and figure of the records under ``store_dir`` into ``out`` (default: a
    ``reports/`` folder beside the store); rewrite ``readme``'s results section when given.
    ``baseline``: the row the others are compared with (default: the reference method).
    ``figure_processes``: processes that draw the figures (default: one per core, at most 4)."""
    with figure_workers(figure_processes if figures else 1):
        return _write_report(store_dir, out, readme, figures, baseline, smoke)


def _write_report(store_dir: Path, out: Path | None, readme: Path | None, figures: bool, baseline: str,
                  smoke: bool | None) -> list[Path]:
    baseline = baseline or method_facts.reference_method()
    # PDFs carry no creation time, so the same records give the same files, byte for byte
    os.environ.setdefault("SOURCE_DATE_EPOCH", "0")
    store = Store(store_dir)
    store.check_readable()
    out = default_out(store_dir) if out is None else out
    check_parent(out, "--out")  # a typo in the path is refused, not created
    records = report_data.load_records(store.root)
    full = [r for r in records if r.get("status") == "ok" and not r.get("smoke")]
    smoke_ok = [r for r in records if r.get("status") == "ok" and r.get("smoke")]
    if not full and not smoke_ok:
        raise UsageError(f"store {str(store_dir)!r} has no successful run records (looked for records/*/*.json "
                         "and *.json); run a sweep into it or give the folder `run --out` wrote")
    use_smoke = bool(smoke) or not full
    if smoke is False and not full:
        raise UsageError(f"store {str(store_dir)!r} has only smoke records; report them with --smoke")
    df = _frame(smoke_ok if use_smoke else full)
    if readme is not None:
        _check_readme(readme)
    check_writable_dir(out, "--out")
    if figures:
        check_writable_dir(out / "figures", "--out")
    unreadable = report_data.unreadable(store.root)
    if unreadable:  # unreadable or incomplete records are left out, and said so
        path, why = unreadable[0]
        print(f"note: {len(unreadable)} record(s) left out as unreadable or incomplete (first: {path}: {why}); "
              "re-run the sweep to replace them", file=sys.stderr)
    # the diagnostics section reads its own part of each record, under this report's row labels
    labelled = [dict(r, sweep=dict(r.get("sweep") or {}, label=lab))
                for r, lab in zip(smoke_ok if use_smoke else full, _record_labels(smoke_ok if use_smoke else full))]
    written: list[Path] = []
    summary_md = [f"# Results\n\nGenerated by `{COMMAND} --store {store_dir}` from {len(df)} run records "
                  f"(reads the records only). One row per configuration: records that differ in any option but "
                  f"the seed and locations never share a row; a row's label names the options in which it differs "
                  f"from the method's defaults (the method's own options) or from the table's shared settings, "
                  f"stated above each table. Accuracy and macro-F1: test split, best-validation checkpoint, "
                  f"mean ± sd over seeds (%); 95% CI: {CI_KIND} interval of the mean over seeds. Probe: linear "
                  f"probe on each frozen encoder. Δ: mean paired difference to the baseline row (`{baseline}`) over "
                  f"the seeds both have (points), its {CI_KIND} interval, the paired t-test p and Holm's "
                  f"adjustment across the rows of each table. † (converged: no): validation accuracy was still "
                  f"improving at the end of the budget in some run (the best of the last max(3, ⌈E/5⌉) epochs "
                  f"more than 1 point above the best before them, without early stopping).\n"]
    if use_smoke:
        summary_md.append("**Smoke records (tiny subsets): numbers are not meaningful.**\n")
    elif smoke_ok:
        summary_md.append(f"{len(smoke_ok)} smoke records (tiny subsets) left out; `--smoke` reports them.\n")
    all_rows = []
    tables: dict[str, pd.DataFrame] = {}
    for dataset in _dataset_order(df["dataset"].unique()):
        sub = df[df["dataset"] == dataset]
        table = dataset_table(sub, baseline)
        tables[dataset] = table
        probes = _modalities(sub, "probe:")
        shown = display_table(table, probes)
        note = report_data.common_note(_table_rows([r for r in (smoke_ok if use_smoke else full)
                                                    if r.get("dataset") == dataset]))
        base = next((b for b in table["baseline"] if b), None)
        caption = (f"{dataset}: test accuracy and macro-F1 (mean ± sd over seeds, %) with the {CI_KIND} interval, "
                   f"linear-probe accuracy per modality, paired difference to {base or 'the baseline (none)'} "
                   f"with paired t-test p-values, Holm-adjusted across the rows."
                   + (f" Rows share {note} unless their label says otherwise." if note else "")
                   + " † still improving at the end of its budget.")
        md = [f"## {dataset}\n", (f"Rows share {note} unless their label says otherwise.\n" if note else ""),
              markdown(shown) + "\n"]
        published = published_table(dataset, table)
        if published is not None and len(published):
            md += ["### Published figures beside ours\n", markdown(published) + "\n", PUBLISHED_NOTE + "\n"]
        if figures:
            paths = make_figures(dataset, sub, out / "figures", baseline)
            written += paths
            md += [f"![{p.stem}](figures/{p.name}) ([PDF](figures/{p.with_suffix('.pdf').name}))\n"
                   for p in paths if p.suffix == ".png"]
        section, paths = diagnostics_section(labelled, dataset, out, figures=figures)
        md += [section] if section else []
        written += paths
        text = "\n".join(md)
        _write(out / f"{dataset}.md", f"# {dataset}\n\nGenerated by `{COMMAND}`.\n\n" + text.split("\n", 1)[1], written)
        _write(out / f"{dataset}.tex", latex(shown, caption, f"tab:{_slug(dataset)}"), written)
        csv = table.assign(dataset=dataset)
        _write(out / f"{dataset}.csv", csv.to_csv(index=False, float_format="%.4f"), written)
        all_rows.append(csv)
        summary_md.append(text)
    for method, module in method_facts.report_modules().items():
        # a method's own section (UDI: its ablations as the paper's Tables 2-4), in <method>.md
        if not hasattr(module, "report_section"):
            continue
        section_md, section_figures = module.report_section(df, out / "figures" if figures else None)
        if section_md:
            written += section_figures
            title, body = section_md.split("\n", 1)
            _write(out / f"{method}.md", f"# {title.lstrip('#').strip()}\n\nGenerated by `{COMMAND}`.\n\n{body}",
                   written)
            summary_md.append(section_md)
    cost = cost_section(labelled)
    if cost:
        summary_md.append(cost)
    _write(out / "summary.csv", pd.concat(all_rows).to_csv(index=False, float_format="%.4f"), written)
    written += export_runs(records, out)
    _write(out / "README.md", "\n".join(summary_md), written)
    if readme is not None:
        link = os.path.relpath(out.resolve(), readme.resolve().parent)
        update_readme(readme, readme_section(tables, df, store_dir, link))
    return written


def _record_labels(records: list[dict[str, Any]]) -> list[str]:
    labels = _labels(records)
    return [labels[report_data.identity_key(r)] for r in records]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = {}
    for rec in records:
        key = report_data.identity_key(rec)
        rows[key] = {"key": key, "method": rec.get("method"), "options": report_data.identity(rec),
                     "defaults": report_data.defaults_of(rec)}
    return list(rows.values())


def export_runs(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """``runs.csv`` and ``runs.parquet``: one row per record (every status, smoke included) with
    its resolved options as columns and the table row it belongs to."""
    ok = [r for r in records if r.get("status") == "ok"]
    labels = {**_labels([r for r in ok if r.get("smoke")]), **_labels([r for r in ok if not r.get("smoke")])}
    frame = report_data.export_frame(records, labels)
    written: list[Path] = []
    _write(out / "runs.csv", frame.to_csv(index=False), written)
    tmp = out / ".runs.parquet.tmp"
    frame.to_parquet(tmp, index=False)
    tmp.replace(out / "runs.parquet")
    written.append(out / "runs.parquet")
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


def readme_section(tables: dict[str, pd.DataFrame], df: pd.DataFrame, store_dir: Path, out: Path | str) -> str:
    """The main table: one column per dataset, one row per method in its default configuration
    (the row labelled by the method's name, or the method's only row), the unimodal rows side by side."""
    datasets = list(tables)
    rows: dict[str, dict[str, str]] = {}
    order: list[tuple[tuple[int, str], str]] = []
    base = method_facts.reference_method()
    for dataset, table in tables.items():
        base = next((b for b in table["baseline"] if b), base)
        per_method = table["method"].value_counts()
        for row in table.itertuples():
            mark = " †" if row.still_improving else ""
            if method_facts.is_single_modality(row.method):
                name = f"{row.method} (per modality)"
                modality = row.label.split(" ", 1)[-1].removeprefix("modality=")
                cell = f"{modality} {row.accuracy_mean:.1f}{mark}"
                rows.setdefault(name, {})
                rows[name][dataset] = (rows[name].get(dataset, "") + " / " + cell).strip(" /")
            elif row.label == row.method or per_method[row.method] == 1:  # its default, or its only row
                name = row.method
                cell = _pm(row.accuracy_mean, row.accuracy_std) + mark
                if row.delta == row.delta:
                    cell += f" ({_signed(row.delta)})"
                rows.setdefault(name, {})[dataset] = cell
            else:
                continue
            if name not in [n for _, n in order]:
                order.append((_order_key(name, row.method), name))
    header = ["method"] + datasets
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, name in sorted(order):
        lines.append("| " + " | ".join([name] + [rows[name].get(d, "") for d in datasets]) + " |")
    seeds = int(df.groupby(["dataset", "label"])["seed"].nunique().max())
    return (f"Test accuracy % (mean ± sd over {seeds} seeds; in brackets the paired gap to `{base}` in points; "
            f"† still improving at the end of its budget), each method in its default configuration, "
            f"regenerated by `{COMMAND} --store {store_dir}` from the records in `{store_dir}/`. "
            f"Per-dataset tables with 95% confidence intervals, macro-F1, linear probes per modality, Holm-adjusted "
            f"p-values, every variant, the UDI ablations and figures: [`{out}/README.md`]({out}/README.md).\n\n"
            + "\n".join(lines))


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


# --- command line (also ``python -m benchmark.report``: no torch needed; arguments in report_args) -------
def report_command(args: argparse.Namespace) -> int:
    store = Path(args.store)
    if args.readme is None:
        readme = repository_readme(store)
    else:
        readme = None if args.readme.lower() == "none" else Path(args.readme)
    out = Path(args.out) if args.out else default_out(store)
    written = write_report(store, out, readme, figures=not args.no_figures, baseline=args.baseline,
                           smoke=True if args.smoke else None)
    print(f"report: {len(written)} files in {out}" + (f"; results section of {readme} rewritten"
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
