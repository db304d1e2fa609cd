"""The gateway on a real loopback socket: body limits, disconnects, backpressure.

These need real TCP connections (StubTreq has no sockets to close), so they run the
real reactor with a small in-process upstream; still no LiteLLM and no subprocess.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import LogEvent, LogLevel
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from mpcapi.config.live import LiveSettings
from mpcapi.config.settings import Settings
from mpcapi.http.site import ConnectionCap, GatewaySite, LimitedRequest
from mpcapi.runtime.build import build_gateway
from mpcapi.upstream.client import LiteLLMClient
from mpcapi.upstream.http import make_http_client, make_pool
from tests.support.gateway import CHAT

LIMIT = 64 * 1024


def pause(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d


@implementer(IPushProducer)
class EventPump:
    """Writes SSE events while its consumer lets it: honours pause/resume like a real server."""

    padding = b"x" * 65536

    def __init__(self, request: Request, interval: float, burst: int) -> None:
        self.request = request
        self.interval = interval
        self.burst = burst
        self.paused = False
        self.times_paused = 0
        self.written = 0
        self.stopped = False
        request.registerProducer(self, True)
        self._tick()

    def _tick(self) -> None:
        if self.stopped or self.paused:
            return
        for _ in range(self.burst):
            event = b'data: {"n": %d, "pad": "%s"}\n\n' % (self.written, self.padding)
            self.written += 1
            self.request.write(event)
        reactor.callLater(self.interval, self._tick)  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        self.paused = True
        self.times_paused += 1

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._tick()

    def stopProducing(self) -> None:
        self.stopped = True


class SlowUpstream(Resource):
    """Streams events (or never answers, or stalls mid-body); records departures."""

    isLeaf = True

    def __init__(self, mode: str, interval: float = 0.05, burst: int = 1) -> None:
        super().__init__()
        self.mode = mode
        self.interval = interval
        self.burst = burst
        self.arrived: defer.Deferred[float] = defer.Deferred()
        self.left: defer.Deferred[float] = defer.Deferred()
        self.bodies: list[bytes] = []
        self.pump: EventPump | None = None

    def render_POST(self, request: Request) -> int:
        self.bodies.append(request.content.read() if request.content else b"")
        request.notifyFinish().addErrback(lambda _: self.left.callback(time.monotonic()))
        self.arrived.callback(time.monotonic())
        if self.mode == "stream":
            request.setHeader(b"content-type", b"text/event-stream")
            self.pump = EventPump(request, self.interval, self.burst)
        elif self.mode == "partial":
            request.setHeader(b"content-type", b"application/json")
            request.write(b'{"partial": ')
        return NOT_DONE_YET


@attrs.define
class Running:
    url: str
    port: int
    upstream: SlowUpstream
    client: LiteLLMClient


@pytest_twisted.async_yield_fixture
async def running() -> AsyncIterator[Any]:
    started: list[Any] = []

    async def start(mode: str = "stream", **overrides: Any) -> Running:
        upstream = SlowUpstream(mode)
        upstream_port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{upstream_port.getHost().port}"
        settings = Settings(
            litellm_base_url=base, max_body_bytes=LIMIT, usage_ledger=False, **overrides
        )
        pool = make_pool(reactor, settings)
        http = make_http_client(reactor, pool, settings)
        parts = build_gateway(settings, reactor, reactor, http)  # type: ignore[arg-type]
        client = parts.upstream
        site = GatewaySite(
            parts.gateway.resource(),
            settings.max_body_bytes,
            settings.read_timeout,
            settings.error_format,
            timeout=settings.idle_timeout,
        )
        connections = ConnectionCap(site, settings.max_connections)
        port = reactor.listenTCP(0, connections, interface="127.0.0.1")  # type: ignore[attr-defined]
        started.extend([port, upstream_port, pool])
        number = port.getHost().port
        return Running(f"http://127.0.0.1:{number}", number, upstream, client)

    yield start
    for thing in started:
        if hasattr(thing, "closeCachedConnections"):
            await thing.closeCachedConnections()
        else:
            await thing.stopListening()


class RawClient(protocol.Protocol):
    """Sends raw bytes, collects what comes back."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.got_data: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.got_data.called:
            self.got_data.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


