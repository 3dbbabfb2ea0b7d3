"""Markdown text helpers shared by every floor (candidate summaries, Dagster metadata)."""

from __future__ import annotations


def markdown_table(columns: list[str], rows) -> str:
    """A markdown table for Dagster metadata; cell text is escaped so a '|' (as in the
    partition key '0|pos') cannot split a cell."""

    def cell(value) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
