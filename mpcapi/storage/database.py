"""The project's database: SQLite or PostgreSQL, its schema migrations, and two ways in.

``MPCAPI_DATABASE_URL`` is ``sqlite:///<path>`` (relative to the working directory;
``sqlite:////abs/path`` for an absolute one) or ``postgresql://…`` (any libpq URI).

- ``Database``: the daemon's non-blocking access, on ``twisted.enterprise.adbapi``: every
  query runs in the pool's thread, the reactor gets a Deferred.
- ``SyncDatabase``: the same for command-line tools (``mpcapi-admin``), plain blocking calls.

Both run the same functions: ``fn(cursor, *args)``, where ``cursor`` takes SQL written with
``?`` placeholders on either database (``Cursor`` translates them for psycopg's ``%s``).
Schema changes are ``MIGRATIONS``, one ordered list; both ways in apply the missing ones
before their first query, inside one transaction under a lock, and record them in
``schema_migrations``. A new migration is appended, never edited once released.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import attrs

if TYPE_CHECKING:  # imported when used: the usage row writer process runs without Twisted
    from twisted.enterprise import adbapi
    from twisted.internet import defer

P = ParamSpec("P")
T = TypeVar("T")

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")
# Held (per transaction) while migrations run, so that workers starting together take turns.
_POSTGRES_MIGRATION_LOCK = 0x6D7063617069  # "mpcapi"
POSTGRES_CONNECT_TIMEOUT = 10  # seconds
SQLITE_BUSY_TIMEOUT = 5.0  # seconds to wait for another writer (the CLI, another worker)


class DatabaseError(Exception):
    """The database cannot be opened or used; the message says which and why."""


@attrs.frozen
class Migration:
    """One schema change: its version (1, 2, …), a name, and its statements."""

    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "client keys",
        (
            # id is public (logs, mpcapi-admin); key_hash is the SHA-256 hex of the secret,
            # which is never stored. rpm/tpm NULL: the daemon's defaults apply; 0: unlimited.
            # Times are ISO-8601 UTC text, the same on both databases.
            """CREATE TABLE client_keys (
                id TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL,
                "user" TEXT NOT NULL,
                rpm INTEGER,
                tpm INTEGER,
                budget_usd DOUBLE PRECISION,
                created_at TEXT NOT NULL,
                revoked_at TEXT
            )""",
            "CREATE UNIQUE INDEX client_keys_key_hash ON client_keys (key_hash)",
            'CREATE INDEX client_keys_user ON client_keys ("user")',
        ),
    ),
    Migration(
        2,
        "usage ledger",
        (
            # One row per finished request (see mpcapi.ledger); request_id is unique, so a
            # replayed row is never stored twice. created_at: ISO-8601 UTC with milliseconds.
            """CREATE TABLE usage (
                request_id TEXT PRIMARY KEY,
                created_at TEXT NOT NULL,
                key_id TEXT,
                "user" TEXT,
                client TEXT,
                method TEXT,
                route TEXT,
                model TEXT,
                status INTEGER,
                upstream_status INTEGER,
                latency_ms DOUBLE PRECISION,
                upstream_ms DOUBLE PRECISION,
                ttfb_ms DOUBLE PRECISION,
                prompt_tokens INTEGER NOT NULL DEFAULT 0,
                completion_tokens INTEGER NOT NULL DEFAULT 0,
                cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
                cost_source TEXT NOT NULL,
                cache TEXT,
                outcome TEXT,
                request_body TEXT,
                response_body TEXT
            )""",
            "CREATE INDEX usage_created_at ON usage (created_at)",
            "CREATE INDEX usage_model ON usage (model, created_at)",
            'CREATE INDEX usage_user ON usage ("user", created_at)',
            "CREATE INDEX usage_key_id ON usage (key_id, created_at)",
        ),
    ),
    Migration(
        3,
        "usage trace ids",
        # The W3C trace id of the call when tracing is on (see mpcapi.tracing).
        ("ALTER TABLE usage ADD COLUMN trace_id TEXT",),
    ),
    Migration(
        4,
        "stored objects and usage details",
        (
            # Who made each response, file and batch LiteLLM stores (see policy.ownership):
            # owner is the client key's id.
            """CREATE TABLE stored_objects (
                kind TEXT NOT NULL,
                id TEXT NOT NULL,
                owner TEXT NOT NULL,
                created_at TEXT NOT NULL,
                PRIMARY KEY (kind, id)
            )""",
            "CREATE INDEX stored_objects_owner ON stored_objects (owner, kind)",
            # Prompt-cache tokens, and what is billed in other units (search units, seconds,
            # images).
            "ALTER TABLE usage ADD COLUMN cache_read_tokens INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE usage ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE usage ADD COLUMN units DOUBLE PRECISION",
            "ALTER TABLE usage ADD COLUMN unit TEXT",
        ),
    ),
    Migration(
        5,
        "tenancy",
        (
            # Teams: their own limits, budget (with an optional period: day, week, month) and
            # model list (JSON text; NULL: every model). Names are unique.
            """CREATE TABLE teams (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                rpm INTEGER,
                tpm INTEGER,
                budget_usd DOUBLE PRECISION,
                budget_period TEXT,
                models TEXT,
                metadata TEXT,
                created_at TEXT NOT NULL
            )""",
            "CREATE UNIQUE INDEX teams_name ON teams (name)",
            # A key's alias (unique when set), team, model list, expiry, budget period,
            # metadata (JSON text), and after a rotation with a grace period the hash of its
            # previous secret and until when that one works.
            "ALTER TABLE client_keys ADD COLUMN alias TEXT",
            "ALTER TABLE client_keys ADD COLUMN team_id TEXT",
            "ALTER TABLE client_keys ADD COLUMN models TEXT",
            "ALTER TABLE client_keys ADD COLUMN expires_at TEXT",
            "ALTER TABLE client_keys ADD COLUMN budget_period TEXT",
            "ALTER TABLE client_keys ADD COLUMN metadata TEXT",
            "ALTER TABLE client_keys ADD COLUMN previous_hash TEXT",
            "ALTER TABLE client_keys ADD COLUMN previous_until TEXT",
            "CREATE UNIQUE INDEX client_keys_alias ON client_keys (alias)",
            "CREATE INDEX client_keys_previous_hash ON client_keys (previous_hash)",
            "CREATE INDEX client_keys_team_id ON client_keys (team_id)",
            # The team of the key of each usage row: a team's spend is its rows' sum.
            "ALTER TABLE usage ADD COLUMN team_id TEXT",
            "CREATE INDEX usage_team_id ON usage (team_id, created_at)",
        ),
    ),
)


def utc_now() -> str:
    """The current time as stored: ISO-8601 UTC with milliseconds and a Z, so that keys
    made in the same second still list in the order they were made."""
    return datetime.now(tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- dialects -----------------------------------------------------------------------------------


@attrs.frozen
class Dialect:
    """What differs between the two databases: the driver, how to connect, placeholders."""

    name: str  # "sqlite" or "postgresql"
    module: str  # the DB-API module adbapi imports
    connect_args: tuple[Any, ...]
    connect_kwargs: dict[str, Any]
    placeholder: str  # "?" or "%s"

    def describe(self, error: BaseException) -> str:
        """A driver's error as one line, naming the SQLite file (never a password)."""
        reason = " ".join(str(error).split()) or type(error).__name__
        return f"{self.connect_args[0]}: {reason}" if self.name == "sqlite" else reason

    def connect(self) -> Any:
        if self.name == "sqlite":
            connection = sqlite3.connect(*self.connect_args, **self.connect_kwargs)
            prepare_sqlite(connection)
            return connection
        import psycopg

        return psycopg.connect(*self.connect_args, **self.connect_kwargs)

    def sql(self, statement: str) -> str:
        """``statement`` with ``?`` placeholders written for this driver."""
        if self.placeholder == "?":
            return statement
        return statement.replace("%", "%%").replace("?", self.placeholder)


