"""What a bench section hands back: rows for the table, data for the JSON, and the statistics both use."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20


@dataclass
class Row:
    figure: str
    value: str
    note: str = ""


@dataclass
class Section:
    """One numbered figure group: measured, skipped (and why) or failed (and the error)."""

    key: str
    title: str
    status: str = "measured"  # or "skipped", "failed"
    reason: str = ""
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: str, value: str, note: str = "") -> None:
        self.rows.append(Row(figure, value, note))

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status,
            "reason": self.reason,
            "rows": [vars(row) for row in self.rows],
            "data": self.data,
        }


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie, interpolated between neighbours."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, spread and the raw samples, for the JSON."""
    return {
        "runs": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "samples": [round(value, 6) for value in values],
    }


def seconds(value: float) -> str:
    """A duration the way people read it: ms below a second."""
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def median_text(values: Sequence[float]) -> str:
    """'median (min..max, n runs)' or the single value."""
    if len(values) == 1:
        return f"{seconds(values[0])} (1 run)"
    return f"{seconds(statistics.median(values))} ({seconds(min(values))}..{seconds(max(values))}, {len(values)} runs)"


def mebibytes(value: float) -> str:
    return f"{value / MIB:.1f} MiB"


def timed(action: Callable[[], object]) -> float:
    """Seconds `action()` took."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started
