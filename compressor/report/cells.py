"""Cells of report.md's tables and sentences: numbers, shares, points, times and sizes as text.

Every formatter takes a value that may be missing or not a number and shows it as
MISSING then, never failing.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from compressor.report.plots import is_number

MISSING = "—"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [row(headers), row(rule)] + [row(cells) for cells in rows]
    return "\n".join(lines)


def row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def integer(value: Any) -> str:
    return f"{value:,}" if is_number(value) else MISSING


def percent(value: Any, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%" if is_number(value) else MISSING


def points(value: Any) -> str:
    return f"{100 * value:.2f} points" if is_number(value) else MISSING


def change_points(before: Any, after: Any) -> str:
    if not is_number(before) or not is_number(after):
        return MISSING
    return f"{100 * (after - before):+.2f} points"


def ratio(value: Any, base: Any) -> str:
    return times(value / base) if is_number(value) and is_number(base) and base else MISSING


def times(value: Any) -> str:
    return f"{value:.3f}×" if is_number(value) else MISSING


def ms(value: Any) -> str:
    return f"{value:.3f} ms" if is_number(value) else MISSING


def size(value: Any) -> str:
    if not is_number(value):
        return MISSING
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def arrow(before: Any, after: Any) -> str:
    if before is None and after is None:
        return MISSING
    return f"{integer(before)} → {integer(after)}"
