"""The modulation window of methods that act only in part of training (OGM-GE, PMR): its two
units, its checks and the epochs it covers. A piece shared as functions; it registers nothing."""

from __future__ import annotations

from benchmark.errors import UsageError

WINDOW_UNITS = ("fraction", "epochs")


def check_window(start: float, end: float, unit: str) -> None:
    """Refuse a window that is empty or out of range, in one line naming the fix."""
    if unit not in WINDOW_UNITS:
        raise UsageError(f"method.window must be one of {', '.join(WINDOW_UNITS)}, got {unit!r}")
    if not (0 <= start <= end) or (unit == "fraction" and end > 1):
        limit = " <= 1 (fractions of the epoch budget; set method.window=epochs for epochs)" \
            if unit == "fraction" else ""
        raise UsageError(f"method.modulation_start ({start}) must be >= 0 and <= method.modulation_end "
                         f"({end}){limit}")
    if unit == "epochs" and not (float(start).is_integer() and float(end).is_integer()):
        raise UsageError(f"with method.window=epochs, modulation_start and modulation_end are whole epochs, "
                         f"got {start} and {end}")


def in_window(epoch: int, start: float, end: float, unit: str, budget: int) -> bool:
    """Whether ``epoch`` (0-based) is inside the window: with ``unit="fraction"`` the epochs e with
    ``start·budget <= e < end·budget``, with ``"epochs"`` ``start <= e <= end`` (both included)."""
    if unit == "epochs":
        return start <= epoch <= end
    return start * budget <= epoch < end * budget
