"""Pieces of the benchmarks' markdown tables: numbers, cells, rows, and the marks a cell carries
(``~``: its timed calls spread widely; ``†`` ...: measured on another device than most)."""

from __future__ import annotations

import collections
from typing import Dict, Iterable, List, Sequence, Tuple

SPREAD_MARK_PCT = 20.0  # cells whose timed calls spread more (max - min over the median): "~"
SPREAD_NOTE = (f"~ = the timed calls spread more than {SPREAD_MARK_PCT:g}% (max - min over the "
               "median, which is reported).")
DEVICE_MARKS = ("†", "‡", "§", "¶")


def num(x, fmt: str = "{:.4g}") -> str:
    """A number in ``fmt``; '' for anything else (a missing value)."""
    return fmt.format(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else ""


def cell(text: str, limit: int = 0) -> str:
    """Text that cannot break a table row (no '|', no newline), cut to ``limit`` if given."""
    text = str(text)[:limit] if limit else str(text)
    return text.replace("|", "/").replace("\n", " ")


def row(cells: Iterable) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: Sequence[str], rows: Iterable[Sequence]) -> List[str]:
    """The lines of a table: header, separator, rows."""
    return [row(header), "|" + "---|" * len(header)] + [row(r) for r in rows]


def spread_mark(timing: dict) -> str:
    """"~" when a timing's calls spread more than SPREAD_MARK_PCT, else ""."""
    return "~" if (timing or {}).get("spread_pct", 0.0) > SPREAD_MARK_PCT else ""


def device_marks(devices: Iterable[str]) -> Tuple[str, Dict[str, str]]:
    """(the device of most cells, {every other device: its mark}) of a table whose cells name
    the device they were measured on (a merged table may hold several GPUs' cells)."""
    counts = collections.Counter(devices)
    if not counts:
        return "", {}
    main = counts.most_common(1)[0][0]
    others = sorted(d for d in counts if d != main)
    return main, dict(zip(others, DEVICE_MARKS))


def device_note(main: str, marks: Dict[str, str]) -> str:
    """The line under a table that has cells of other devices ('' when it has none)."""
    if not marks:
        return ""
    return ("Measured on another device: " + "; ".join(f"{m} {d}" for d, m in marks.items())
            + f" (unmarked: {main}).")
