"""A run's ``metrics.jsonl``: one JSON object per log line, read back line by line, a line that
cannot be read kept aside in ``metrics.jsonl.damaged`` (never deleted), rows written whole.
:mod:`pureflax.rundir` exports the names its callers use.

Examples:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> write_rows(path, [{"global_step": 2, "loss": 1.0}, {"global_step": 4, "loss": 0.5}])
    >>> rows_up_to(read_log(path).rows, 3)
    [{'global_step': 2, 'loss': 1.0}]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple


class Log(NamedTuple):
    """``metrics.jsonl`` as read: its rows, the lines in the middle that are not rows, and a last line cut short."""

    rows: list[dict[str, Any]]
    damaged: list[tuple[int, bytes]]  # (line number, the line's bytes): kept in metrics.jsonl.damaged, never deleted
    cut: bytes | None  # a last line with no newline that does not parse: a write cut short, written again


def _row(line: bytes) -> dict[str, Any] | None:
    """A log line as its row, or ``None``: strict JSON (no NaN or Infinity), an object."""
    try:
        row = json.loads(line, parse_constant=_refuse_constant)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_log(path: Path) -> Log:
    """The rows of ``metrics.jsonl``; a line that cannot be read is reported, never silently lost.

    Args:
        path: the log file; one that does not exist reads as an empty log.

    Returns:
        The rows, the damaged lines and a last line cut short (see :class:`Log`).
    """
    if not path.exists():
        return Log([], [], None)
    lines = path.read_bytes().split(b"\n")
    last = lines.pop()  # b"" when the file ends with a newline, else a line whose write was cut short
    rows, damaged, cut = [], [], None
    for number, line in enumerate(lines, 1):
        row = _row(line)
        if row is not None:
            rows.append(row)
        elif line.strip():
            damaged.append((number, line))
    if last.strip():
        row = _row(last)
        rows, cut = (rows + [row], None) if row is not None else (rows, last)
    return Log(rows, damaged, cut)


def rows_up_to(rows: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """The rows a resume at ``step`` keeps: those logged by then (the final row is written again).

    Args:
        rows: the log's rows, in order.
        step: the global step the run resumes from.

    Returns:
        The rows with a ``global_step`` of at most ``step``.
    """
    return [row for row in rows if "global_step" in row and row["global_step"] <= step]


def dumps(row: dict[str, Any]) -> str:
    """One log line: strict JSON.

    Args:
        row: the row to write.

    Returns:
        The row as one line of JSON, without its newline.

    Raises:
        ValueError: the row holds a NaN or an infinity (it never becomes ``NaN`` in the log).
    """
    return json.dumps(row, allow_nan=False)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace the log at ``path`` by ``rows`` in one rename, so a stop leaves the old log or the new one.

    Args:
        path: the log file.
        rows: the rows it holds afterwards, one line each.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def keep_damaged(path: Path, damaged: list[tuple[int, bytes]]) -> Path:
    """Append the unreadable lines to ``<log>.damaged``, each after its line number (``line 2: ...``).

    Args:
        path: the log file the lines were read from.
        damaged: ``(line number, the line's bytes)`` of each line, as :func:`read_log` reports them.

    Returns:
        The ``.damaged`` file they were appended to.
    """
    kept = path.with_name(path.name + ".damaged")
    with open(kept, "ab") as f:
        f.write(b"".join(b"line %d: %s\n" % (number, line) for number, line in damaged))
    return kept