def dialect_for(url: str) -> Dialect:
    """The dialect of a database URL; ``DatabaseError`` when it is neither kind."""
    if url.startswith(SQLITE_PREFIX):
        path = url[len(SQLITE_PREFIX) :].split("?", 1)[0]
        if not path:
            raise DatabaseError(f"{url!r} names no file (sqlite:///<path>)")
        return Dialect(
            "sqlite",
            "sqlite3",
            (path,),
            {"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False},
            "?",
        )
    if url.startswith(POSTGRES_PREFIXES):
        # A server that does not answer must not hang start-up or mpcapi-admin forever.
        timeout = {} if "connect_timeout" in url else {"connect_timeout": POSTGRES_CONNECT_TIMEOUT}
        return Dialect("postgresql", "psycopg", (url,), timeout, "%s")
    raise DatabaseError(f"{url!r} must start with sqlite:/// or postgresql://")


def prepare_sqlite(connection: Any) -> None:
    """WAL: readers (the daemon) and a writer (mpcapi-admin) do not wait for each other."""
    connection.execute("PRAGMA journal_mode=WAL")
    # With WAL, NORMAL syncs at checkpoints, not every commit: safe from corruption, and the
    # ledger's writer thread holds the GIL (and so the reactor) far less.
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")


class Cursor:
    """A DB-API cursor that takes ``?`` placeholders on either database."""

    def __init__(self, raw: Any, dialect: Dialect) -> None:
        self._raw = raw
        self.dialect = dialect

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Cursor:
        self._raw.execute(self.dialect.sql(statement), tuple(params))
        return self

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> Cursor:
        """One statement for many rows; ``rowcount`` is then the total affected."""
        self._raw.executemany(self.dialect.sql(statement), [tuple(row) for row in rows])
        return self

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._raw.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._raw.fetchall()]

    @property
    def rowcount(self) -> int:
        count: int = self._raw.rowcount
        return count


