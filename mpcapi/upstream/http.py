"""treq over our own connection pool and agent: persistent connections, each URL parsed once,
URLs in wire form, no cookies, bodies written at once."""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import treq
from hyperlink import EncodedURL
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from mpcapi.config.settings import Settings
from mpcapi.internals import checked_uri, client_request, quiet_pool


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory: written at once, no cooperator."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def body_producer(data: Any) -> IBodyProducer:
    """What treq sends as a body: ours as it is (an upload streamed from its file), bytes at
    once."""
    if IBodyProducer.providedBy(data):
        producer: IBodyProducer = data
        return producer
    return BytesProducer(data)


def make_pool(reactor: Any, settings: Settings) -> HTTPConnectionPool:
    """A persistent pool sized for many concurrent requests to one LiteLLM."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = settings.pool_size
    # Below uvicorn's 5 s keep-alive, so we rarely reuse a connection LiteLLM is closing.
    pool.cachedConnectionTimeout = 4
    pool.retryAutomatically = True
    return quiet_pool(pool)


class _Target:
    """What ``PooledAgent`` keeps of one URL: the pool's key, the endpoint, the path it
    asks for and the Host header."""

    __slots__ = ("endpoint", "host", "key", "path")

    def __init__(self, uri: URI, endpoint: IStreamClientEndpoint) -> None:
        self.key = (uri.scheme, uri.host, uri.port)
        self.endpoint = endpoint
        self.path = uri.originForm
        default_port = (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443))
        host = b"[" + uri.host + b"]" if isIPv6Address(uri.host.decode("ascii")) else uri.host
        self.host = host if default_port else b"%b:%d" % (host, uri.port)


@implementer(IAgent)
class PooledAgent:
    """``Agent.request`` over the pool, remembering each URL: ``Agent`` parses the URL,
    builds (and IDNA-encodes) an endpoint, copies the headers and works out the Host
    header on every request, some 3 % of a forwarded request's time. URLs with ids or a
    query in them are not kept past ``MAX_TARGETS``."""

    MAX_TARGETS = 512

    def __init__(self, pool: HTTPConnectionPool, endpoints: IAgentEndpointFactory) -> None:
        self._pool = pool
        self._endpoints = endpoints
        self._by_endpoint: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}
        self._targets: dict[bytes, _Target] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        target = self._targets.get(uri)
        if target is None:
            try:
                target = self._target(uri)
            except Exception:
                return defer.fail()
        # Every caller's headers are its own copy (treq's decoder agent copies them).
        headers = Headers() if headers is None else headers
        if not headers.hasHeader(b"host"):
            headers.addRawHeader(b"host", target.host)
        persistent = self._pool.persistent

        def connected(protocol: Any) -> defer.Deferred[IResponse]:
            request = client_request(method, target.path, headers, bodyProducer, persistent)
            response: defer.Deferred[IResponse] = protocol.request(request)
            return response

        return self._pool.getConnection(target.key, target.endpoint).addCallback(connected)

    def _target(self, uri: bytes) -> _Target:
        parsed = URI.fromBytes(checked_uri(uri))
        key = (parsed.scheme, parsed.host, parsed.port)
        endpoint = self._by_endpoint.get(key)
        if endpoint is None:
            endpoint = self._by_endpoint[key] = self._endpoints.endpointForURI(parsed)
        target = _Target(parsed, endpoint)
        if len(self._targets) >= self.MAX_TARGETS:
            self._targets.clear()
        self._targets[uri] = target
        return target


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """Where ``Agent`` connects, as its own factory does (TCP for http, TLS with the
    browser-like policy for https), but an IP address is connected to straight:
    ``HostnameEndpoint`` resolves even a literal address in a thread, and defines a class on
    every connect, some 0.4 ms per new connection that 1,000 streams opened together each
    pay. A host name still goes through ``HostnameEndpoint`` (resolution, IPv4 and IPv6)."""

    def __init__(
        self, reactor: Any, connect_timeout: float, tls: IPolicyForHTTPS | None = None
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = tls if tls is not None else BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII") from None
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")


def make_http_client(reactor: Any, pool: HTTPConnectionPool, settings: Settings) -> Any:
    """treq's HTTPClient on our pool; cookies refused, so no state leaks between clients."""
    agent = PooledAgent(pool, UpstreamEndpoints(reactor, settings.connect_timeout))
    jar: Any = NO_COOKIES  # treq's type names its own jar class; any CookieJar works
    return treq.client.HTTPClient(agent, cookiejar=jar, data_to_body_producer=body_producer)


class WireURL(EncodedURL):
    """A URL already in its wire form: treq need not IDNA-encode it, nor write it out again,
    on every request."""

    _text: str | None = None

    def to_uri(self) -> WireURL:  # type: ignore[override]
        return self

    def to_text(self, with_password: bool = False) -> str:
        if with_password:
            return super().to_text(with_password)
        if self._text is None:
            self._text = super().to_text()
        return self._text


class _NoCookies(CookieJar):
    """A jar that never sends nor keeps a cookie, so no state passes between clients; treq's
    cookie handling would otherwise run the standard library's cookie policy on every request
    and every answer."""

    def __init__(self) -> None:
        super().__init__(policy=DefaultCookiePolicy(allowed_domains=[]))

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


# The client's jar, and each request's cookies (treq would build an empty jar per request).
NO_COOKIES = _NoCookies()


__all__ = [
    "NO_COOKIES",
    "BytesProducer",
    "PooledAgent",
    "UpstreamEndpoints",
    "WireURL",
    "body_producer",
    "make_http_client",
    "make_pool",
]
