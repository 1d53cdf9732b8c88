"""Compare a run's S2L table with the published one (docs/standard-table.md), entry by entry.

    .venv/bin/python docs/calibration/table_diff.py runs/standard-<hash>/table.md [--published docs/standard-table.md]

Prints how many printed entries agree and each one that does not (row, column, published, run);
exits 1 when any differs. Lines that are not table rows (the page's prose) are ignored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PUBLISHED = Path(__file__).resolve().parents[1] / "standard-table.md"


def entries(text: str) -> dict[tuple[int, str, str], str]:
    """Every cell of every Markdown table in ``text``, keyed by (table number, row's first cell, column header)."""
    found, table, header = {}, -1, None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            table, header = table + 1, cells
        elif not set("".join(cells)) <= set("-: "):
            found |= {(table, cells[0], column): value for column, value in zip(header[1:], cells[1:])}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_table", help="a run's table.md")
    parser.add_argument("--published", default=str(PUBLISHED), help="the published page (default: docs/standard-table.md)")
    args = parser.parse_args()
    published, run = entries(Path(args.published).read_text()), entries(Path(args.run_table).read_text())
    differ = sorted(k for k in published.keys() | run.keys() if published.get(k) != run.get(k))
    print(f"{len(published) - sum(k in published for k in differ)} of {len(published)} published entries agree")
    for table, row, column in differ:
        print(f"table {table + 1}, {row} / {column}: published {published.get((table, row, column))!r}, run {run.get((table, row, column))!r}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
