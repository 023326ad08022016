"""Whether a training stage had converged when it ended (no torch: the report uses it too).

Rule (one per stage, from its per-epoch validation accuracy v_0 … v_{E-1}, E = epochs run):

- a stage stopped by early stopping has converged (no better validation accuracy for
  ``patience`` epochs);
- otherwise it ran its whole budget, and it was **still improving** when the best validation
  accuracy of its last ``k = max(3, ceil(E / 5))`` epochs exceeds the best of the epochs before
  them by more than ``DELTA`` = 1 percentage point.

Comparing maxima over a window, with a margin, keeps epoch-to-epoch noise on a plateau (a small
validation split moves by a sample or two) from counting as progress, while a curve that still
climbs sets a clearly better best in its last fifth. A stage shorter than ``2k`` epochs is
judged on what it has (k = E // 2).
"""

from __future__ import annotations

import math
from typing import Any

DELTA = 0.01  # 1 point of validation accuracy (fraction)
RULE = ("still improving: the stage ran its whole budget and the best validation accuracy of its last "
        "k = max(3, ceil(E/5)) epochs exceeds the best before them by more than 1 point")


def window(epochs: int) -> int:
    k = max(3, math.ceil(epochs / 5))
    return min(k, epochs // 2)


def still_improving(val_accuracy: list[float], stopped_early: bool) -> bool:
    """The rule above for one stage's validation curve."""
    if stopped_early or len(val_accuracy) < 2:
        return False
    k = window(len(val_accuracy))
    if k < 1:
        return False
    return max(val_accuracy[-k:]) > max(val_accuracy[:-k]) + DELTA


def stage_facts(val_accuracy: list[float], budget: int, patience: int,
                stopped_early: bool | None = None) -> dict[str, Any]:
    """What a record says about one stage's convergence."""
    run = len(val_accuracy)
    stopped = bool(patience) and run < budget if stopped_early is None else stopped_early
    return {"epochs_run": run, "budget": budget, "patience": patience, "stopped_early": stopped,
            "still_improving": still_improving(val_accuracy, stopped)}


def from_history(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-stage facts rebuilt from a record's history (records written before the rule was
    stored; early stopping is inferred from nothing, so a stage counts as having run its budget)."""
    curves: dict[str, list[float]] = {}
    for row in history:
        if "val_accuracy" in row and "stage" in row:
            curves.setdefault(str(row["stage"]), []).append(float(row["val_accuracy"]))
    return {name: stage_facts(curve, len(curve), 0) for name, curve in curves.items()}


def record_still_improving(record: dict[str, Any]) -> bool:
    """Whether any stage that this run trained itself (reused checkpoints included: their history
    is in the record) was still improving at its end."""
    facts = record.get("convergence")
    if not isinstance(facts, dict):
        facts = from_history(record.get("history") or [])
    return any(bool(f.get("still_improving")) for f in facts.values() if isinstance(f, dict))
