"""The private Twisted and txredisapi APIs of ``mpcapi.internals`` still do what we rely on.

Each test fails when an upgrade renames, moves or changes one of them."""

from __future__ import annotations

from typing import Any

import pytest
import txredisapi
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.web import http, server
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel

from mpcapi.internals import (
    HookedChannel,
    HookedRequest,
    channel_of,
    checked_uri,
    client_request,
    forget_exit_signal,
    negotiating_protocol,
    quiet_pool,
    redis_pool_size,
)


def test_a_pool_builds_its_connections_with_its_factory_attribute() -> None:
    pool = HTTPConnectionPool(Clock())
    assert pool._factory is _HTTP11ClientFactory  # what quiet_pool replaces
    quieted = quiet_pool(pool)._factory
    assert issubclass(quieted, _HTTP11ClientFactory)
    assert quieted.noisy is False


class _Recorded(HookedChannel):
    def __init__(self) -> None:
        super().__init__()
        self.bad: list[bool] = []

    def bad_request(self) -> None:
        self.bad.append(True)


def test_a_request_that_is_not_http_reaches_bad_request() -> None:
    channel = _Recorded()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"NOT HTTP AT ALL\r\n")
    assert channel.bad == [True]


def test_twisteds_own_bad_request_answer_is_still_there() -> None:
    channel = HookedChannel()
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.bad_request()
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request")


def test_the_request_line_and_the_unparsed_buffer() -> None:
    channel = HookedChannel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"POST /api/chat/completions HTTP/1.1\r\nHost: x\r\nPartial-hea")
    assert channel.request_line() == (b"POST", b"/api/chat/completions")
    assert channel._buffer == b"Partial-hea"  # what stop_parsing throws away
    channel.stop_parsing()
    assert channel._buffer == b""


def test_the_negotiating_protocol_wraps_our_channel() -> None:
    channel = HookedChannel()
    protocol = negotiating_protocol(channel)
    assert channel_of(protocol) is channel
    assert channel_of(channel) is channel


def test_a_finished_request_is_cleaned_up_once() -> None:
    cleaned: list[bool] = []

    class Recorded(HookedRequest):
        def cleaned_up(self) -> None:
            cleaned.append(True)

    site = server.Site(Resource())
    channel: Any = DummyChannel()
    channel.site = site
    request = Recorded(channel, False)
    request.setResponseCode(200)
    request.write(b"x")
    request.finish()
    assert cleaned == [True]
    assert isinstance(request, http.Request)


def test_the_reactor_keeps_the_signal_it_will_exit_with() -> None:
    assert hasattr(reactor, "_exitSignal")
    saved = reactor._exitSignal  # type: ignore[attr-defined]
    try:
        reactor._exitSignal = 15  # type: ignore[attr-defined]
        forget_exit_signal(reactor)
        assert reactor._exitSignal is None  # type: ignore[attr-defined]
    finally:
        reactor._exitSignal = saved  # type: ignore[attr-defined]


def test_a_lazy_redis_pool_tells_how_many_connections_it_made() -> None:
    events: list[Any] = []
    globalLogPublisher.addObserver(events.append)
    try:
        handler = txredisapi.lazyConnectionPool(host="127.0.0.1", port=1, poolsize=2)
        assert redis_pool_size(handler) == 0  # lazy: nothing connected yet
        assert isinstance(handler._factory.size, int)
        handler._factory.stopTrying()
        assert redis_pool_size(object()) == 1  # anything else: assume connected
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_agents_uri_check_refuses_control_characters() -> None:
    assert checked_uri(b" http://127.0.0.1:4000/models ") == b"http://127.0.0.1:4000/models"
    with pytest.raises(ValueError):
        checked_uri(b"http://127.0.0.1:4000/files/a\r\nx: y")


def test_the_client_request_agent_hands_a_connection() -> None:
    headers = Headers({b"host": [b"litellm"]})
    request = client_request(b"POST", b"/chat/completions", headers, None, True)
    assert (request.method, request.uri, request.persistent) == (
        b"POST",
        b"/chat/completions",
        True,
    )
    assert request.headers is headers and request.bodyProducer is None
    transport = StringTransport()
    request.writeTo(transport)
    assert transport.value().startswith(b"POST /chat/completions HTTP/1.1\r\n")
