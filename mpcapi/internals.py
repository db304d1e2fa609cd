"""Every use MPC-API makes of a private API of Twisted or txredisapi, in this one module.

Twisted keeps no promise about names that start with an underscore. Each one used here is
checked by ``tests/unit/test_internals.py``, which fails when an upgrade moves, renames or
changes one: after upgrading Twisted or txredisapi, start there. Elsewhere the project calls
the public names below.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IProtocol
from twisted.web import http, server
from twisted.web._newclient import Request as _ClientRequest
from twisted.web._newclient import _ensureValidURI
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer

# --- the LiteLLM client (twisted.web.client) ----------------------------------------------------


class _QuietClientFactory(_HTTP11ClientFactory):
    """No "Starting factory" log line for every new upstream connection."""

    noisy = False


def quiet_pool(pool: HTTPConnectionPool) -> HTTPConnectionPool:
    """``pool``, making its connections with a factory that does not log each one."""
    pool._factory = _QuietClientFactory
    return pool


def checked_uri(uri: bytes) -> bytes:
    """``uri``, if it is one ``Agent`` would send (no whitespace or control characters);
    ``ValueError`` otherwise, as ``Agent.request`` raises."""
    checked: bytes = _ensureValidURI(uri.strip())
    return checked


def client_request(
    method: bytes,
    path: bytes,
    headers: Headers,
    body: IBodyProducer | None,
    persistent: bool,
) -> Any:
    """The request ``Agent`` hands a pooled connection (``HTTP11ClientProtocol.request``)."""
    return _ClientRequest._construct(method, path, headers, body, persistent=persistent)


# --- the HTTP server (twisted.web.http, twisted.web.server) -------------------------------------


class HookedChannel(http.HTTPChannel):
    """``HTTPChannel`` whose private hook for a request that is not valid HTTP calls the
    public ``bad_request``, and which says whether an answer went out past any request."""

    answered_directly = False  # an answer was written on the transport (see site.py)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request()

    def bad_request(self) -> None:
        """Twisted's own: a bare "400 Bad Request", then the connection closes."""
        super()._respondToBadRequestAndDisconnect()

    def stop_parsing(self) -> None:
        """Drop what the client sent that is not parsed yet (nothing after it is read)."""
        self._buffer = b""

    def request_line(self) -> tuple[bytes, bytes]:
        """The method and path of the request being read, as far as they arrived."""
        return getattr(self, "_command", b""), getattr(self, "_path", b"")


def negotiating_protocol(channel: HookedChannel) -> IProtocol:
    """What ``Site`` builds for a connection by default (HTTP/1.1, or HTTP/2 when TLS
    negotiates it), around our channel."""
    protocol: IProtocol = http._GenericHTTPChannelProtocol(channel)
    return protocol


def channel_of(protocol: Any) -> Any:
    """The ``HTTPChannel`` inside a protocol ``negotiating_protocol`` made (else itself)."""
    return getattr(protocol, "_channel", protocol)


class HookedRequest(server.Request):
    """``Request`` whose private end-of-life hook calls the public ``cleaned_up``."""

    def _cleanup(self) -> None:
        super()._cleanup()
        self.cleaned_up()

    def cleaned_up(self) -> None:
        """After the answer and every finish callback; the request is done."""


# --- the reactor --------------------------------------------------------------------------------


def forget_exit_signal(reactor: Any) -> None:
    """A stop that finished cleanly after SIGTERM exits 0: twistd would otherwise re-raise
    the signal when the reactor stops (exit status 143)."""
    if hasattr(reactor, "_exitSignal"):
        reactor._exitSignal = None


# --- txredisapi ---------------------------------------------------------------------------------


def redis_pool_size(handler: Any) -> int:
    """How many connections a txredisapi lazy pool has made (1 when it cannot tell)."""
    factory = getattr(handler, "_factory", None)
    return int(getattr(factory, "size", 1))


__all__ = [
    "HookedChannel",
    "HookedRequest",
    "channel_of",
    "checked_uri",
    "client_request",
    "forget_exit_signal",
    "negotiating_protocol",
    "quiet_pool",
    "redis_pool_size",
]
