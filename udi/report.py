"""UDI's ablations laid out as the paper's Tables 2-4, and the dynamic controller's behaviour,
from the records of a result store (no torch: the report's light environment runs this).

    text, figures = udi_section(frame, figures_dir)

``frame`` is the report's one-row-per-record DataFrame (``benchmark.report.load_frame``: dataset,
method, seed, label, accuracy, macro_f1, method_options, history, unimodal:<m> columns). Per
dataset and guidance mode:

- Table 2 (decoupled optimisation × dynamic controller): joint (✕/✕, the paper's "Sum"),
  Decoupled = UDI static (0, 0) (✓/✕), UDI with the dynamic controller (✓/✓).
- Table 3: static (λ_con, λ_com) = (0, 1), (1, 0), (0, 0) against the dynamic controller.
- Table 4: the anchor chosen automatically against each modality forced as the anchor.
- The controller: per follower, how often λ_com is 0, the inner products' signs and the CLUB value;
  a figure of λ, the inner products and the CLUB value per epoch.

A UDI record enters these tables only when its other options are the defaults (:data:`REFERENCE`),
so that a cell never mixes, say, a batch-wise controller with the epoch-wise one. The paper's
published accuracies (Table 1, METHODS.md) stand beside ours where the dataset is one of its.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.report_plot import dot_interval, save_figure
from benchmark.report_stats import CI_KIND

# Options that must hold their default for a record to be a cell of Tables 2-4 (the defaults of
# udi.method.UDIOptions; a test keeps the two in step).
REFERENCE: dict[str, Any] = {
    "tie_tol": 0.5, "controller_every": "epoch", "controller_task": "follower_ce", "controller_eps": 1e-12,
    "club_mode": "all_pairs", "club_direction": "follower_given_anchor", "club_hidden": 64,
    "club_optimizer": "adam", "club_lr": 1e-3, "con_reduction": "mean", "order": "auto",
    "fusion_rule": "logit_sum", "follower_init": "scratch", "select_on": "fusion",
}
DYNAMIC_INITIAL = (0.5, 0.5)  # the controller's initial weights in the reference runs
DECOUPLED = "Decoupled (static (0, 0))"

# The paper's Table 1 accuracies (%) by our dataset names: UDI, the rows of its ablations, the joint
# "Sum" baseline, and the anchor it reports (METHODS.md, UDI, "Published").
PAPER: dict[str, dict[str, Any]] = {
    "crema-d": {"udi": 82.80, "decoupled": 78.90, "static (1, 0)": 82.39, "static (0, 1)": 81.59,
                "joint": 66.40, "anchor": "visual"},
    "kinetics-sounds": {"udi": 74.68, "decoupled": 73.25, "static (1, 0)": 74.49, "static (0, 1)": 73.71,
                        "joint": 65.57, "anchor": "audio"},
    "cgmnist": {"udi": 99.12, "decoupled": 97.87, "static (1, 0)": 96.37, "static (0, 1)": 99.02,
                "joint": 64.07, "anchor": "gray"},
    "ucf101": {"udi": 86.33, "decoupled": 85.96, "static (1, 0)": 86.23, "static (0, 1)": 85.83,
               "joint": 81.79, "anchor": "rgb"},
    "food-101": {"udi": 92.89, "decoupled": 92.86, "static (1, 0)": 92.71, "static (0, 1)": 92.38,
                 "joint": 90.32, "anchor": "text"},
    "cmu-mosei": {"udi": 81.84, "decoupled": 80.49, "static (1, 0)": 81.54, "static (0, 1)": 81.48,
                  "joint": 78.96, "anchor": "text"},
}


# --- classifying the records ---------------------------------------------------------------------
def udi_cell(options: dict[str, Any]) -> dict[str, Any] | None:
    """The ablation cell of a UDI record from its options, or None if it is not one (an option
    other than anchor, controller, the weights and guidance departs from the default)."""
    for key, value in REFERENCE.items():
        if key in options and options[key] != value:
            return None
    controller = options.get("controller", "dynamic")
    weights = (float(options.get("lambda_con", 0.5)), float(options.get("lambda_com", 0.5)))
    if controller == "dynamic" and weights != DYNAMIC_INITIAL:
        return None
    anchor = str(options.get("anchor", "auto"))
    if controller == "static" and anchor != "auto":
        return None
    if controller == "dynamic":
        row = "dynamic"
    elif weights == (0.0, 0.0):
        row = DECOUPLED
    else:
        row = f"static ({weights[0]:g}, {weights[1]:g})"
    return {"guidance": str(options.get("guidance", "progressive")), "row": row, "anchor": anchor}


def chosen_anchor(history: list[dict[str, Any]], modalities: list[str]) -> str | None:
    """The anchor a run used: the one modality that was not trained as a follower."""
    followers = {str(h.get("stage", ""))[len("udi:follower:"):] for h in history
                 if str(h.get("stage", "")).startswith("udi:follower:")}
    rest = [m for m in modalities if m not in followers]
    return rest[0] if len(rest) == 1 else None


def classify(frame: pd.DataFrame) -> pd.DataFrame:
    """The UDI records that are ablation cells, with columns guidance, row, anchor, used_anchor."""
    udi = frame[frame["method"] == "udi"]
    rows = []
    mods = [c for c in frame.columns if c.startswith("unimodal:")]
    for rec in udi.to_dict("records"):
        cell = udi_cell(rec["method_options"] or {})
        if cell is None:
            continue
        present = [c.split(":", 1)[1] for c in mods if _finite(rec.get(c))]
        rows.append({**rec, **cell, "used_anchor": chosen_anchor(rec["history"] or [], present)})
    return pd.DataFrame(rows)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --- numbers -----------------------------------------------------------------------------------------
def _summary(group: pd.DataFrame, decoupled: pd.Series | None) -> dict[str, str]:
    by_seed = group.groupby("seed")[["accuracy", "macro_f1"]].mean() * 100
    out = {"ours acc %": _pm(by_seed["accuracy"]), "ours macro-F1 %": _pm(by_seed["macro_f1"]),
           "seeds": str(len(by_seed))}
    if decoupled is not None and len(by_seed):
        common = by_seed.index.intersection(decoupled.index)
        diff = by_seed.loc[common, "accuracy"] - decoupled.loc[common]
        out["Δ Decoupled"] = f"{diff.mean():+.2f}" if len(common) else "—"
    return out


def _pm(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "—"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _paper(dataset: str, key: str) -> str:
    value = PAPER.get(dataset, {}).get(key)
    return f"{value:.2f}" if isinstance(value, float) else "—"


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def ablation_tables(dataset: str, cells: pd.DataFrame, joint: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Tables 2, 3 and 4 of one dataset and guidance mode (empty tables are left out)."""
    auto = cells[cells["anchor"] == "auto"]
    rows = {r: auto[auto["row"] == r] for r in auto["row"].unique()}
    dec = rows.get(DECOUPLED)
    dec_seed = dec.groupby("seed")["accuracy"].mean() * 100 if dec is not None and len(dec) else None
    tables: dict[str, pd.DataFrame] = {}
    t2 = []
    for mark_d, mark_c, name, frame, paper in (("✕", "✕", "joint (the paper's Sum)", joint, "joint"),
                                               ("✓", "✕", DECOUPLED, dec, "decoupled"),
                                               ("✓", "✓", "UDI (dynamic controller)", rows.get("dynamic"), "udi")):
        if frame is not None and len(frame):
            t2.append({"decoupled optimisation": mark_d, "dynamic controller": mark_c, "row": name,
                       **_summary(frame, dec_seed), "paper acc %": _paper(dataset, paper)})
    if t2:
        tables["Table 2: decoupled optimisation × dynamic controller"] = pd.DataFrame(t2)
    t3 = []
    for name, paper in (("static (0, 1)", "static (0, 1)"), ("static (1, 0)", "static (1, 0)"),
                        (DECOUPLED, "decoupled"), ("dynamic", "udi")):
        frame = rows.get(name)
        if frame is not None and len(frame):
            weights = "(λ_con, λ_com) = " + (name.split("static ")[-1].rstrip(")") + ")" if name != "dynamic"
                                             else "controller")
            t3.append({"row": name if name != "dynamic" else "UDI (dynamic controller)", "weights": weights,
                       **_summary(frame, dec_seed), "paper acc %": _paper(dataset, paper)})
    if t3:
        tables["Table 3: static weights against the dynamic controller"] = pd.DataFrame(t3)
    dyn = cells[cells["row"] == "dynamic"]
    t4 = []
    paper_anchor = PAPER.get(dataset, {}).get("anchor")
    for anchor in ["auto", *sorted(a for a in dyn["anchor"].unique() if a != "auto")]:
        frame = dyn[dyn["anchor"] == anchor]
        if not len(frame):
            continue
        if anchor == "auto":
            picked = frame["used_anchor"].value_counts()
            name = "auto (picked " + ", ".join(f"{m} in {n}" for m, n in picked.items()) + f" of {len(frame)})"
        else:
            name = f"anchor = {anchor}"
        t4.append({"anchor": name, **_summary(frame, dec_seed),
                   "paper": f"anchor {paper_anchor}: {_paper(dataset, 'udi')}" if paper_anchor and (
                       anchor == paper_anchor) else "—"})
    if len(t4) > 1:
        tables["Table 4: anchor choice (dynamic controller)"] = pd.DataFrame(t4)
    return tables


