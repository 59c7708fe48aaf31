"""A run's ``metrics.jsonl``: one JSON object per log line, read back line by line, a line that
cannot be read kept aside in ``metrics.jsonl.damaged`` (never deleted), rows written whole.
:mod:`pureflax.rundir` exports these names."""

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
    """The rows of ``metrics.jsonl``; a line that cannot be read is reported, never silently lost (see :class:`Log`)."""
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
    """The rows a resume at ``step`` keeps: those logged by then (the final row is written again)."""
    return [row for row in rows if "global_step" in row and row["global_step"] <= step]


def dumps(row: dict[str, Any]) -> str:
    """One log line: strict JSON (a NaN or an infinity raises ``ValueError``, never becomes ``NaN``)."""
    return json.dumps(row, allow_nan=False)


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def _keep_damaged(path: Path, damaged: list[tuple[int, bytes]]) -> Path:
    """Append the unreadable lines to ``<log>.damaged``, each after its line number (``line 2: ...``)."""
    kept = path.with_name(path.name + ".damaged")
    with open(kept, "ab") as f:
        f.write(b"".join(b"line %d: %s\n" % (number, line) for number, line in damaged))
    return kept


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
    return f"line{'s' if len(numbers) > 1 else ''} {shown}"
