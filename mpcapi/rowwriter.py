"""The usage rows' writer: a child process that inserts the ledger's batches.

Inserting rows is the ledger's only heavy database work. Done in the daemon's thread pool it
competes with the reactor for the interpreter lock (about a fifth of the throughput at 32
connections); in a process of its own it runs on another core and costs the reactor only
the encoding of each batch.

The daemon starts the writer on its first batch (``RowWriter.insert``): ``python -m
mpcapi.usagerows`` (the program and its protocol are described there), with the database URL
in its environment, never on its command line, where ``ps`` would show a password. A batch
the database refused fails with its reason: the ledger then spools the rows and retries
later, as for any outage. The writer ends when its stdin closes: when the daemon stops, or
dies. A writer that dies fails its batch; the next batch starts a new one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

import orjson
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpcapi.database import DatabaseError
from mpcapi.usagerows import URL_ENV

log = Logger(namespace="mpcapi.rowwriter")

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
        try:  # before the batch takes its place among the answers awaited
            line = orjson.dumps(rows) + b"\n"
        except (TypeError, orjson.JSONEncodeError) as failure:
            return defer.fail(DatabaseError(f"a usage row cannot be written: {failure}"))
        if self._process is None:
            self._start()
        answer: defer.Deferred[int] = defer.Deferred()
        self._waiting.append(answer)
        self._process.write(line)
        return answer

    def _start(self) -> None:
        env = {**os.environ, URL_ENV: self._database_url}
        self._buffer = b""
        self._ended = defer.Deferred()
        argv = [self._python, "-m", "mpcapi.usagerows"]
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
