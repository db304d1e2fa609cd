"""Real databases for tests: a SQLite file, or a schema of its own in the PostgreSQL at
127.0.0.1:5432 (database ``test``; ``MPCAPI_TEST_POSTGRES_URL`` names another), created empty
for one test and dropped after it, so runs never see each other's tables."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

POSTGRES_URL = os.environ.get(
    "MPCAPI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A database URL whose tables live in a new, empty schema (dropped on exit)."""
    schema = f"mpcapi_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'mpcapi.db'}"


@contextmanager
def database_url(kind: str, directory: Path) -> Iterator[str]:
    """``kind`` is "sqlite" or "postgresql"."""
    if kind == "sqlite":
        yield sqlite_url(directory)
    else:
        with postgres_schema() as url:
            yield url