# --- migrations ---------------------------------------------------------------------------------


def apply_migrations(
    connection: Any, dialect: Dialect, migrations: Sequence[Migration] = MIGRATIONS
) -> list[int]:
    """Apply the migrations that ``schema_migrations`` does not list yet, in order, in one
    transaction under a lock; return the versions applied (empty when up to date)."""
    raw = connection.cursor()
    cursor = Cursor(raw, dialect)
    try:
        if dialect.name == "sqlite":
            raw.execute("BEGIN IMMEDIATE")  # the write lock, before reading the version
        else:
            cursor.execute("SELECT pg_advisory_xact_lock(?)", (_POSTGRES_MIGRATION_LOCK,))
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        rows = cursor.execute("SELECT version FROM schema_migrations").fetchall()
        applied = {row[0] for row in rows}
        done = []
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version in applied:
                continue
            for statement in migration.statements:
                cursor.execute(statement)
            cursor.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, utc_now()),
            )
            done.append(migration.version)
        connection.commit()
        return done
    except BaseException:
        connection.rollback()
        raise
    finally:
        raw.close()


# --- the daemon's way in ------------------------------------------------------------------------


@functools.cache
def _quiet_connection() -> type[adbapi.Connection]:
    """adbapi's pooled connection, without the "Rollback failed" tracebacks it logs for every
    pooled connection a database restart broke (the ledger logs the outage once); the broken
    connection is still dropped and made anew, as adbapi does."""
    from twisted.enterprise import adbapi

    class QuietConnection(adbapi.Connection):
        def rollback(self) -> None:
            connection: Any = self._connection
            try:
                connection.rollback()
                cursor = connection.cursor()
                cursor.execute(self._pool.good_sql)
                cursor.close()
                connection.commit()
            except Exception:
                # Dropped, to be made anew by the next query; the query's own error (raised
                # by adbapi after this) says what happened.
                self._pool.disconnect(connection)

    return QuietConnection


