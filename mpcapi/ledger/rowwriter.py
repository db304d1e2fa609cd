"""The usage rows' writer: a child process that inserts the ledger's batches.

Inserting rows is the ledger's only heavy database work. Done in the daemon's thread pool it
competes with the reactor for the interpreter lock (about a fifth of the throughput at 32
connections); in a process of its own it runs on another core and costs the reactor only
the encoding of each batch.

The daemon starts the writer on its first batch (``RowWriter.insert``): ``python -m
mpcapi.storage.usagerows`` (the program and its protocol are described there), with the
database URL in its environment, never on its command line, where ``ps`` would show a
password. A batch
the database could not take fails with its reason: the ledger then spools the rows and
retries later, as for any outage. Rows refused one by one while the database answers (and
rows that cannot even be encoded) come back in ``Inserted.refused``, for the ledger to set
aside. The writer ends when its stdin closes: when the daemon stops, or
dies. A writer that dies fails its batch; the next batch starts a new one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs
import orjson
from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpcapi.storage.database import DatabaseError
from mpcapi.storage.usagerows import URL_ENV

log = Logger(namespace="mpcapi.rowwriter")

STOP_WAIT = 10.0  # seconds a stopping writer may take to finish its batch


class WriterGoneError(DatabaseError):
    """The writer process ended before it answered."""


Row = dict[str, Any]


@attrs.frozen
class Inserted:
    """What became of a batch: rows new to the database, and rows refused, with why."""

    stored: int
    refused: list[tuple[Row, str]] = attrs.field(factory=list)


# A batch awaiting its answer: its Deferred, the rows sent, and the rows that could not be.
_Awaited = tuple[defer.Deferred[Inserted], list[Row], list[tuple[Row, str]]]


class RowWriter(protocol.ProcessProtocol):
    """The daemon's side: ``insert(rows)`` fires with what was ``Inserted``, or fails with a
    ``DatabaseError``. Batches are answered in order; the ledger sends one at a time."""

    def __init__(self, reactor: Any, database_url: str, python: str = sys.executable) -> None:
        self._reactor = reactor
        self._database_url = database_url
        self._python = python
        self._process: Any = None
        self._waiting: deque[_Awaited] = deque()  # in the order the batches went
        self._buffer = b""
        self._ended: defer.Deferred[None] | None = None

    def insert(self, rows: Sequence[Row]) -> defer.Deferred[Inserted]:
        sent: list[Row] = list(rows)
        unencodable: list[tuple[Row, str]] = []
        try:  # before the batch takes its place among the answers awaited
            line = orjson.dumps(sent) + b"\n"
        except (TypeError, orjson.JSONEncodeError):  # e.g. an integer past 64 bits
            sent, unencodable = _encodable(rows)
            if not sent:
                return defer.succeed(Inserted(0, unencodable))
            line = orjson.dumps(sent) + b"\n"
        if self._process is None:
            self._start()
        answer: defer.Deferred[Inserted] = defer.Deferred()
        self._waiting.append((answer, sent, unencodable))
        self._process.write(line)
        return answer

    def _start(self) -> None:
        env = {**os.environ, URL_ENV: self._database_url}
        self._buffer = b""
        self._ended = defer.Deferred()
        argv = [self._python, "-m", "mpcapi.storage.usagerows"]
        self._process = self._reactor.spawnProcess(self, self._python, argv, env=env)

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            answer = orjson.loads(line)
            waiter, rows, unencodable = self._waiting.popleft()
            if "stored" in answer:
                refused = [(rows[at], reason) for at, reason in answer.get("refused", ())]
                waiter.callback(Inserted(answer["stored"], unencodable + refused))
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
            for waiter, _, _ in waiting:
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


def _encodable(rows: Sequence[Row]) -> tuple[list[Row], list[tuple[Row, str]]]:
    """The rows JSON can carry, and those it cannot, with why."""
    good: list[Row] = []
    bad: list[tuple[Row, str]] = []
    for row in rows:
        try:
            orjson.dumps(row)
        except (TypeError, orjson.JSONEncodeError) as failure:
            bad.append((row, f"cannot be encoded: {failure}"))
        else:
            good.append(row)
    return good, bad
