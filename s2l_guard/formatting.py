"""How numbers are written in tables and reports: one interval format, one count format."""

from __future__ import annotations

from typing import Sequence


def format_interval(value: float, ci: Sequence[float] | None, *, signed: bool = False, digits: int = 3) -> str:
    """``0.632 [0.556, 0.704]`` (``+0.008 [-0.020, +0.031]`` when signed); the value alone without an interval."""
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(value)} [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else f.format(value)


def format_entry(entry: dict | None, *, signed: bool = False) -> str:
    """A result entry (``value``, ``delta`` or ``rate``, with ``ci95``) as an interval; ``-`` when absent."""
    if not entry:
        return "-"
    value = entry.get("value", entry.get("delta", entry.get("rate")))
    return format_interval(value, entry.get("ci95"), signed=signed)


def short_count(n: int) -> str:
    """1234567 -> ``1.2M``, 2048 -> ``2.0K``: parameter counts in tables."""
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
