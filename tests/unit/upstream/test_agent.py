"""``PooledAgent``: what ``Agent.request`` would send, with each URL parsed once."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.web.client import URI
from twisted.web.http_headers import Headers

from mpcapi.upstream.http import BytesProducer, PooledAgent


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