class Database:
    """Non-blocking access through an adbapi pool (one connection for SQLite, whose writes
    are serial anyway; a few for PostgreSQL). Migrations run before the first query."""

    POSTGRES_MAX_CONNECTIONS = 4

    def __init__(self, url: str, reactor: Any) -> None:
        from twisted.enterprise import adbapi
        from twisted.internet import defer

        self.dialect = dialect_for(url)
        options: dict[str, Any] = {"cp_reactor": reactor, "cp_noisy": False}
        if self.dialect.name == "sqlite":
            options.update(cp_min=1, cp_max=1, cp_openfun=prepare_sqlite)
        else:
            options.update(cp_min=1, cp_max=self.POSTGRES_MAX_CONNECTIONS, cp_reconnect=True)
        self.pool = adbapi.ConnectionPool(
            self.dialect.module,
            *self.dialect.connect_args,
            **self.dialect.connect_kwargs,
            **options,
        )
        if self.dialect.name != "sqlite":  # only reconnecting pools roll back this way
            self.pool.connectionFactory = _quiet_connection()
        self._lock = defer.DeferredLock()
        self._up_to_date = False

    def migrate(self) -> defer.Deferred[list[int]]:
        """Apply missing migrations (checked once per process; callers take turns); fires
        with the versions applied."""
        return self._lock.run(self._migrate_once)

    async def _migrate_once(self) -> list[int]:
        if self._up_to_date:
            return []
        versions: list[int] = await self.pool.runWithConnection(apply_migrations, self.dialect)
        self._up_to_date = True
        return versions

    async def run(
        self, fn: Callable[Concatenate[Cursor, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(cursor, *args)`` in a transaction, in the pool's thread."""
        await self.migrate()

        def interaction(transaction: Any) -> T:
            return fn(Cursor(transaction, self.dialect), *args, **kwargs)

        # A PostgreSQL restart breaks every pooled connection; each fails its next query
        # and is then made anew. A query that met a broken one runs again, on another.
        retries = self.POSTGRES_MAX_CONNECTIONS if self.dialect.name != "sqlite" else 0
        for _ in range(retries):
            try:
                result: T = await self.pool.runInteraction(interaction)
                return result
            except Exception as error:
                if not lost_connection(error):
                    raise
        result = await self.pool.runInteraction(interaction)
        return result

    def close(self) -> None:
        self.pool.close()


# --- the command line's way in ------------------------------------------------------------------


class SyncDatabase:
    """Blocking access for command-line tools; the same functions as ``Database.run``."""

    def __init__(self, url: str) -> None:
        self.dialect = dialect_for(url)
        self._connection: Any = None

    def connection(self) -> Any:
        if self._connection is None:
            self._connection = self.dialect.connect()
        return self._connection

    def migrate(self) -> list[int]:
        return apply_migrations(self.connection(), self.dialect)

    def run(self, fn: Callable[Concatenate[Cursor, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        connection = self.connection()
        raw = connection.cursor()
        try:
            result = fn(Cursor(raw, self.dialect), *args, **kwargs)
            connection.commit()
            return result
        except BaseException:
            connection.rollback()
            raise
        finally:
            raw.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def lost_connection(error: BaseException) -> bool:
    """Whether ``error`` is a PostgreSQL connection that was open and broke (the server
    restarted or closed it), rather than a failure to connect or a failing query."""
    try:
        import psycopg
    except ImportError:
        return False
    return (
        isinstance(error, psycopg.OperationalError)
        and not isinstance(error, psycopg.errors.QueryCanceled)
        and not str(error).startswith("connection failed")
    )


# Driver errors that say the database cannot serve now, whatever was asked (driver, class).
_UNAVAILABLE = {
    ("sqlite3", "OperationalError"),  # locked, busy, no such table, disk I/O
    ("psycopg", "OperationalError"),  # unreachable, broken, deadlock, lock or statement timeout
    ("psycopg", "InterfaceError"),  # the connection is closed
}


def unavailable(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot serve now (unreachable, busy, locked,
    broken), rather than refusing what it was given; either driver, imported or not."""
    kinds = {(kind.__module__.partition(".")[0], kind.__name__) for kind in type(error).__mro__}
    return bool(kinds & _UNAVAILABLE)


def driver_errors() -> tuple[type[BaseException], ...]:
    """The exceptions the drivers raise (psycopg's only when it is installed)."""
    errors: list[type[BaseException]] = [sqlite3.Error]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        errors.append(psycopg.Error)
    return tuple(errors)


def migrate_now(url: str) -> list[int]:
    """Open the database, apply missing migrations and close it: blocking, for start-up
    (before the reactor runs). Raises ``DatabaseError`` with the driver's reason."""
    database = SyncDatabase(url)
    try:
        return database.migrate()
    except driver_errors() as error:
        raise DatabaseError(database.dialect.describe(error)) from None
    finally:
        database.close()
