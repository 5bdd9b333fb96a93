"""Markdown results table laid out like the paper's Table 1.

Rows are benchmarks plus an Average row; columns are modes or checkpoints; every column after the
first shows its delta against the first, e.g. ``33.40 (+2.60)``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

MISSING = "–"


def _cell(value: float | None, base: float | None, with_delta: bool) -> str:
    if value is None:
        return MISSING
    text = f"{value:.2f}"
    if with_delta and base is not None:
        delta = round(value - base, 2) + 0.0  # +0.0 turns -0.0 into 0.0
        text += f" ({delta:+.2f})"
    return text


def markdown_table(
    scores: Mapping[str, Mapping[str, float]],
    *,
    columns: Sequence[str] | None = None,
    benchmarks: Sequence[str] | None = None,
    average: bool = True,
    row_header: str = "Benchmark",
) -> str:
    """Formats ``scores[column][benchmark]`` (percent) as a Markdown table.

    Args:
      scores: per column (mode / checkpoint), per benchmark, a score in percent.
      columns: column order (default: insertion order); the first is the delta baseline.
      benchmarks: row order (default: first-seen order across columns).
      average: add a bold **Average** row: each column's mean over the benchmarks it has. A column
        missing some benchmark gets its average marked with ``*`` (not comparable).
      row_header: the first header cell.
    """
    columns = list(columns if columns is not None else scores)
    if not columns:
        raise ValueError("markdown_table: no columns")
    for c in columns:
        if c not in scores:
            raise ValueError(f"markdown_table: no scores for column {c!r}")
    if benchmarks is None:
        benchmarks = []
        for c in columns:
            benchmarks += [b for b in scores[c] if b not in benchmarks]
    rows = [
        [b] + [_cell(scores[c].get(b), scores[columns[0]].get(b), i > 0) for i, c in enumerate(columns)]
        for b in benchmarks
    ]
    if average and benchmarks:
        avgs, complete = [], []
        for c in columns:
            vals = [scores[c][b] for b in benchmarks if b in scores[c]]
            avgs.append(sum(vals) / len(vals) if vals else None)
            complete.append(len(vals) == len(benchmarks))
        cells = []
        for i, (a, ok) in enumerate(zip(avgs, complete)):
            cell = _cell(a, avgs[0], i > 0)
            cells.append(cell if ok or a is None else cell + "*")
        rows.append(["**Average**"] + cells)
    header = [row_header] + list(columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
