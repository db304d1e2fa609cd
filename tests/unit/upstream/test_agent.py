"""``PooledAgent`` and ``UpstreamEndpoints``: what ``Agent.request`` would send and where it
would connect, with each URL parsed once and IP addresses connected to straight."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from mpcapi.upstream.http import BytesProducer, PooledAgent, UpstreamEndpoints


class _Endpoints:
    def __init__(self) -> None:
        self.made: list[bytes] = []

    def endpointForURI(self, uri: URI) -> Any:
        self.made.append(uri.toBytes())
        return ("endpoint", uri.host, uri.port)


class _Protocol:
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def request(self, request: Any) -> defer.Deferred[str]:
        self.requests.append(request)
        return defer.succeed("the response")


class _Pool:
    persistent = True

    def __init__(self) -> None:
        self.protocol = _Protocol()
        self.asked: list[tuple[Any, Any]] = []

    def getConnection(self, key: Any, endpoint: Any) -> defer.Deferred[_Protocol]:
        self.asked.append((key, endpoint))
        return defer.succeed(self.protocol)


def _agent() -> tuple[PooledAgent, _Pool, _Endpoints]:
    pool, endpoints = _Pool(), _Endpoints()
    return PooledAgent(pool, endpoints), pool, endpoints  # type: ignore[arg-type]


def _sent(agent: PooledAgent, uri: bytes, headers: Headers | None = None) -> Any:
    results: list[Any] = []
    agent.request(b"POST", uri, headers, BytesProducer(b"{}")).addBoth(results.append)
    assert results == ["the response"]


@pytest.mark.parametrize(
    ("uri", "host"),
    [
        (b"http://127.0.0.1:4000/chat/completions", b"127.0.0.1:4000"),
        (b"http://litellm/chat/completions", b"litellm"),
        (b"https://gateway.example:443/chat/completions", b"gateway.example"),
        (b"https://gateway.example:8443/chat/completions", b"gateway.example:8443"),
        (b"http://[::1]:4000/chat/completions", b"[::1]:4000"),
    ],
)
def test_the_request_names_its_host_as_agent_does(uri: bytes, host: bytes) -> None:
    agent, pool, _ = _agent()
    _sent(agent, uri)
    (request,) = pool.protocol.requests
    assert request.headers.getRawHeaders(b"host") == [host]
    assert request.method == b"POST"
    assert request.uri == b"/chat/completions"
    assert request.persistent is True


def test_a_url_is_parsed_and_its_endpoint_made_once() -> None:
    agent, pool, endpoints = _agent()
    for _ in range(3):
        _sent(agent, b"http://127.0.0.1:4000/chat/completions")
    _sent(agent, b"http://127.0.0.1:4000/embeddings")
    assert endpoints.made == [b"http://127.0.0.1:4000/chat/completions"]  # one per host
    key = (b"http", b"127.0.0.1", 4000)
    assert [asked[0] for asked in pool.asked] == [key] * 4
    assert [r.uri for r in pool.protocol.requests] == [b"/chat/completions"] * 3 + [b"/embeddings"]


def test_the_path_keeps_its_query() -> None:
    agent, pool, _ = _agent()
    _sent(agent, b"http://127.0.0.1:4000/files?purpose=batch&limit=2")
    assert pool.protocol.requests[0].uri == b"/files?purpose=batch&limit=2"


def test_a_host_header_given_is_kept() -> None:
    agent, pool, _ = _agent()
    _sent(agent, b"http://127.0.0.1:4000/models", Headers({b"host": [b"litellm.internal"]}))
    assert pool.protocol.requests[0].headers.getRawHeaders(b"host") == [b"litellm.internal"]


def test_a_url_agent_would_refuse_fails_and_sends_nothing() -> None:
    agent, pool, _ = _agent()
    failures: list[Any] = []
    agent.request(b"GET", b"http://127.0.0.1:4000/files/a\r\nx: y").addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(ValueError)
    assert pool.asked == [] and pool.protocol.requests == []


def test_urls_with_ids_do_not_pile_up() -> None:
    agent, pool, endpoints = _agent()
    for n in range(PooledAgent.MAX_TARGETS * 2 + 5):
        _sent(agent, b"http://127.0.0.1:4000/files/file-%d" % n)
    assert len(agent._targets) <= PooledAgent.MAX_TARGETS
    assert len(endpoints.made) == 1
    assert pool.protocol.requests[-1].uri == b"/files/file-%d" % (PooledAgent.MAX_TARGETS * 2 + 4)


def _connected(endpoint: Any, reactor: MemoryReactorClock) -> tuple[str, int, float]:
    endpoint.connect(Factory.forProtocol(Protocol))
    host, port, _, timeout, _ = reactor.tcpClients[-1]
    return host, port, timeout


def test_an_ip_address_is_connected_to_straight() -> None:
    reactor = MemoryReactorClock()
    endpoints = UpstreamEndpoints(reactor, 3.0)
    v4 = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:4000/models"))
    v6 = endpoints.endpointForURI(URI.fromBytes(b"http://[::1]:4000/models"))
    assert isinstance(v4, TCP4ClientEndpoint) and isinstance(v6, TCP6ClientEndpoint)
    assert _connected(v4, reactor) == ("127.0.0.1", 4000, 3.0)
    assert _connected(v6, reactor) == ("::1", 4000, 3.0)


def test_a_host_name_is_resolved_by_a_hostname_endpoint() -> None:
    endpoints = UpstreamEndpoints(MemoryReactorClock(), 3.0)
    endpoint = endpoints.endpointForURI(URI.fromBytes(b"http://litellm:4000/models"))
    assert isinstance(endpoint, HostnameEndpoint)


def test_https_wraps_the_connection_in_tls_for_its_host() -> None:
    reactor = MemoryReactorClock()
    asked: list[tuple[bytes, int]] = []

    class Policy(BrowserLikePolicyForHTTPS):
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            asked.append((hostname, port))
            return super().creatorForNetloc(hostname, port)

    endpoints = UpstreamEndpoints(reactor, 3.0, Policy())
    endpoint = endpoints.endpointForURI(URI.fromBytes(b"https://10.0.0.7/models"))
    assert asked == [(b"10.0.0.7", 443)]
    assert _connected(endpoint, reactor) == ("10.0.0.7", 443, 3.0)


def test_another_scheme_is_not_supported() -> None:
    endpoints = UpstreamEndpoints(MemoryReactorClock(), 3.0)
    with pytest.raises(SchemeNotSupported):
        endpoints.endpointForURI(URI.fromBytes(b"ftp://127.0.0.1/models"))


@pytest_twisted.ensureDeferred
async def test_the_client_reaches_a_server_by_address_and_by_name() -> None:
    from twisted.internet import reactor

    from mpcapi.config.settings import Settings
    from mpcapi.upstream.http import NO_COOKIES, make_http_client, make_pool

    class Hello(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return b"hello " + (request.getHeader(b"host") or b"")

    port = reactor.listenTCP(0, Site(Hello()), interface="127.0.0.1")
    settings = Settings()
    pool = make_pool(reactor, settings)
    client = make_http_client(reactor, pool, settings)
    try:
        number = port.getHost().port
        for host in ("127.0.0.1", "localhost"):
            response = await client.request(
                "GET", f"http://{host}:{number}/", cookies=NO_COOKIES, unbuffered=True
            )
            assert response.code == 200
            assert await response.content() == f"hello {host}:{number}".encode()
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()
