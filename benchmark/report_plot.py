"""Plot pieces the report and methods' report modules share (no torch)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.report_stats import t_interval

FIGURE_FORMATS = ("png", "pdf")


# --- writing figures ---------------------------------------------------------------------------------
FigurePath = Path | tuple[Path, dict[str, Any]]  # a path, or a path and savefig arguments of its own


def _render(fig: Any, paths: Sequence[FigurePath], tight: bool, kwargs: dict[str, Any]) -> None:
    if tight:
        fig.tight_layout()
    for item in paths:
        path, own = item if isinstance(item, tuple) else (item, {})
        fig.savefig(path, **{**kwargs, **own})


def _render_pickled(blob: bytes, rc: dict[str, Any], paths: list[FigurePath], tight: bool, kwargs: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(rc):  # the style the figure was drawn under (draw-time settings included)
        fig = pickle.loads(blob)
        try:
            _render(fig, paths, tight, kwargs)
        finally:
            plt.close(fig)


class _Writer:
    """Worker processes that lay out and write figures: drawing (text layout above all) is most of a
    report's time, and each figure is drawn on its own, so the figures of a report are drawn side by side."""

    def __init__(self, workers: int) -> None:
        import multiprocessing

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
        self.pending: list[Future] = []

    def submit(self, fig: Any, paths: Sequence[FigurePath], tight: bool, kwargs: dict[str, Any]) -> None:
        import matplotlib

        try:
            blob = pickle.dumps(fig)
        except (pickle.PicklingError, AttributeError, TypeError):  # e.g. a lambda tick formatter: drawn here
            _render(fig, paths, tight, kwargs)
            return
        rc = {k: v for k, v in matplotlib.rcParams.items()}
        self.pending.append(self.pool.submit(_render_pickled, blob, rc, list(paths), tight, kwargs))

    def finish(self) -> None:
        try:
            for future in self.pending:
                future.result()  # the first failure (a full disk, say) is raised here, as it would be inline
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


_WRITER: _Writer | None = None


def save_figure(fig: Any, paths: Sequence[FigurePath], *, tight: bool = True, **kwargs: Any) -> None:
    """Lay ``fig`` out (``tight_layout`` unless ``tight`` is false) and write it to each of ``paths``
    (the format from the suffix, ``kwargs`` to ``savefig``, a ``(path, arguments)`` pair adding its
    own); closes it. Inside
    :func:`figure_workers`, a worker process does the drawing and the writing, and the files exist
    once that block has ended."""
    import matplotlib.pyplot as plt

    if _WRITER is not None:
        _WRITER.submit(fig, paths, tight, kwargs)
    else:
        _render(fig, paths, tight, kwargs)
    plt.close(fig)


def figure_workers_default() -> int:
    """One worker per CPU core this process may use, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


@contextmanager
def figure_workers(workers: int | None = None) -> Iterator[None]:
    """Within the block, :func:`save_figure` hands each figure to one of ``workers`` processes
    (default: :func:`figure_workers_default`; 1: draw in this process); on leaving it, waits for
    every figure and raises the first error."""
    global _WRITER
    workers = figure_workers_default() if workers is None else workers
    if workers <= 1 or _WRITER is not None:
        yield
        return
    _WRITER = _Writer(workers)
    writer = _WRITER
    try:
        yield
    except BaseException:
        _WRITER = None
        writer.pool.shutdown(wait=True, cancel_futures=True)
        raise
    _WRITER = None
    writer.finish()


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
