"""The ``report`` command's arguments, apart from benchmark.report so that ``report --help``
imports neither pandas nor matplotlib."""

from __future__ import annotations

import argparse

DESCRIPTION = ("Per dataset, one row per configuration: mean ± sd, Student-t 95% CI and seeds of accuracy and "
               "macro-F1, per-modality probe accuracies, the paired gap to a baseline row with Holm-adjusted "
               "p-values (Markdown, CSV, LaTeX), a one-row-per-run export (CSV, Parquet), and figures (PNG, PDF). "
               "Reads the records only; writes into --out, and README.md only when asked or for the "
               "repository's own results/.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default="results",
                   help="a sweep store or a folder of `run --out` records [results]")
    p.add_argument("--out", default=None, help="folder for tables and figures [a reports/ folder beside the store]")
    p.add_argument("--readme", default=None,
                   help="README whose results section is rewritten ('none': no README) [the repository's "
                        "README.md when the store is the repository's results/, else none]")
    p.add_argument("--baseline", default="",
                   help="row (label, or a method with one row) the others are compared with [the reference "
                        "method: `python -m benchmark list` marks it]")
    p.add_argument("--smoke", action="store_true", help="report the smoke records (left out otherwise)")
    p.add_argument("--no-figures", action="store_true", help="tables only")
