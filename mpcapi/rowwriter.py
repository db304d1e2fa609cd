"""The usage rows' writer: a child process that inserts the ledger's batches.

Inserting rows is the ledger's only heavy database work. Done in the daemon's thread pool it
competes with the reactor for the interpreter lock (about a fifth of the throughput at 32
connections); in a process of its own it runs on another core and costs the reactor only
the encoding of each batch.

The daemon starts the writer on its first batch (``RowWriter.insert``): ``python -m
mpcapi.rowwriter``, with the database URL in its environment (never on its command line,
where ``ps`` would show a password). Batches go down its stdin as JSON lines; one JSON line
per batch comes back on its stdout: ``{"stored": n}``, or ``{"error": "..."}`` when the
database refused it (the ledger then spools the rows and retries later, as for any outage).
The writer ends when its stdin closes: when the daemon stops, or dies. A writer that dies
fails its batch; the next batch starts a new one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any, BinaryIO

import orjson
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpcapi.database import DatabaseError, SyncDatabase, driver_errors

log = Logger(namespace="mpcapi.rowwriter")

URL_ENV = "MPCAPI_ROWWRITER_DATABASE_URL"
STOP_WAIT = 10.0  # seconds a stopping writer may take to finish its batch


class WriterGoneError(DatabaseError):
    """The writer process ended before it answered."""


class RowWriter(protocol.ProcessProtocol):
    """The daemon's side: ``insert(rows)`` fires with the count stored, or fails with a
    ``DatabaseError``. Batches are answered in order; the ledger sends one at a time."""

    def __init__(self, reactor: Any, database_url: str, python: str = sys.executable) -> None:
        self._reactor = reactor
        self._database_url = database_url
        self._python = python
        self._process: Any = None
        self._waiting: deque[defer.Deferred[int]] = deque()
        self._buffer = b""
        self._ended: defer.Deferred[None] | None = None

    def insert(self, rows: Sequence[dict[str, Any]]) -> defer.Deferred[int]:
        if self._process is None:
            self._start()
        answer: defer.Deferred[int] = defer.Deferred()
        self._waiting.append(answer)
        self._process.write(orjson.dumps(rows) + b"\n")
        return answer

    def _start(self) -> None:
        env = {**os.environ, URL_ENV: self._database_url}
        self._buffer = b""
        self._ended = defer.Deferred()
        argv = [self._python, "-m", "mpcapi.rowwriter"]
        self._process = self._reactor.spawnProcess(self, self._python, argv, env=env)

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            answer = orjson.loads(line)
            waiter = self._waiting.popleft()
            if "stored" in answer:
                waiter.callback(answer["stored"])
            else:
                waiter.errback(DatabaseError(answer.get("error") or "the row writer failed"))

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.error("row writer: {line}", line=line)

    def processEnded(self, reason: Failure) -> None:
        ended, self._ended, self._process = self._ended, None, None
        waiting, self._waiting = self._waiting, deque()
        if waiting:
            why = f"the usage row writer ended before it answered: {reason.value}"
            for waiter in waiting:
                waiter.errback(WriterGoneError(why))
        if ended is not None:
            ended.callback(None)

    def close(self) -> defer.Deferred[None]:
        """Close the writer's stdin (it ends once its batch is stored); kill it if it takes
        longer than ``STOP_WAIT``. Fires when it has ended."""
        if self._process is None or self._ended is None:
            return defer.succeed(None)
        ended, process = self._ended, self._process
        process.closeStdin()
        timer = self._reactor.callLater(STOP_WAIT, self._kill, process)
        ended.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return ended

    @staticmethod
    def _kill(process: Any) -> None:
        with contextlib.suppress(error.ProcessExitedAlready):
            process.signalProcess("KILL")


def serve(database_url: str, lines: BinaryIO, answers: BinaryIO) -> None:
    """The writer process: store each batch read from ``lines``, answer on ``answers``."""
    from mpcapi.ledger import insert_rows  # the ledger's own statements

    database = SyncDatabase(database_url)
    errors: tuple[type[BaseException], ...] = (*driver_errors(), DatabaseError)
    migrated = False
    try:
        for line in lines:
            rows = orjson.loads(line)
            try:
                if not migrated:  # the usage table, if this writer is the first to need it
                    database.migrate()
                    migrated = True
                stored = database.run(insert_rows, rows)
                answer: dict[str, Any] = {"stored": stored}
            except errors as failure:
                database.close()  # a broken connection is made anew for the next batch
                answer = {"error": database.dialect.describe(failure)}
            answers.write(orjson.dumps(answer) + b"\n")
            answers.flush()
    finally:
        database.close()


def main() -> None:
    url = os.environ.get(URL_ENV)
    if not url:
        sys.stderr.write(f"mpcapi.rowwriter: {URL_ENV} is not set\n")
        raise SystemExit(2)
    # A terminal's Ctrl-C reaches the whole process group: the daemon stops, then closes
    # our stdin once its last rows are here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(url, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
