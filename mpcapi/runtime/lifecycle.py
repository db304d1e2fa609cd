"""Graceful stop: on SIGTERM, finish what is in flight, then exit 0.

twistd stops the listening port and every other service at once; ``Drain`` then closes
the idle keep-alive connections, asks busy ones to close after their current answer, and
holds the shutdown until no client connection is left or ``drain_seconds`` have passed.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web.http import HTTPChannel

from mpcapi.http.site import ConnectionCap
from mpcapi.internals import channel_of, forget_exit_signal

log = Logger(namespace="mpcapi.lifecycle")

POLL_SECONDS = 0.1


class Drain(Service):
    """Holds the daemon's stop until its client connections are done (or time is up)."""

    def __init__(self, reactor: Any, connections: ConnectionCap, seconds: float) -> None:
        self._reactor = reactor
        self._connections = connections
        self._seconds = seconds

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._close_idle()
        return defer.ensureDeferred(self._wait())

    def _close_idle(self) -> None:
        for wrapper in list(self._connections.protocols):
            channel = channel_of(wrapper.wrappedProtocol)
            if isinstance(channel, HTTPChannel):
                channel.persistent = False  # close after the answer in progress
                if not channel.requests:
                    wrapper.loseConnection()

    async def _wait(self) -> None:
        deadline = self._reactor.seconds() + self._seconds
        while self._connections.protocols and self._reactor.seconds() < deadline:
            await task.deferLater(self._reactor, POLL_SECONDS, lambda: None)
        left = len(self._connections.protocols)
        if left:
            log.warn("drain time is up; closing {count} connections", count=left)
        else:
            log.info("drained: every request in flight has finished")
        forget_exit_signal(self._reactor)  # a finished drain is a clean stop
