"""Plot pieces the report and methods' report modules share (no torch)."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmark.report_stats import t_interval

FIGURE_FORMATS = ("png", "pdf")


def dot_interval(ax: Any, groups: list[tuple[str, np.ndarray]], horizontal: bool, color: str) -> None:
    """Each group's seeds (small dots), mean (large dot) and Student-t 95% interval (bar)."""
    for i, (_, values) in enumerate(groups):
        mean = float(np.mean(values))
        lo, hi = t_interval(values)
        err = None if lo != lo else [[mean - lo], [hi - mean]]
        pos = np.full(len(values), i, dtype=float)
        if horizontal:
            ax.scatter(values, pos, s=9, color="black", alpha=0.6, zorder=3)
            ax.errorbar(mean, i, xerr=err, fmt="o", color=color, ms=6, capsize=3, zorder=2)
        else:
            ax.scatter(pos, values, s=9, color="black", alpha=0.6, zorder=3)
            ax.errorbar(i, mean, yerr=err, fmt="o", color=color, ms=6, capsize=3, zorder=2)
    names = [name for name, _ in groups]
    if horizontal:
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(len(names) - 0.5, -0.5)
    else:
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
