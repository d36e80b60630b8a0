"""Plain-text tables (markdown pipes) for reports, benchmarks and the CLI; no torch needed."""

from __future__ import annotations

from typing import Any, Sequence


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table (markdown pipes) of ``rows``; floats printed with 4 significant digits.

    Columns default to every key of the rows, in order of first appearance; a missing
    value prints as ``-``.

    >>> print(format_table([{"arm": "random-64", "recall@1": 0.14712}]))
    | arm       | recall@1 |
    |-----------|----------|
    | random-64 | 0.1471   |
    """
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(b) for b in body)])
