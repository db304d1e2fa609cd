"""The spool file: usage rows as JSON lines, appended while the database is away and
replayed once it answers; and beside it, the rows the database refused."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any


def refused_path_of(spool_path: str) -> str:
    """Where refused rows are kept: beside the spool, ``usage-spool.refused.jsonl`` say."""
    root, extension = os.path.splitext(spool_path)
    return f"{root}.refused{extension or '.jsonl'}"


def append_lines(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows as JSON lines and make them durable (runs in a thread)."""
    data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def read_lines(path: str) -> list[dict[str, Any]]:
    """The rows of a spool file (a torn last line is skipped); runs in a thread."""
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("request_id"):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows


def remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
