"""The daemon's database access survives a PostgreSQL restart (mpcapi.database)."""

from __future__ import annotations

import psycopg
import pytest_twisted
from twisted.internet import reactor, threads

from mpcapi.storage.database import Database, lost_connection, unavailable
from tests.support.databases import own_postgres


def test_only_a_connection_that_broke_counts_as_lost() -> None:
    assert lost_connection(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert lost_connection(psycopg.errors.AdminShutdown("terminating connection"))
    assert not lost_connection(psycopg.OperationalError("connection failed: refused"))
    assert not lost_connection(psycopg.errors.QueryCanceled("statement timeout"))
    assert not lost_connection(psycopg.errors.UndefinedTable("no such table"))
    assert not lost_connection(ValueError("not a database error"))


@pytest_twisted.ensureDeferred
async def test_the_first_query_after_a_restart_is_answered() -> None:
    with own_postgres() as server:
        database = Database(server.url, reactor)
        try:
            count = lambda cursor: cursor.execute("SELECT 1").fetchone()[0]  # noqa: E731
            # Every pooled connection has been used once, then the server restarts.
            answers = [database.run(count) for _ in range(Database.POSTGRES_MAX_CONNECTIONS * 2)]
            assert [await answer for answer in answers] == [1] * (
                Database.POSTGRES_MAX_CONNECTIONS * 2
            )
            await threads.deferToThread(server.stop)
            await threads.deferToThread(server.start)
            assert await database.run(count) == 1
        finally:
            database.close()


def test_unavailable_tells_the_databases_state_from_a_refusal_of_the_data() -> None:
    import sqlite3

    import psycopg

    for state in (
        sqlite3.OperationalError("database is locked"),
        psycopg.OperationalError("connection failed"),
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
        psycopg.InterfaceError("the connection is closed"),
    ):
        assert unavailable(state), state
    for refusal in (
        sqlite3.IntegrityError("NOT NULL constraint failed"),
        sqlite3.InterfaceError("Error binding parameter 1"),
        psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),
        psycopg.errors.NumericValueOutOfRange("integer out of range"),
        OverflowError("Python int too large to convert to SQLite INTEGER"),
    ):
        assert not unavailable(refusal), refusal
