"""The HTTP server side: limits that keep slow, idle or greedy clients from holding us.

Twisted reads a whole request body before handing the request to a resource. A
``LimitedRequest`` answers 413 as soon as the announced ``Content-Length`` (or the
running count of a chunked body) passes the limit, and drops the rest unread; and 408
when headers and body take longer than the read timeout. ``ConnectionCap`` bounds the
open connections.
"""

from __future__ import annotations

import uuid
from http import HTTPStatus
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from twisted.web.resource import IResource

from mpcapi.errors import ApiError, payload_too_large, request_timeout
from mpcapi.requestlog import REQUEST_FORMAT, request_id_for

log = Logger(namespace="mpcapi.request")

# Lingering close: how long we keep draining a refused body so the client reads our 413.
_DRAIN_SECONDS = 2


class LimitedRequest(server.Request):
    """A request held to its site's limits: body size (413) and time to arrive (408)."""

    _received = 0
    _refused = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        site: GatewaySite = channel.site
        # Made when the request line arrives: headers and body must follow in time.
        self._read_timer = site.reactor.callLater(site.read_timeout, self._too_slow)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuse(payload_too_large(self._limit()))
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse(payload_too_large(self._limit()))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._stop_read_timer()
        if not self._refused:
            super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        self._stop_read_timer()
        super().connectionLost(reason)

    def _limit(self) -> int:
        limit: int = self.channel.site.max_body_bytes  # type: ignore[attr-defined]
        return limit

    def _stop_read_timer(self) -> None:
        if self._read_timer.active():
            self._read_timer.cancel()

    def _too_slow(self) -> None:
        if not self._refused and self.channel is not None:
            site: GatewaySite = self.channel.site  # type: ignore[attr-defined]
            self._refuse(request_timeout(site.read_timeout))

    def _refuse(self, error: ApiError) -> None:
        """Answer straight on the transport (the request is not whole yet), then drain
        what the client still sends for a moment and close the connection."""
        self._refused = True
        self._stop_read_timer()
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after our answer
        request_id = request_id_for(self)
        body = error.body(request_id)
        head = (
            b"HTTP/1.1 %d %s\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\n"
            b"x-request-id: %s\r\n"
            b"connection: close\r\n\r\n"
        ) % (
            error.status,
            HTTPStatus(error.status).phrase.encode("ascii"),
            len(body),
            request_id.encode("ascii"),
        )
        channel: Any = self.channel
        channel.transport.write(head + body)
        channel.persistent = False
        channel.dataReceived = _discard
        channel.setTimeout(_DRAIN_SECONDS)
        channel.transport.loseWriteConnection()
        log.info(
            REQUEST_FORMAT,
            method=getattr(channel, "_command", b"").decode("ascii", "replace"),
            path=getattr(channel, "_path", b"").decode("utf-8", "replace"),
            status=error.status,
            duration_ms=0,
            request_id=request_id,
            model=None,
            upstream_status=None,
            bytes_sent=len(body),
            outcome="refused",
        )


def _discard(data: bytes) -> None:
    """Reads and forgets what a refused client is still sending."""


class GatewaySite(server.Site):
    """The Site for MPC-API: body and time limits, no legacy access log, no tracebacks.

    ``timeout`` (Twisted's idle timeout) closes keep-alive connections left idle.
    """

    requestFactory = LimitedRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int,
        read_timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        # Bodies are JSON: no form parsing (its email-based Content-Type parsing is costly).
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout

    def log(self, request: Any) -> None:
        """Our own per-request event replaces Twisted's access log line."""


class _Overloaded(Protocol):
    """What a connection past the cap gets: a 503, then the connection is closed."""

    def connectionMade(self) -> None:
        error = ApiError(503, "Service Unavailable", "too many open connections; retry later")
        request_id = uuid.uuid4().hex
        body = error.body(request_id)
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nx-request-id: %s\r\nretry-after: 1\r\n"
            b"connection: close\r\n\r\n%s" % (len(body), request_id.encode("ascii"), body)
        )
        self.transport.loseConnection()  # type: ignore[union-attr]


class ConnectionCap(WrappingFactory):
    """Caps the open connections of a site; ``protocols`` holds the open ones."""

    def __init__(self, site: GatewaySite, limit: int) -> None:
        super().__init__(site)
        self.limit = limit

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.limit:
            return _Overloaded()
        protocol: Protocol | None = super().buildProtocol(addr)
        return protocol
