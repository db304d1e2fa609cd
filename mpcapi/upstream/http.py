"""treq over our own connection pool: persistent connections, one endpoint per LiteLLM host,
URLs in wire form, no cookies, bodies written at once."""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import treq
from hyperlink import EncodedURL
from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from mpcapi.config.settings import Settings
from mpcapi.internals import quiet_pool, standard_endpoints


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


@implementer(IAgentEndpointFactory)
class _ReusedEndpoints:
    """One endpoint per upstream host: Agent would build (and IDNA-encode) one per request."""

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._standard = standard_endpoints(reactor, connect_timeout)
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._standard.endpointForURI(uri)
        return endpoint


def make_http_client(reactor: Any, pool: HTTPConnectionPool, settings: Settings) -> Any:
    """treq's HTTPClient on our pool; cookies refused, so no state leaks between clients."""
    endpoints = _ReusedEndpoints(reactor, settings.connect_timeout)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
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
    "WireURL",
    "body_producer",
    "make_http_client",
    "make_pool",
]