def controller_summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Per follower over the dynamic, auto-anchor runs: how the controller set the weights."""
    trace = controller_trace(cells)
    if trace.empty:
        return trace
    rows = []
    for (follower,), group in trace.groupby(["follower"]):
        last = group[group["epoch"] == group["epoch"].max()]
        rows.append({
            "follower": follower, "runs": group["seed"].nunique(),
            "epochs with λ_com = 0": f"{(group['lambda_com'] == 0).mean() * 100:.0f}%",
            "λ_com at epoch 0": _pm(group[group["epoch"] == 0]["lambda_com"]),
            "⟨g_cls, g_com⟩ < 0": f"{(group['ip_com'] < 0).mean() * 100:.0f}%",
            "⟨g_cls, g_con⟩ < 0": f"{(group['ip_con'] < 0).mean() * 100:.0f}%",
            "CLUB first epoch (nats)": _pm(group[group["epoch"] == 0]["train_com"]),
            "CLUB last epoch (nats)": _pm(last["train_com"]),
            "max CLUB (nats)": f"{group['train_com'].max():.2f}",
        })
    return pd.DataFrame(rows)


def controller_trace(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, follower, epoch) of the dynamic, auto-anchor runs."""
    dyn = cells[(cells["row"] == "dynamic") & (cells["anchor"] == "auto")] if len(cells) else cells
    rows = []
    for rec in dyn.to_dict("records"):
        for h in rec["history"] or []:
            if "lambda_com" in h and h.get("ip_com") is not None:
                rows.append({"seed": rec["seed"], "follower": str(h.get("udi_follower", "")), "epoch": h["epoch"],
                             "lambda_con": h["lambda_con"], "lambda_com": h["lambda_com"], "ip_con": h["ip_con"],
                             "ip_com": h["ip_com"], "train_com": h.get("train_com", math.nan),
                             "train_con": h.get("train_con", math.nan)})
    return pd.DataFrame(rows)


