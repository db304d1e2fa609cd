"""Worker processes: one listening socket, bound once by the parent, served by N children.

With ``MPCAPI_WORKERS`` above 1 the daemon becomes a supervisor: it binds the socket, starts
N copies of itself (``twistd -n mpcapi`` with the same options) that inherit the socket as
file descriptor 3 and adopt it with ``adoptStreamPort``, restarts a worker that dies, and
passes SIGTERM and SIGHUP on to them (each worker reloads its configuration: see ``reload``).
The kernel spreads new connections among the workers.

Per-worker state: the connection pool to LiteLLM, in-flight requests and streams, and
everything a later module keeps in memory (rate-limit counters and cache in their memory
backends). Shared: the socket, the configuration, and whatever lives in Redis or the database.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpcapi.config.settings import LISTEN_BACKLOG
from mpcapi.internals import forget_exit_signal
from mpcapi.metrics.multiprocess import (
    MULTIPROC_ENV,
    forget_process,
    fresh_multiproc_dir,
    remove_multiproc_dir,
)

log = Logger(namespace="mpcapi.workers")

WORKER_FD_ENV = "MPCAPI_WORKER_FD"
WORKER_ID_ENV = "MPCAPI_WORKER_ID"
INHERITED_FD = 3
RESTART_DELAY = 1.0
STOP_GRACE = 30.0


def listening_socket(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """Bind the one socket all workers share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class AdoptedPort(Service):
    """A worker's side: serve the inherited listening socket."""

    def __init__(self, reactor: Any, fd: int, factory: Any) -> None:
        self._reactor = reactor
        self._fd = fd
        self._factory = factory
        self._port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        family = socket.socket(fileno=os.dup(self._fd)).family
        self._port = self._reactor.adoptStreamPort(self._fd, family, self._factory)
        os.close(self._fd)  # the reactor holds its own duplicate

    def stopService(self) -> Any:
        super().stopService()
        return self._port.stopListening() if self._port is not None else None


class _Worker(ProcessProtocol):
    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.pid: int | None = None

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.pool.worker_ended(self, reason)


class WorkerPool(Service):
    """The supervisor's side: start, restart, signal and stop the workers."""

    def __init__(
        self,
        reactor: Any,
        sock: socket.socket,
        count: int,
        argv: Sequence[str],
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self._reactor = reactor
        self._stop_grace = stop_grace
        self._socket = sock
        self._count = count
        self._argv = list(argv)
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        self._metrics_dir = ""

    def startService(self) -> None:
        super().startService()
        self._metrics_dir = fresh_multiproc_dir()  # every worker writes its metrics there
        for number in range(1, self._count + 1):
            self._spawn(number)
        signal.signal(signal.SIGHUP, self._on_sighup)
        log.info(
            "supervising {count} workers on {address}",
            count=self._count,
            address=self._socket.getsockname(),
        )

    def _spawn(self, number: int) -> None:
        worker = _Worker(self, number)
        env = {
            **os.environ,
            WORKER_FD_ENV: str(INHERITED_FD),
            WORKER_ID_ENV: str(number),
            MULTIPROC_ENV: self._metrics_dir,
        }
        child_fds = {0: 0, 1: 1, 2: 2, INHERITED_FD: self._socket.fileno()}
        process = self._reactor.spawnProcess(
            worker, self._argv[0], self._argv, env=env, childFDs=child_fds
        )
        worker.pid = process.pid
        self._workers[number] = worker

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if self._workers.get(worker.number) is worker:
            del self._workers[worker.number]
        if worker.pid is not None:
            forget_process(self._metrics_dir, worker.pid)
        if self._stopping:
            return
        how = "exited" if reason.check(ProcessDone) else f"died ({reason.value})"
        log.warn("worker {number} {how}; restarting it", number=worker.number, how=how)
        self._reactor.callLater(RESTART_DELAY, self._respawn, worker.number)

    def _respawn(self, number: int) -> None:
        if not self._stopping and number not in self._workers:
            self._spawn(number)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._forward, signal.SIGHUP)

    def _forward(self, signum: int) -> None:
        if signum == signal.SIGTERM:
            self._stopping = True
        for worker in list(self._workers.values()):
            if worker.transport is not None and worker.transport.pid is not None:
                worker.transport.signalProcess(signal.Signals(signum).name[3:])

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        self._stopping = True
        self._forward(signal.SIGTERM)
        waiting = [worker.ended for worker in self._workers.values()]
        done: defer.Deferred[Any] = defer.DeferredList(waiting)
        killer = self._reactor.callLater(self._stop_grace, self._kill_all)
        done.addBoth(lambda result: killer.cancel() if killer.active() else None)
        done.addBoth(lambda _: self._socket.close())
        done.addBoth(lambda _: remove_multiproc_dir(self._metrics_dir))
        done.addBoth(lambda _: self._exit_cleanly())
        return done

    def _exit_cleanly(self) -> None:
        forget_exit_signal(self._reactor)  # workers drained and gone: a clean stop

    def _kill_all(self) -> None:
        for worker in list(self._workers.values()):
            if worker.transport is not None and worker.transport.pid is not None:
                worker.transport.signalProcess("KILL")


def worker_argv(options: Sequence[str]) -> list[str]:
    """The command of one worker: this daemon in the foreground, with the same options."""
    twistd = "from twisted.scripts.twistd import run; run()"
    return [sys.executable, "-c", twistd, "--nodaemon", "--pidfile=", "mpcapi", *options]
