"""One place for how reports format things: durations, numbers, CSV and markdown tables."""

from __future__ import annotations

import csv
import io
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence

from bcjax import files

__all__ = [
    "count",
    "duration",
    "markdown_table",
    "number",
    "percent",
    "short_duration",
    "write_csv",
]


def count(n: int, word: str) -> str:
    """``3 images``, ``1 image``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def duration(seconds: float) -> str:
    """``H:MM:SS``, for ETAs and elapsed times (negative clamps to 0)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def short_duration(seconds: float) -> str:
    """``2h51m``, ``4m05s``, ``35s``: an estimate a user reads at a glance."""
    seconds = int(round(max(seconds, 0)))
    hours, minutes, secs = seconds // 3600, seconds // 60 % 60, seconds % 60
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def number(value, digits: int = 3, *, missing: str = "–") -> str:
    """A metric or figure for a table: ``digits`` decimals; None/NaN/inf as ``missing``.

    Booleans read yes/no; whole numbers keep no decimals; ``digits=None``
    picks a readable form for timings (thousands separated above 100).
    """
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return missing
        if digits is None:
            return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
        return f"{value:.{digits}f}"
    return str(value)


def percent(value, digits: int = 1, *, missing: str = "–") -> str:
    """A fraction as a percentage (0.125 -> ``12.5%``); None/NaN/inf as ``missing``."""
    if value is None or not math.isfinite(value):
        return missing
    return f"{value:.{digits}%}"


def markdown_table(
    rows: Iterable[Mapping], columns: Sequence[str], *, headers=None, fmt=None
) -> str:
    """A GitHub markdown table; ``fmt(value, column)`` formats a cell (default: number)."""
    fmt = fmt or (lambda v, c: number(v))
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c), c) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(rows: Iterable[Mapping], path, columns: Sequence[str]) -> pathlib.Path:
    """``rows`` restricted to ``columns``, written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in columns})
    return files.write_text(buf.getvalue(), path)