# --- figures -----------------------------------------------------------------------------------------
def controller_figure(name: str, trace: pd.DataFrame, out: Path, slug: str) -> Path:
    """λ_con and λ_com, the two inner products (symlog) and the CLUB value per epoch, mean ± sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    weights = trace.melt(id_vars=["epoch", "follower", "seed"], value_vars=["lambda_con", "lambda_com"],
                         var_name="term", value_name="weight")
    sns.lineplot(weights, x="epoch", y="weight", hue="term", style="follower", errorbar="sd", ax=axes[0])
    axes[0].set(ylabel="controller weight λ", ylim=(-0.05, 1.05), title="weights")
    products = trace.melt(id_vars=["epoch", "follower", "seed"], value_vars=["ip_con", "ip_com"],
                          var_name="term", value_name="inner product")
    sns.lineplot(products, x="epoch", y="inner product", hue="term", style="follower", errorbar="sd", ax=axes[1])
    axes[1].axhline(0.0, color="black", lw=0.8)
    axes[1].set_yscale("symlog", linthresh=1e-4)
    axes[1].set(title="⟨g_cls, g_k⟩ at the controller's batch")
    sns.lineplot(trace, x="epoch", y="train_com", hue="follower", errorbar="sd", ax=axes[2])
    axes[2].set(ylabel="CLUB bound (nats, epoch mean)", title="L_com")
    fig.suptitle(f"{name}: UDI dynamic controller (anchor auto; mean ± sd over seeds)")
    path = out / f"{slug}-udi-controller.png"
    # a vector copy for print beside the PNG the Markdown shows
    save_figure(fig, [(path, {"dpi": 120}), path.with_suffix(".pdf")])
    return path


# --- the section ---------------------------------------------------------------------------------------
def udi_section(frame: pd.DataFrame, figures: Path | None = None, link_prefix: str = "figures/"
                ) -> tuple[str, list[Path]]:
    """Markdown of the UDI ablation section (empty if the store has no UDI ablation cell) and the
    figures written into ``figures`` (none if it is None)."""
    if frame.empty or "method" not in frame or not (frame["method"] == "udi").any():
        return "", []
    cells = classify(frame)
    if cells.empty:
        return "", []
    written: list[Path] = []
    md = ["## UDI ablations in the shape of the paper's Tables 2-4\n",
          "Per dataset and guidance mode, from the UDI runs with default options other than the anchor, "
          "the weights and the guidance (test accuracy and macro-F1, mean ± sd over seeds, %; Δ Decoupled: "
          "mean paired difference to the Decoupled row over the seeds both have, points). "
          f"{DECOUPLED} is UDI with fixed weights (0, 0) and followers from scratch: unimodal models "
          "trained apart and fused at test time, the paper's \"Decoupled\" baseline. The paper's column "
          "is its Table 1 accuracy for the same setting (single published figures; its rows come from "
          "other preprocessing and budgets: compare gaps, not levels). Table 2's ✕/✓ row (a joint loss "
          "with the controller) is not a method of this suite and is left out.\n"]
    for dataset in _order(cells["dataset"].unique()):
        sub = cells[cells["dataset"] == dataset]
        joint = frame[(frame["dataset"] == dataset) & (frame["method"] == "joint") & (frame["label"] == "joint")]
        modes = sorted(sub["guidance"].unique(), key=lambda g: (g != "progressive", g))
        n_mod = sum(1 for c in frame.columns if c.startswith("unimodal:")
                    and frame[frame["dataset"] == dataset][c].notna().any())
        for mode in modes:
            part = sub[sub["guidance"] == mode]
            title = dataset if n_mod < 3 else f"{dataset}, guidance = {mode}"
            md.append(f"### {title}\n")
            for caption, table in ablation_tables(dataset, part, joint).items():
                md += [f"**{caption}**\n", _markdown(table) + "\n"]
            summary = controller_summary(part)
            if len(summary):
                md += ["**The dynamic controller** (anchor auto; every epoch of every run):\n",
                       _markdown(summary) + "\n"]
                if figures is not None:
                    slug = dataset if n_mod < 3 else f"{dataset}-{mode}"
                    path = controller_figure(title, controller_trace(part), figures, slug)
                    written.append(path)
                    md.append(f"![{path.stem}]({link_prefix}{path.name})\n")
    return "\n".join(md), written


def _order(names: Any) -> list[str]:
    first = ["synthetic", "synthetic-3m", "cg-digits", "av-digits", "crema-d", "kinetics-sounds", "cgmnist",
             "ucf101", "food-101", "cmu-mosei"]
    names = list(names)
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


# --- figures per dataset (benchmark.report calls this through the method's report module) -----------
def dataset_figures(dataset: str, df: pd.DataFrame, save: Callable[[Any, str], None]) -> None:
    """UDI's figures on one dataset: static against dynamic weights, anchor sensitivity, and the
    dynamic controller's weights per epoch; ``save(fig, name)`` writes each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    udi = _udi_frame(df)
    if not udi.empty:
        ablations = (
            (udi[udi["anchor"] == "auto"], "weights", "dynamic", (6, 3.2), "#3c8d3c", "(λ_con, λ_com)",
             "UDI static vs dynamic weights", "udi-static-vs-dynamic"),
            (udi[udi["controller"] == "dynamic"], "anchor", "auto", (5, 3.2), "#b36b2f", "anchor",
             "UDI anchor sensitivity", "udi-anchor"),
        )
        for frame, column, first, size, color, xlabel, title, name in ablations:
            if frame[column].nunique() > 1:
                fig, ax = plt.subplots(figsize=size)
                order = [first] + sorted(v for v in frame[column].unique() if v != first)
                groups = [(v, frame[frame[column] == v].groupby("seed")["accuracy"].mean().to_numpy() * 100)
                          for v in order if (frame[column] == v).any()]
                dot_interval(ax, groups, horizontal=False, color=color)
                ax.set(xlabel=xlabel, ylabel=f"test accuracy % ({CI_KIND})", title=f"{dataset}: {title}")
                save(fig, name)
        trace = _controller_trace(udi[(udi["controller"] == "dynamic") & (udi["anchor"] == "auto")])
        if not trace.empty:
            fig, ax = plt.subplots(figsize=(6, 3.2))
            sns.lineplot(trace, x="epoch", y="weight", hue="term", style="follower", errorbar="sd", ax=ax)
            ax.set(ylabel="controller weight", ylim=(-0.05, 1.05),
                   title=f"{dataset}: UDI dynamic controller (mean ± sd over seeds)")
            save(fig, "udi-weights")


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


# --- labels and the section (benchmark.report calls these through the method's report module) -------
def row_label(options: dict[str, Any], label: str) -> str:
    """A table row's label: the paper's "Decoupled" baseline is named as such in every table."""
    return f"Decoupled ({label})" if _is_decoupled(options) else label


def report_section(frame: pd.DataFrame, figures: Path | None = None) -> tuple[str, list[Path]]:
    return udi_section(frame, figures)


def _is_decoupled(options: dict[str, Any]) -> bool:
    """UDI with static weights (0, 0) and followers from scratch: unimodal models trained apart and
    fused at test time (the UDI paper's "Decoupled" baseline)."""
    return (options.get("method") == "udi" and options.get("method.controller") == "static"
            and options.get("method.lambda_con") == 0 and options.get("method.lambda_com") == 0
            and options.get("method.follower_init", "scratch") == "scratch")
