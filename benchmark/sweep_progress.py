"""The live display of a running sweep, and its counts."""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmark.sweep_plan import PlannedRun


# --- progress ---------------------------------------------------------------------------------------
def live_bar(console: Any = None) -> Any:
    """The live display: the bar with its counts and times on one line, the last finished run on
    the next, cut to the terminal's width, so that a long run label never squeezes the bar out
    (it fits in 80 columns)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class SweepBar(RichProgress):
        def get_renderables(self) -> Any:
            yield self.make_tasks_table(self.tasks)
            for task in self.tasks:
                if task.fields.get("last"):
                    yield Text(f"  last: {task.fields['last']}", no_wrap=True, overflow="ellipsis")

    return SweepBar(TextColumn("[bold]{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
                    TextColumn("failed {task.fields[failed]}"), TextColumn("elapsed"), TimeElapsedColumn(),
                    TextColumn("eta {task.fields[eta]}"), transient=False, console=console)


class Progress:
    """Runs done, failed, remaining, elapsed and estimated time: a live bar on a terminal,
    one line per finished run otherwise. ``console``: where the bar goes (rich's; tests)."""

    def __init__(self, total: int, already: int, todo: list[PlannedRun], jobs: int = 1,
                 live: bool | None = None, console: Any = None) -> None:
        self.total, self.already, self.to_run, self.jobs = total, already, len(todo), jobs
        self.done = self.failed = self.trained = self.reused = 0
        self.busy_keys: set[str] = set()  # held by another process when this one reached them
        self.started: dict[str, int] = {}  # key → pid of the worker running it
        self.errors: set[str] = set()  # one line per distinct worker error
        self.pending = {r.key: (r.dataset, r.method) for r in todo}
        self.skipped: set[str] = set()
        self.seconds: dict[tuple[str, str], list[float]] = {}
        self.start = time.perf_counter()
        self.live = sys.stderr.isatty() if live is None else live
        self._bar = None
        if self.live and todo:
            self._bar = live_bar(console)
            self._task = self._bar.add_task("sweep", total=self.to_run, failed=0, eta="?", last="")
            self._bar.start()

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def busy(self) -> int:
        return len(self.busy_keys)

    @property
    def remaining(self) -> int:
        return max(self.to_run - self.finished, 0)

    def eta(self) -> float:
        """Seconds left: each pending run costs the mean of finished runs of its method on its
        dataset (else of its dataset, else of all), spread over the workers."""
        if not self.seconds:
            return float("nan")
        everything = [x for v in self.seconds.values() for x in v]
        by_dataset: dict[str, list[float]] = {}
        for (dataset, _), values in self.seconds.items():
            by_dataset.setdefault(dataset, []).extend(values)
        total = 0.0
        for dataset, method in self.pending.values():
            values = self.seconds.get((dataset, method)) or by_dataset.get(dataset) or everything
            total += sum(values) / len(values)
        return total / max(self.jobs, 1)

    def update(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "start":
            self.started[event["key"]] = event.get("pid", 0)
        if kind == "error":
            self.errors.add(event["message"])
        if kind == "busy":
            self.busy_keys.add(event["key"])
        if kind == "skip":  # finished by another process (or by a sibling worker: undone below)
            self.busy_keys.discard(event["key"])
            if self.pending.pop(event["key"], None) is None:
                return  # a sibling worker of this sweep finished it: counted by its "done"
            self.skipped.add(event["key"])
            self.to_run -= 1
            if self._bar is not None:
                self._bar.update(self._task, total=self.to_run)
        if kind != "done":
            return
        self.busy_keys.discard(event["key"])
        self.started.pop(event["key"], None)
        if event["key"] in self.skipped:  # its "skip" from a sibling came first
            self.skipped.discard(event["key"])
            self.to_run += 1
        where = self.pending.pop(event["key"], None)
        if where is not None:
            self.seconds.setdefault(where, []).append(float(event.get("seconds") or 0.0))
        if event["status"] == "ok":
            self.done += 1
        else:
            self.failed += 1
        self.trained += event.get("trained", 0)
        self.reused += event.get("reused", 0)
        acc = event.get("accuracy")
        what = (f"acc {acc:.4f}" if isinstance(acc, float) else "") if event["status"] == "ok" else \
            f"FAILED: {event.get('error', '')[:120]}"
        run = f"{event['label']} on {event['dataset']} seed {event['seed']}"
        if self._bar is not None:
            self._bar.update(self._task, advance=1, failed=self.failed, eta=_hms(self.eta()),
                             last=f"{run} {what}")
            return
        print(f"[{self.finished}/{self.to_run}] {event['status']:<6} {run}  {what}  "
              f"{event.get('seconds', 0.0):.1f}s | done {self.done} failed {self.failed} remaining "
              f"{self.remaining} elapsed {_hms(time.perf_counter() - self.start)}"
              f" eta {_hms(self.eta())}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _hms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
