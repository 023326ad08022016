"""Choosing UDI's anchor from the unimodal models' validation results."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AnchorChoice:
    anchor: str
    rule: str  # "forced", "accuracy" or "entropy tie-break"
    tied: list[str] = field(default_factory=list)  # the modalities within tie_tol of the best


def select_anchor(val_accuracy: dict[str, float], val_entropy: dict[str, float], tie_tol: float,
                  forced: str = "auto") -> AnchorChoice:
    """The anchor: ``forced`` if it names a modality; otherwise the best validation accuracy,
    unless other modalities lie within ``tie_tol`` percentage points of it, in which case the
    lowest mean validation entropy among those within reach wins (ties of entropy keep the
    dataset's modality order). Accuracies are fractions in [0, 1]; ``tie_tol`` is in points."""
    if forced != "auto":
        if forced not in val_accuracy:
            raise ValueError(f"anchor {forced!r} is not one of {', '.join(val_accuracy)}")
        return AnchorChoice(forced, "forced")
    order = list(val_accuracy)
    best = max(val_accuracy.values())
    # a tiny slack so that a gap of exactly tie_tol points counts as a tie despite rounding
    tied = [m for m in order if 100.0 * (best - val_accuracy[m]) <= tie_tol + 1e-9]
    if len(tied) == 1:
        return AnchorChoice(tied[0], "accuracy", tied)
    anchor = min(tied, key=lambda m: (val_entropy[m], order.index(m)))
    return AnchorChoice(anchor, "entropy tie-break", tied)
