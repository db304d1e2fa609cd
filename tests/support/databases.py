"""Real databases for tests: a SQLite file, or a schema of its own in the PostgreSQL at
127.0.0.1:5432 (database ``test``; ``MPCAPI_TEST_POSTGRES_URL`` names another), created empty
for one test and dropped after it, so runs never see each other's tables; and a PostgreSQL
server of a test's own (``own_postgres``) that the test can stop, kill and start again."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from tests.support.ports import free_port

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


# --- a PostgreSQL server of a test's own, for outage drills -------------------------------------


def postgres_bin() -> Path | None:
    """The directory of the newest installed PostgreSQL server binaries (initdb, postgres)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(command: list[str]) -> list[str]:
    if os.geteuid() == 0:  # initdb and postgres refuse root
        return ["runuser", "-u", "postgres", "--", *command]
    return command


class PostgresServer:
    """A PostgreSQL cluster in ``root`` on ``port`` (trust authentication, fsync off), run as a
    child of the test so that it can be stopped, killed (SIGKILL, as a crash) and started
    again on the same port; ``url`` is its ``postgres`` database."""

    START_TIMEOUT = 60.0

    def __init__(self, root: Path, bin_dir: Path, port: int) -> None:
        self.root = root
        self.bin_dir = bin_dir
        self.port = port
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        command = [str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust"]
        subprocess.run(
            _as_postgres([*command, "-U", "postgres"]),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        """Start the server (after a kill: with crash recovery) and wait until it accepts."""
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        command += ["-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                _as_postgres(command),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text(errors='replace')}")
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.Error:
                time.sleep(0.1)
        raise RuntimeError(f"postgres on {self.port} did not accept connections in time")

    def stop(self) -> None:
        """A fast shutdown: sessions are ended, the server exits cleanly."""
        if self.process is None:
            return
        ctl = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60"]
        subprocess.run(_as_postgres([*ctl, "stop"]), capture_output=True, timeout=90)
        self.process.wait(timeout=30)
        self.process = None

    def kill(self) -> None:
        """SIGKILL the postmaster and every server process at once: no shutdown, no
        checkpoint, every connection reset (a machine or container that dies)."""
        if self.process is None:
            return
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        victims = [postmaster, *_children(postmaster)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


@contextmanager
def own_postgres() -> Iterator[PostgresServer]:
    """A new PostgreSQL server of the test's own, running; removed on exit (skips the test
    when the server binaries are not installed)."""
    bin_dir = postgres_bin()
    if bin_dir is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("no PostgreSQL server binaries (initdb, postgres) to start one")
    root = Path(tempfile.mkdtemp(prefix="mpcapi-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    root.chmod(0o755)
    server = PostgresServer(root, bin_dir, free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()
