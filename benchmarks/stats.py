"""Numbers and verdicts: medians with min/max, paired ratios, goals, and the result tables.

Every figure is a `Stat` (median of the runs, with min and max); every comparison is a ratio
taken within one run, against a peer measured in that same run.
"""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


@dataclass
class Stat:
    """A measured quantity over several runs."""

    label: str
    unit: str
    samples: list[float]
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "runs": len(self.samples),
            "samples": self.samples,
            "note": self.note,
        }


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-run ratios num[i] / den[i] (the runs are paired: same run, same conditions)."""
    if len(num) != len(den):
        raise ValueError(f"unpaired runs: {len(num)} vs {len(den)}")
    return [n / d if d else math.inf for n, d in zip(num, den, strict=True)]


@dataclass
class Goal:
    """A target for one `Stat`'s median (`op` is "<=" or ">=")."""

    stat: Stat
    op: str
    threshold: float
    text: str

    @property
    def met(self) -> bool:
        return bool(self.stat.samples) and _OPS[self.op](self.stat.median, self.threshold)

    @property
    def verdict(self) -> str:
        if not self.stat.samples:
            return "not measured"
        return "met" if self.met else "MISSED"

    def to_dict(self) -> dict[str, Any]:
        return {
            "goal": self.text,
            "op": self.op,
            "threshold": self.threshold,
            "median": self.stat.median,
            "met": self.met,
            "stat": self.stat.label,
        }


@dataclass
class Section:
    """One numbered benchmark: its rows (plain figures and goal rows) and notes."""

    key: str
    title: str
    rows: list[Stat | Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, stat: Stat) -> Stat:
        self.rows.append(stat)
        return stat

    def goal(self, stat: Stat, op: str, threshold: float, text: str) -> Goal:
        goal = Goal(stat, op, threshold, text)
        for i, row in enumerate(self.rows):
            if row is stat:  # a figure that carries a goal is shown once, as the goal row
                self.rows[i] = goal
                return goal
        self.rows.append(goal)
        return goal

    @property
    def goals(self) -> list[Goal]:
        return [r for r in self.rows if isinstance(r, Goal)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "rows": [
                {**r.stat.to_dict(), "goal": r.to_dict()} if isinstance(r, Goal) else r.to_dict()
                for r in self.rows
            ],
            "goals": [g.to_dict() for g in self.goals],
            "notes": self.notes,
            "skipped": self.skipped,
            "error": self.error,
            "seconds": round(self.seconds, 1),
            "extra": self.extra,
        }


# --------------------------------------------------------------------------- formatting


def fmt(value: float, unit: str) -> str:
    """A number with its unit, rounded for reading."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "∞"
    if unit == "×":  # three decimals near 1, so a 1.053× never reads as a met "≤ 1.05×"
        return (
            f"{value:.3f}×" if value < 10 else f"{value:.1f}×" if value < 100 else f"{value:.0f}×"
        )
    if unit == "count":
        return f"{value:g}"
    digits = 3 if abs(value) < 1 else 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {unit}"


def _cells(row: Stat | Goal) -> list[str]:
    stat = row.stat if isinstance(row, Goal) else row
    spread = f"{fmt(stat.min, stat.unit)} – {fmt(stat.max, stat.unit)}"
    if len(stat.samples) == 1:
        spread = "(1 run)"
    label = stat.label + (f" ({stat.note})" if stat.note else "")
    if isinstance(row, Goal):
        goal = f"{_SYMBOL[row.op]} {_threshold(row.threshold, stat.unit)}"
        verdict = "**MISSED**" if row.verdict == "MISSED" else row.verdict
    else:
        goal = verdict = ""
    return [label, fmt(stat.median, stat.unit), spread, goal, verdict]


def markdown(sections: Sequence[Section], header: str = "") -> str:
    """One Markdown table for every section (section title rows), then the notes."""
    lines = [header, ""] if header else []
    lines.append("| # | Measurement | Median | Min – max | Goal | Result |")
    lines.append("|---|---|---:|---:|---|---|")
    for s in sections:
        if s.error:
            lines.append(f"| {s.key} | **{s.title}**: crashed ({_escape(s.error)}) | | | | |")
            continue
        if s.skipped:
            lines.append(f"| {s.key} | **{s.title}**: skipped ({_escape(s.skipped)}) | | | | |")
            continue
        lines.append(f"| {s.key} | **{s.title}** | | | | |")
        for row in s.rows:
            cells = [_escape(c) for c in _cells(row)]
            lines.append(f"| | {' | '.join(cells)} |")
    notes = [(s.key, n) for s in sections for n in s.notes]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- ({key}) {note}" for key, note in notes]
    return "\n".join(lines) + "\n"


def text_table(sections: Sequence[Section]) -> str:
    """The same table for a terminal: fixed-width columns."""
    rows: list[list[str]] = [["#", "Measurement", "Median", "Min – max", "Goal", "Result"]]
    for s in sections:
        if s.error or s.skipped:
            state = f"crashed: {s.error}" if s.error else f"skipped: {s.skipped}"
            rows.append([s.key, f"{s.title} — {state}", "", "", "", ""])
            continue
        rows.append([s.key, s.title, "", "", "", ""])
        for row in s.rows:
            rows.append(["", "  " + _cells(row)[0], *_cells(row)[1:4], _verdict(row)])
    widths = [min(max(len(r[i]) for r in rows), 72) for i in range(6)]
    out = []
    for r in rows:
        out.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    return "\n".join(out) + "\n"


_SYMBOL = {"<=": "≤", ">=": "≥"}


def _threshold(value: float, unit: str) -> str:
    if unit == "×":
        return f"{value:g}×"
    return f"{value:g}" if unit == "count" else f"{value:g} {unit}"


def _verdict(row: Stat | Goal) -> str:
    return row.verdict if isinstance(row, Goal) else ""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
