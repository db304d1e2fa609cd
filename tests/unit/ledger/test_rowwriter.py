"""The usage rows' writer process (mpcapi.ledger.rowwriter, mpcapi.storage.usagerows): a real
child process, real databases."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.utils import getProcessOutputAndValue

from mpcapi.ledger.ledger import UsageLedger
from mpcapi.ledger.prices import PriceTable
from mpcapi.ledger.rowwriter import Inserted, RowWriter, WriterGoneError
from mpcapi.ledger.spool import read_lines
from mpcapi.storage.database import Database, DatabaseError, SyncDatabase
from mpcapi.storage.usagerows import COLUMNS, URL_ENV, serve, store
from tests.support.databases import database_url, sqlite_url
from tests.support.exchanges import exchange
from tests.support.logs import captured

REFUSED_URL = "postgresql://postgres@127.0.0.1:1/test?connect_timeout=2"


def row(request_id: str, **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict.fromkeys(COLUMNS)
    values.update(
        request_id=request_id,
        created_at="2026-11-27T12:00:00.000Z",
        route="/chat/completions",
        model="gpt-4o-mini",
        status=200,
        prompt_tokens=3,
        completion_tokens=1,
        cost_usd=0.5,
        cost_source="litellm",
    )
    values.update(fields)
    return values


def stored(url: str) -> list[tuple[Any, ...]]:
    database = SyncDatabase(url)
    try:
        return database.run(
            lambda cursor: cursor.execute(
                "SELECT request_id, cost_usd, response_body FROM usage ORDER BY request_id"
            ).fetchall()
        )
    finally:
        database.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database_url(request.param, tmp_path) as url:
        yield url


@pytest_twisted.ensureDeferred
async def test_batches_are_stored_by_the_child_and_a_replayed_id_is_skipped(url: str) -> None:
    writer = RowWriter(reactor, url)
    try:
        first = await writer.insert([row("a"), row("b", response_body="line\nbreak, ünïcode")])
        again = await writer.insert([row("b"), row("c")])  # b is stored already
    finally:
        await writer.close()
    assert (first, again) == (Inserted(2), Inserted(1))
    assert stored(url) == [("a", 0.5, None), ("b", 0.5, "line\nbreak, ünïcode"), ("c", 0.5, None)]


@pytest_twisted.ensureDeferred
async def test_an_unreachable_database_fails_the_batch_with_its_reason() -> None:
    writer = RowWriter(reactor, REFUSED_URL)
    try:
        with pytest.raises(DatabaseError) as refused:
            await writer.insert([row("a")])
        # The writer stays up for the next attempt.
        with pytest.raises(DatabaseError):
            await writer.insert([row("b")])
    finally:
        await writer.close()
    assert 'connection to server at "127.0.0.1", port 1 failed' in str(refused.value)
    assert not isinstance(refused.value, WriterGoneError)


@pytest_twisted.ensureDeferred
async def test_a_writer_that_dies_fails_its_batch_and_the_next_batch_starts_another(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    writer = RowWriter(reactor, url)
    try:
        assert (await writer.insert([row("a")])).stored == 1
        process: Any = writer._process
        os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(WriterGoneError):
            await writer.insert([row("b")])
        assert (await writer.insert([row("c")])).stored == 1
        assert writer._process.pid != process.pid
    finally:
        await writer.close()
    assert [r[0] for r in stored(url)] == ["a", "c"]


@pytest_twisted.ensureDeferred
async def test_close_waits_for_the_last_batch_then_the_child_is_gone(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    writer = RowWriter(reactor, url)
    last = writer.insert([row(f"r{n:03}") for n in range(300)])
    pid = writer._process.pid
    await writer.close()
    assert (await last).stored == 300
    assert len(stored(url)) == 300
    with pytest.raises(ProcessLookupError):  # the child has ended and been reaped
        os.kill(pid, 0)
    assert await writer.close() is None  # closing twice is harmless


@pytest_twisted.ensureDeferred
async def test_a_writer_with_no_database_url_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if k != URL_ENV}
    _, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "mpcapi.storage.usagerows"], env=env
    )
    assert code == 2
    assert b"MPCAPI_ROWWRITER_DATABASE_URL is not set" in err


@pytest_twisted.ensureDeferred
async def test_a_row_that_cannot_be_encoded_is_refused_and_the_rest_stored(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    writer = RowWriter(reactor, url)
    huge = row("huge", prompt_tokens=2**70)
    try:
        alone = await writer.insert([huge])  # never reaches the child
        mixed = await writer.insert([row("fine"), huge, row("fine too")])
        after = await writer.insert([row("next")])  # its answer is its own
    finally:
        await writer.close()
    assert alone.stored == 0 and [r for r, _ in alone.refused] == [huge]
    assert "cannot be encoded" in alone.refused[0][1]
    assert mixed.stored == 2 and [r for r, _ in mixed.refused] == [huge]
    assert after == Inserted(1)
    assert [r[0] for r in stored(url)] == ["fine", "fine too", "next"]


@pytest_twisted.ensureDeferred
async def test_a_row_the_database_refuses_is_refused_alone_and_the_rest_stored(url: str) -> None:
    # Past a 64-bit integer for SQLite, past PostgreSQL's integer column: refused either way.
    poison = row("poison", prompt_tokens=2**63)
    writer = RowWriter(reactor, url)
    try:
        batch = await writer.insert([row("a"), poison, row("b")])
        alone = await writer.insert([row("c"), poison])  # the same row again, and a new one
        after = await writer.insert([row("d")])
    finally:
        await writer.close()
    assert batch.stored == 2 and [r for r, _ in batch.refused] == [poison]
    assert "too large" in batch.refused[0][1] or "out of range" in batch.refused[0][1]
    assert alone.stored == 1 and [r for r, _ in alone.refused] == [poison]
    assert after == Inserted(1)
    assert [r[0] for r in stored(url)] == ["a", "b", "c", "d"]


@pytest_twisted.ensureDeferred
async def test_a_nul_in_text_is_stored_where_postgresql_cannot_hold_it(url: str) -> None:
    writer = RowWriter(reactor, url)
    try:
        assert await writer.insert([row("nul", response_body="a\x00b")]) == Inserted(1)
    finally:
        await writer.close()
    ((_, _, body),) = stored(url)
    assert body == ("a\ufffdb" if url.startswith("postgresql") else "a\x00b")


def test_serve_refuses_a_malformed_row_and_serves_the_next(tmp_path: Path) -> None:
    lines = io.BytesIO(b"[1]\n" + orjson.dumps([row("a")]) + b"\n")
    answers = io.BytesIO()
    serve(sqlite_url(tmp_path), lines, answers)
    first, second = (orjson.loads(line) for line in answers.getvalue().splitlines())
    assert first["stored"] == 0
    [[position, reason]] = first["refused"]
    assert position == 0 and "get" in reason
    assert second == {"stored": 1}


def test_serve_answers_a_batch_the_database_cannot_take_with_its_error(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    SyncDatabase(url).migrate()
    database = SyncDatabase(url)
    database.run(lambda cursor: cursor.execute("DROP TABLE usage"))
    database.close()
    # The writer migrates first: with the table gone and a migration already recorded, the
    # database cannot take any row: an error, not one refusal per row.
    lines = io.BytesIO(orjson.dumps([row("a"), row("b")]) + b"\n")
    answers = io.BytesIO()
    serve(url, lines, answers)
    (answer,) = (orjson.loads(line) for line in answers.getvalue().splitlines())
    assert set(answer) == {"error"} and "usage" in answer["error"]


def test_serve_answers_each_line_in_order(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    lines = io.BytesIO(
        orjson.dumps([row("a")]) + b"\n" + orjson.dumps([row("a"), row("b")]) + b"\n"
    )
    answers = io.BytesIO()
    serve(url, lines, answers)
    assert [orjson.loads(line) for line in answers.getvalue().splitlines()] == [
        {"stored": 1},
        {"stored": 1},
    ]


@pytest_twisted.ensureDeferred
async def test_the_ledger_inserts_through_its_writer_and_stops_it_when_it_stops(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    database = Database(url, reactor)
    writer = RowWriter(reactor, url)
    ledger = UsageLedger(
        database,
        reactor,
        PriceTable.load(),
        str(tmp_path / "spool.jsonl"),
        lambda fn, *args: threads.deferToThread(fn, *args),
        writer=writer,
    )
    ledger.startService()
    try:
        for n in range(3):
            ledger.observe(
                exchange(**{"request_id": f"r{n}", "route": "/chat/completions", "status": 200})
            )
        await ledger.flush()
        pid = writer._process.pid
        assert [r[0] for r in stored(url)] == ["r0", "r1", "r2"]
        ledger.observe(
            exchange(**{"request_id": "r3", "route": "/chat/completions", "status": 200})
        )
    finally:
        await ledger.stopService()
        database.close()
    assert [r[0] for r in stored(url)] == ["r0", "r1", "r2", "r3"]  # the last row, at stop
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(tmp_path / "spool.jsonl")


@pytest_twisted.ensureDeferred
async def test_the_ledger_sets_a_refused_row_aside_and_stores_the_rest(tmp_path: Path) -> None:
    """A row the database refuses while it answers (tokens past the column's range, from a
    broken upstream) is logged and kept beside the spool; it does not hold back later rows,
    nor does it make the ledger count the database as down."""
    url = sqlite_url(tmp_path)
    database = Database(url, reactor)
    spool = tmp_path / "spool.jsonl"
    reported: list[int] = []
    ledger = UsageLedger(
        database,
        reactor,
        PriceTable.load(),
        str(spool),
        lambda fn, *args: threads.deferToThread(fn, *args),
        writer=RowWriter(reactor, url),
        report_refused=reported.append,  # what the metrics are told
    )
    base = {"route": "/chat/completions", "status": 200}
    ledger.startService()
    with captured("mpcapi.ledger") as events:
        try:
            ledger.observe(exchange(**{**base, "request_id": "before"}))
            ledger.observe(exchange(**{**base, "request_id": "poison", "prompt_tokens": 2**63}))
            await ledger.flush()
            ledger.observe(exchange(**{**base, "request_id": "after"}))
            await ledger.flush()
        finally:
            await ledger.stopService()
            database.close()
    assert [r[0] for r in stored(url)] == ["after", "before"]
    assert ledger.database_up and ledger.refused == 1 and not spool.exists()
    assert reported == [1]
    assert ledger.refused_path == str(tmp_path / "spool.refused.jsonl")
    (kept,) = read_lines(ledger.refused_path)
    assert kept["request_id"] == "poison" and kept["prompt_tokens"] == 2**63
    assert "too large" in kept["refused_because"]
    refusals = [e for e in events if "refused by the database" in e["log_format"]]
    assert [e["request_id"] for e in refusals] == ["poison"]


def test_a_locked_database_fails_the_batch_whole_and_refuses_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding SQLite's write lock is the database's state, not the rows'
    fault: the batch fails whole (the ledger spools it and tries again), no row is refused."""
    url = sqlite_url(tmp_path)
    SyncDatabase(url).migrate()
    monkeypatch.setattr("mpcapi.storage.database.SQLITE_BUSY_TIMEOUT", 0.1)
    holder = sqlite3.connect(url.removeprefix("sqlite:///"))
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held
    try:
        database = SyncDatabase(url)
        answer = store(database, [row("a"), row("b")])
        database.close()
    finally:
        holder.rollback()
        holder.close()
    assert set(answer) == {"error"} and "locked" in answer["error"]
    assert stored(url) == []
