"""Tables for the `pool` command: each column as wide as its widest cell, so long names (templates
may have 63 characters) never push the other columns out of line."""
from __future__ import annotations

from typing import Iterable, Sequence


def render(headers: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = ()) -> str:
    """The table as text: a header line, then one line per row. Columns whose index is in right
    are right-aligned (numbers); the last column is never padded."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = set(right)
    last = len(headers) - 1
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else (c if i == last else c.ljust(w))
                 for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
