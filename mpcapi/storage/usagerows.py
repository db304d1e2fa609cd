"""Usage rows into the database: the ledger's INSERT statements, and the writer process
that runs them (``python -m mpcapi.storage.usagerows``, started by ``mpcapi.ledger.rowwriter``).

The process reads batches of rows from its stdin, one JSON list per line, and answers each on
its stdout, one JSON object per line: ``{"stored": n}`` (rows new to the database; a request id
already there is skipped), or ``{"error": "..."}`` when the database could not take the batch
(unreachable, or its usage table is). A batch that fails while the database answers is
stored row by row: the answer then also lists the rows it refused alone, by position, with
the reason (``"refused": [[position, "..."], ...]``), so that one bad row never holds back
the others. Text is stored as it came, except that PostgreSQL, which cannot hold a NUL
character, gets U+FFFD in its place. It ends when its stdin closes. It imports no Twisted
and, for SQLite, no PostgreSQL driver: it is one more process per worker, so it stays small.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from mpcapi.storage.database import SyncDatabase, unavailable

if TYPE_CHECKING:
    from mpcapi.storage.database import Cursor

URL_ENV = "MPCAPI_ROWWRITER_DATABASE_URL"  # where the process finds its database

COLUMNS = (
    "request_id",
    "created_at",
    "key_id",
    "user",
    "client",
    "method",
    "route",
    "model",
    "status",
    "upstream_status",
    "latency_ms",
    "upstream_ms",
    "ttfb_ms",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "cost_source",
    "cache",
    "outcome",
    "request_body",
    "response_body",
    "trace_id",
    "cache_read_tokens",
    "cache_write_tokens",
    "units",
    "unit",
    "team_id",
)


def _quoted(column: str) -> str:
    return '"user"' if column == "user" else column


# Rows per SQLite INSERT statement, largest first: a batch is cut into these sizes only, so
# the driver prepares (and keeps) four statements, not one per batch size. 200 rows are
# 5,200 parameters, under SQLite's limit.
STATEMENT_SIZES = (200, 50, 10, 1)


# PostgreSQL takes a batch as one array per column (``unnest``): a short statement that
# psycopg parses once, where it would parse a long VALUES list (thousands of placeholders)
# again on every execution.
_PG_TYPES = {
    "status": "integer",
    "upstream_status": "integer",
    "prompt_tokens": "integer",
    "completion_tokens": "integer",
    "latency_ms": "double precision",
    "upstream_ms": "double precision",
    "ttfb_ms": "double precision",
    "cost_usd": "double precision",
    "cache_read_tokens": "integer",
    "cache_write_tokens": "integer",
    "units": "double precision",
}
_PG_ARRAYS = ", ".join(f"?::{_PG_TYPES.get(column, 'text')}[]" for column in COLUMNS)
_PG_INSERT = (
    f"INSERT INTO usage ({', '.join(_quoted(c) for c in COLUMNS)}) "
    f"SELECT * FROM unnest({_PG_ARRAYS}) ON CONFLICT (request_id) DO NOTHING"
)


@functools.cache
def insert_statement(rows: int) -> str:
    """One INSERT of ``rows`` rows that skips request ids already stored."""
    one = f"({', '.join('?' for _ in COLUMNS)})"
    return (
        f"INSERT INTO usage ({', '.join(_quoted(c) for c in COLUMNS)}) "
        f"VALUES {', '.join([one] * rows)} ON CONFLICT (request_id) DO NOTHING"
    )


_DEFAULTS = {
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "cost_usd": 0.0,
    "cost_source": "none",
    "cache_read_tokens": 0,
    "cache_write_tokens": 0,
}


def insert_rows(cursor: Cursor, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert rows, skipping request ids already stored; return how many were new."""
    if cursor.dialect.name == "postgresql":
        columns = [[_pg_value(_value(row, column)) for row in rows] for column in COLUMNS]
        return max(cursor.execute(_PG_INSERT, columns).rowcount, 0) if rows else 0
    # SQLite: many rows per statement, one database step (one release of the GIL) for up to
    # 200 rows, where executemany would take one per row.
    stored, start = 0, 0
    while start < len(rows):
        size = next(size for size in STATEMENT_SIZES if size <= len(rows) - start)
        chunk = rows[start : start + size]
        start += size
        values = [_value(row, column) for row in chunk for column in COLUMNS]
        stored += max(cursor.execute(insert_statement(size), values).rowcount, 0)
    return stored


def _value(row: Mapping[str, Any], column: str) -> Any:
    value = row.get(column)
    return _DEFAULTS.get(column) if value is None else value


def _pg_value(value: Any) -> Any:
    """PostgreSQL's text cannot hold NUL (a client may send one, in a model name say)."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def store(database: SyncDatabase, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer to one batch (see the module): all its rows at once or, when that fails
    on the data while the database answers, one by one."""
    try:
        return {"stored": database.run(insert_rows, rows)}
    except Exception as failure:
        database.close()  # a broken connection is made anew
        if not _rows_fault(database, failure):
            return {"error": database.dialect.describe(failure)}
    stored, refused = 0, []
    for position, row in enumerate(rows):
        try:
            stored += database.run(insert_rows, [row])
        except Exception as failure:
            database.close()
            if not _rows_fault(database, failure):  # rows stored so far are skipped next time
                return {"error": database.dialect.describe(failure)}
            refused.append([position, database.dialect.describe(failure)])
    return {"stored": stored, "refused": refused}


def _rows_fault(database: SyncDatabase, error: Exception) -> bool:
    """Whether ``error`` is the rows' fault (data the database refuses), not the database's:
    unavailable (see ``database.unavailable``) or without its usage table. Only the rows'
    fault is worth a refusal; anything else is tried again later, whole."""
    if unavailable(error):
        return False
    try:
        database.run(lambda cursor: cursor.execute("SELECT request_id FROM usage WHERE 1 = 0"))
    except Exception:
        database.close()
        return False
    return True


def serve(database_url: str, lines: BinaryIO, answers: BinaryIO) -> None:
    """The writer process: store each batch read from ``lines``, answer on ``answers``."""
    database = SyncDatabase(database_url)
    migrated = False
    try:
        for line in lines:
            rows = orjson.loads(line)
            answer: dict[str, Any]
            try:
                if not migrated:  # the usage table, if this writer is the first to need it
                    database.migrate()
                    migrated = True
            except Exception as failure:  # this batch failed; the process serves the next
                database.close()  # a broken connection is made anew for the next batch
                answer = {"error": database.dialect.describe(failure)}
            else:
                answer = store(database, rows)
            answers.write(orjson.dumps(answer) + b"\n")
            answers.flush()
    finally:
        database.close()


def main() -> None:
    url = os.environ.get(URL_ENV)
    if not url:
        sys.stderr.write(f"mpcapi.storage.usagerows: {URL_ENV} is not set\n")
        raise SystemExit(2)
    # A terminal's Ctrl-C reaches the whole process group: the daemon stops, then closes
    # our stdin once its last rows are here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(url, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