async def raw_connect(port: int) -> RawClient:
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client


def request_head(length: int | None, extra: bytes = b"") -> bytes:
    size = b"content-length: %d\r\n" % length if length is not None else b""
    chunked = b"transfer-encoding: chunked\r\n" if length is None else b""
    return (
        b"POST /api/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + size
        + chunked
        + extra
        + b"\r\n"
    )


@pytest_twisted.ensureDeferred
async def test_announced_body_over_the_limit_is_refused_before_it_is_sent(running: Any) -> None:
    gateway = await running()
    client = await raw_connect(gateway.port)
    client.transport.write(request_head(LIMIT + 1, b"expect: 100-continue\r\n"))
    await defer.DeferredList([client.closed], fireOnOneCallback=True).addTimeout(5, reactor)
    head, _, body = client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in client.received
    document = json.loads(body)
    assert document["error"]["code"] == "payload_too_large"
    assert str(LIMIT) in document["message"]
    assert document["request_id"]
    assert gateway.upstream.bodies == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_refused_midway(running: Any) -> None:
    gateway = await running()
    client = await raw_connect(gateway.port)
    client.transport.write(request_head(None))
    chunk = b"x" * 16384
    for _ in range(LIMIT // len(chunk) + 2):
        client.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    await client.got_data.addTimeout(5, reactor)
    assert client.received.startswith(b"HTTP/1.1 413 ")
    assert gateway.upstream.bodies == []


@pytest_twisted.ensureDeferred
async def test_body_within_the_limit_is_forwarded_whole(running: Any) -> None:
    gateway = await running("partial")
    padding = "x" * (LIMIT - 200)
    body = json.dumps({**CHAT, "stream": False, "pad": padding}).encode()
    assert len(body) < LIMIT
    pending = treq.post(f"{gateway.url}/api/chat/completions", data=body)
    await gateway.upstream.arrived.addTimeout(5, reactor)
    assert gateway.upstream.bodies == [body]
    pending.cancel()
    # The cancelled request fails; consumed here, not left to be reported when collected.
    with pytest.raises(ResponseNeverReceived):
        await pending


@pytest.mark.parametrize("mode", ["stream", "silent", "partial"])
@pytest_twisted.ensureDeferred
async def test_client_leaving_closes_the_upstream_within_a_second(
    running: Any, mode: str, log_events: list[LogEvent]
) -> None:
    gateway = await running(mode)
    client = await raw_connect(gateway.port)
    body = json.dumps({**CHAT, "stream": mode == "stream"}).encode()
    client.transport.write(request_head(len(body)) + body)
    await gateway.upstream.arrived.addTimeout(5, reactor)
    await pause(0.2)
    if mode == "stream":
        assert client.received.count(b"data: ") >= 2, "events flow before the client leaves"
    left_at = time.monotonic()
    client.transport.loseConnection()
    upstream_closed_at = await gateway.upstream.left.addTimeout(3, reactor)
    assert upstream_closed_at - left_at < 1.0
    await pause(0.1)
    # However the request ended (before headers, mid-body, mid-stream), it no longer counts.
    assert [u.in_flight for u in gateway.client.balancer.instances] == [0]
    failures = [
        event
        for event in log_events
        if event.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]
    assert failures == [], "a client leaving is routine, not an error"


@pytest_twisted.ensureDeferred
async def test_slow_reader_pauses_the_upstream(running: Any) -> None:
    gateway = await running("stream")
    gateway.upstream.interval, gateway.upstream.burst = 0, 4
    client = await raw_connect(gateway.port)
    client.transport.pauseProducing()  # a client that reads nothing
    body = json.dumps({**CHAT, "stream": True}).encode()
    client.transport.write(request_head(len(body)) + body)
    await gateway.upstream.arrived.addTimeout(5, reactor)
    await pause(1.5)
    pump = gateway.upstream.pump
    # The gateway stopped reading once the client's socket was full, so the upstream's
    # own buffers filled and it was told to pause: memory stays bounded by socket buffers.
    assert pump.times_paused >= 1
    blocked_start = pump.written
    await pause(0.5)
    written_while_blocked = pump.written - blocked_start
    client.transport.resumeProducing()  # reading again lets the flow run
    flowing_start = pump.written
    await pause(0.5)
    written_while_flowing = pump.written - flowing_start
    # Only socket buffers' worth went out before the pause (a few MB, not unbounded).
    assert blocked_start * len(EventPump.padding) < 32 * 1024 * 1024
    assert written_while_flowing > 10 * max(written_while_blocked, 1)
    client.transport.loseConnection()
    await gateway.upstream.left.addTimeout(3, reactor)


def parse_answer(raw: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """The status line, the headers (lower-case names) and the body of one raw answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


HUGE_HEADERS = b"".join(b"x-pad-%d: %s\r\n" % (n, b"p" * 1000) for n in range(20))
MALFORMED = {
    "request line": b"NONSENSE\r\n\r\n",
    "request line too long": b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nhost: x\r\n\r\n",
    "header without a colon": b"GET /health HTTP/1.1\r\nhost: x\r\nno colon\r\n\r\n",
    "header name with a space": b"GET /health HTTP/1.1\r\nbad name: 1\r\n\r\n",
    "header block too long": b"GET /health HTTP/1.1\r\n" + HUGE_HEADERS + b"\r\n",
    "Content-Length not a number": request_head(None).replace(
        b"transfer-encoding: chunked", b"content-length: 12abc"
    ),
    "two Content-Lengths": request_head(10, b"content-length: 11\r\n"),
    "unknown Transfer-Encoding": request_head(None).replace(b": chunked", b": gzip"),
    "bad chunked encoding": request_head(None) + b"zz\r\nhello\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
@pytest_twisted.ensureDeferred
async def test_a_malformed_request_gets_a_400_in_our_error_shape(
    running: Any, name: str, log_events: list[LogEvent]
) -> None:
    gateway = await running()
    client = await raw_connect(gateway.port)
    client.transport.write(MALFORMED[name])
    await client.closed.addTimeout(5, reactor)
    status, headers, body = parse_answer(client.received)
    assert status == b"HTTP/1.1 400 Bad Request"
    document = json.loads(body)
    assert document["error"]["code"] == "bad_request"
    assert document["message"]
    assert headers[b"x-request-id"] == document["request_id"].encode()
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == b"%d" % len(body)
    assert headers[b"connection"] == b"close"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"server"] == b"mpc-api"
    assert gateway.upstream.bodies == []
    [logged] = [e for e in log_events if e.get("request_id") == document["request_id"]]
    assert (logged["status"], logged["outcome"]) == (400, "refused")


@pytest_twisted.ensureDeferred
async def test_answers_written_on_the_connection_follow_the_error_format(running: Any) -> None:
    openai_style, seed = await running(), await running(error_format="seed")
    shapes = []
    for gateway in (openai_style, seed):
        client = await raw_connect(gateway.port)
        client.transport.write(request_head(LIMIT + 1))
        await client.closed.addTimeout(5, reactor)
        shapes.append(json.loads(client.received.partition(b"\r\n\r\n")[2])["error"])
    message = f"request body exceeds the limit of {LIMIT} bytes"
    assert shapes == [
        {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "payload_too_large",
        },
        "Payload Too Large",
    ]


@pytest_twisted.ensureDeferred
async def test_a_malformed_request_after_a_good_one_keeps_the_clients_request_id(
    running: Any,
) -> None:
    gateway = await running()
    client = await raw_connect(gateway.port)
    client.transport.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    await client.got_data.addTimeout(5, reactor)
    assert client.received.startswith(b"HTTP/1.1 200 ")
    await pause(0.1)
    client.received = b""
    client.transport.write(b"GET /health HTTP/1.1\r\nx-request-id: mine-1\r\nbroken\r\n\r\n")
    await client.closed.addTimeout(5, reactor)
    status, headers, body = parse_answer(client.received)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert headers[b"x-request-id"] == b"mine-1"
    assert json.loads(body)["request_id"] == "mine-1"


@pytest_twisted.ensureDeferred
async def test_a_request_too_slow_to_arrive_gets_408(running: Any) -> None:
    gateway = await running(read_timeout=0.5)
    client = await raw_connect(gateway.port)
    client.transport.write(b"POST /api/chat/completions HTTP/1.1\r\nhost: x\r\n")  # and stalls
    await client.closed.addTimeout(5, reactor)
    head, _, body = client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert gateway.upstream.bodies == []


@pytest_twisted.ensureDeferred
async def test_an_idle_keep_alive_connection_is_closed(running: Any) -> None:
    gateway = await running(idle_timeout=0.5)
    client = await raw_connect(gateway.port)
    client.transport.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    await client.got_data.addTimeout(5, reactor)
    assert client.received.startswith(b"HTTP/1.1 200 ")
    opened = time.monotonic()
    await client.closed.addTimeout(5, reactor)
    assert 0.3 < time.monotonic() - opened < 3


@pytest_twisted.ensureDeferred
async def test_connections_past_the_cap_get_503(running: Any) -> None:
    gateway = await running(max_connections=2)
    first, second = await raw_connect(gateway.port), await raw_connect(gateway.port)
    third = await raw_connect(gateway.port)
    await third.closed.addTimeout(5, reactor)
    head, _, body = third.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert json.loads(body)["error"]["code"] == "service_unavailable"
    assert b"x-request-id: " + json.loads(body)["request_id"].encode() in head
    first.transport.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    await first.got_data.addTimeout(5, reactor)
    assert first.received.startswith(b"HTTP/1.1 200 "), "connections within the cap are served"
    for client in (first, second):
        client.transport.loseConnection()


class CookieSetter(Resource):
    """Sets a cookie on every answer and notes the Cookie header of every request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.cookies: list[bytes | None] = []

    def render(self, request: Any) -> bytes:
        self.cookies.append(request.getHeader(b"cookie"))
        request.setHeader(b"set-cookie", b"session=abc; Path=/")
        request.setHeader(b"content-type", b"application/json")
        return b'{"object": "list", "data": []}'


@pytest_twisted.ensureDeferred
async def test_cookies_set_by_litellm_are_never_sent_back() -> None:
    """No state passes from one client's request to another's through cookies."""
    upstream = CookieSetter()
    listening = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{listening.getHost().port}"
    settings = Settings(litellm_base_url=base)
    pool = make_pool(reactor, settings)
    client = LiteLLMClient(
        LiveSettings(settings),
        make_http_client(reactor, pool, settings),
        reactor,  # type: ignore[arg-type]
    )
    try:
        for _ in range(3):
            response = await client.send("GET", "/models", request_id="r")
            await client.read_body(response)
        assert upstream.cookies == [None, None, None]
    finally:
        await pool.closeCachedConnections()
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_finished_request_keeps_nothing_it_needed_only_for_its_answer(
    running: Any,
) -> None:
    gateway = await running()
    gc.collect()
    gc.disable()  # the finished request stays where the collector would find it
    try:
        response = await treq.get(f"{gateway.url}/health", headers={"x-request-id": "scrubbed"})
        assert response.code == 200
        assert response.headers.getRawHeaders(b"x-request-id") == [b"scrubbed"]
        assert (await response.json())["status"] == "ok"
        finished = [
            o
            for o in gc.get_objects()
            if isinstance(o, LimitedRequest) and o.__dict__.get("finished")
        ]
        assert finished
        for request in finished:
            kept = set(vars(request))
            assert not kept & {"requestHeaders", "responseHeaders", "_adapterCache", "args"}
            assert request.code == 200  # what the logs read stays
    finally:
        gc.enable()


def test_a_channel_asks_whether_it_is_tls_once_and_answers_for_its_transport() -> None:
    from twisted.internet.interfaces import ISSLTransport
    from twisted.internet.testing import StringTransport
    from zope.interface import directlyProvides

    from mpcapi.http.site import GatewayChannel

    plain = GatewayChannel()
    plain.transport = StringTransport()
    assert plain.isSecure() is False and plain.isSecure() is False

    tls_transport = StringTransport()
    directlyProvides(tls_transport, ISSLTransport)
    secure = GatewayChannel()
    secure.transport = tls_transport
    assert secure.isSecure() is True
    directlyProvides(tls_transport)  # the answer is the connection's, kept
    assert secure.isSecure() is True
