"""The HTTP server side: a Site whose requests refuse oversized bodies early.

Twisted reads a whole request body before handing the request to a resource. A
``LimitedRequest`` answers 413 as soon as the announced ``Content-Length`` (or the
running count of a chunked body) passes the limit, and drops the rest unread.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import IResource

from mpcapi.errors import payload_too_large
from mpcapi.requestlog import REQUEST_FORMAT, request_id_for

log = Logger(namespace="mpcapi.request")

# Lingering close: how long we keep draining a refused body so the client reads our 413.
_DRAIN_SECONDS = 2


class LimitedRequest(server.Request):
    """A request that refuses a body larger than its site's ``max_body_bytes``."""

    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _limit(self) -> int:
        limit: int = self.channel.site.max_body_bytes  # type: ignore[attr-defined]
        return limit

    def _refuse(self) -> None:
        """Answer 413 straight on the transport, then drain and close the connection."""
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after our answer
        request_id = request_id_for(self)
        body = payload_too_large(self._limit()).body(request_id)
        head = (
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\n"
            b"x-request-id: %s\r\n"
            b"connection: close\r\n\r\n"
        ) % (len(body), request_id.encode("ascii"))
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
            status=413,
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
    """The Site for MPC-API: body limit, no legacy access log, no tracebacks."""

    requestFactory = LimitedRequest
    displayTracebacks = False

    def __init__(self, resource: IResource, max_body_bytes: int, **kwargs: Any) -> None:
        # Bodies are JSON: no form parsing (its email-based Content-Type parsing is costly).
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.max_body_bytes = max_body_bytes

    def log(self, request: Any) -> None:
        """Our own per-request event replaces Twisted's access log line."""
