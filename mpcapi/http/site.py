"""The HTTP server side: limits that keep slow, idle or greedy clients from holding us.

Twisted reads a whole request body before handing the request to a resource. A
``LimitedRequest`` answers 413 as soon as the announced ``Content-Length`` (or the
running count of a chunked body) passes the limit, and drops the rest unread; and 408
when headers and body take longer than the read timeout. ``GatewayChannel`` answers a
request that is not valid HTTP/1.1 (Twisted's bare 400) in our error shape too.
``ConnectionCap`` bounds the open connections.
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

from mpcapi.errors import (
    JSON_CONTENT_TYPE,
    ApiError,
    ErrorFormat,
    bad_request,
    payload_too_large,
    request_timeout,
)
from mpcapi.http.headers import SECURITY_HEADERS
from mpcapi.http.requestlog import REQUEST_FORMAT, request_id_for
from mpcapi.internals import HookedChannel, HookedRequest, negotiating_protocol
from mpcapi.openai.routes import anthropic_path

log = Logger(namespace="mpcapi.request")

# Lingering close: how long we keep draining a refused body so the client reads our 413.
_DRAIN_SECONDS = 2
# What a finished request no longer needs (see LimitedRequest._cleanup).
_SERVED_ONLY_THE_ANSWER = (
    "requestHeaders",
    "responseHeaders",
    "args",
    "received_cookies",
    "cookies",
    "_adapterCache",
)


class LimitedRequest(HookedRequest):
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

    def cleaned_up(self) -> None:
        """After the answer and every finish callback (logs, metrics, ledger), drop what only
        served the answer, as Twisted drops the channel and the body here. Klein's and
        werkzeug's per-request closures hold the request in reference cycles that only the
        garbage collector frees; without its headers and adapters, the request leaves it
        a few objects to walk instead of some sixty (7 % of a request's time at 32
        connections went to collections)."""
        for name in _SERVED_ONLY_THE_ANSWER:
            self.__dict__.pop(name, None)

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
        channel = self.channel
        assert isinstance(channel, HookedChannel)  # GatewaySite's requests come on ours
        refuse_connection(channel, error, request_id_for(self))


def error_response(error: ApiError, request_id: str, error_format: ErrorFormat) -> bytes:
    """A whole HTTP/1.1 answer for ``error``, for when no Request renders it: the JSON
    body, its length, the request id, the security headers, ``connection: close``."""
    body = error.body(request_id, error_format)
    headers = {
        b"content-type": JSON_CONTENT_TYPE,
        b"content-length": b"%d" % len(body),
        b"x-request-id": request_id.encode("ascii"),
        **SECURITY_HEADERS,
        **{
            name.lower().encode("ascii"): value.encode("latin-1")
            for name, value in error.headers.items()
        },
        b"connection": b"close",
    }
    status = b"HTTP/1.1 %d %s\r\n" % (error.status, HTTPStatus(error.status).phrase.encode("ascii"))
    return status + b"".join(b"%s: %s\r\n" % item for item in headers.items()) + b"\r\n" + body


def refuse_connection(channel: HookedChannel, error: ApiError, request_id: str) -> None:
    """Answer ``error`` straight on ``channel``'s transport, once, then drain what the client
    still sends for a moment and close the connection; log it like a request."""
    if channel.answered_directly:
        return
    channel.answered_directly = True
    site: GatewaySite = channel.site  # type: ignore[attr-defined]
    method, path = channel.request_line()
    anthropic = anthropic_path(path.decode("utf-8", "replace"))
    answer = error_response(error, request_id, "anthropic" if anthropic else site.error_format)
    transport: Any = channel.transport
    transport.write(answer)
    channel.persistent = False
    channel.stop_parsing()  # nothing the client sent after this is parsed
    channel.dataReceived = _discard  # type: ignore[method-assign]
    channel.setTimeout(_DRAIN_SECONDS)
    transport.loseWriteConnection()
    log.info(
        REQUEST_FORMAT,
        method=method.decode("ascii", "replace"),
        path=path.decode("utf-8", "replace"),
        status=error.status,
        duration_ms=0,
        request_id=request_id,
        model=None,
        upstream_status=None,
        bytes_sent=len(answer),
        outcome="refused",
    )


def _discard(data: bytes) -> None:
    """Reads and forgets what a refused client is still sending."""


class GatewayChannel(HookedChannel):
    """Twisted's HTTP/1.1 connection; a request that is not valid HTTP (request line,
    header block, chunked framing, ``Content-Length``) gets a 400 in our error shape."""

    _secure: bool | None = None

    def isSecure(self) -> bool:
        """Whether the connection is TLS: asked once per connection, not twice per request
        (Klein and Twisted each ask, and each asking is an adapter lookup)."""
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure

    def bad_request(self) -> None:
        # Twisted's own: a bare "400 Bad Request", no body, no request id.
        self._refuse(bad_request("the request is not valid HTTP/1.1"))

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted's own: the connection closes without an answer.
        limit = self.MAX_LENGTH
        self._refuse(bad_request(f"a request line or header is longer than {limit} bytes"))

    def _refuse(self, error: ApiError) -> None:
        request = self.requests[-1] if self.requests else None
        if isinstance(request, LimitedRequest):  # its read timer stops; its x-request-id
            request._refuse(error)
        else:
            refuse_connection(self, error, uuid.uuid4().hex)


def _gateway_channel(site: GatewaySite) -> Any:
    """What ``HTTPFactory`` builds by default, with our channel inside."""
    return negotiating_protocol(GatewayChannel())


class GatewaySite(server.Site):
    """The Site for MPC-API: body and time limits, no legacy access log, no tracebacks.

    ``timeout`` (Twisted's idle timeout) closes keep-alive connections left idle.
    """

    requestFactory = LimitedRequest
    protocol = _gateway_channel
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int,
        read_timeout: float = 30.0,
        error_format: ErrorFormat = "openai",
        **kwargs: Any,
    ) -> None:
        # No form parsing: it is costly, and it would hold a whole upload in memory; an upload
        # stays in Twisted's temporary file and is streamed from there to LiteLLM.
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout
        self.error_format = error_format

    def log(self, request: Any) -> None:
        """Our own per-request event replaces Twisted's access log line."""


class _Overloaded(Protocol):
    """What a connection past the cap gets: a 503, then the connection is closed."""

    def __init__(self, error_format: ErrorFormat) -> None:
        self._error_format = error_format

    def connectionMade(self) -> None:
        error = ApiError(
            503,
            "Service Unavailable",
            "too many open connections; retry later",
            headers={"Retry-After": "1"},
        )
        answer = error_response(error, uuid.uuid4().hex, self._error_format)
        self.transport.write(answer)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class ConnectionCap(WrappingFactory):
    """Caps the open connections of a site; ``protocols`` holds the open ones: the
    ``open_connections`` given, which others read too (the drain, the ledger's last flush)."""

    def __init__(
        self, site: GatewaySite, limit: int, open_connections: dict[Any, int] | None = None
    ) -> None:
        super().__init__(site)
        if open_connections is not None:
            self.protocols = open_connections
        self.limit = limit

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.limit:
            return _Overloaded(self.wrappedFactory.error_format)
        protocol: Protocol | None = super().buildProtocol(addr)
        return protocol
