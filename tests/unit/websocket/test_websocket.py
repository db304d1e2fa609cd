"""The WebSocket endpoint, in memory: an autobahn client and the real Site, Klein route and
WebSocketResource over iosim transports, in front of a fake LiteLLM (StubTreq) on a task.Clock."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.logger import LogEvent
from twisted.test import iosim
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyRequest

from mpcapi.errors import ApiError
from mpcapi.http.site import GatewaySite
from mpcapi.openai.sse import SSEEvent, SSEParser
from mpcapi.upstream.client import LiteLLMClient
from mpcapi.websocket.protocol import GatewayWebSocketProtocol, same_host
from mpcapi.websocket.session import WebSocketSession
from tests.support.gateway import CHAT, answer, make_harness, never_answer
from tests.support.logs import captured

SERVER = IPv4Address("TCP", "127.0.0.1", 3000)
CLIENT = IPv4Address("TCP", "127.0.0.1", 50000)
TEXT_COMPLETION = {"model": "gpt-4o-mini", "prompt": "Say hi"}


def chunk(n: int) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"delta": {"content": f"t{n}"}}]}


def event(n: int) -> bytes:
    return b"data: " + json.dumps(chunk(n)).encode() + b"\n\n"


class Client(WebSocketClientProtocol):
    """A WebSocket client that keeps every message it receives, parsed."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any]] = []
        self.opened = False
        self.closed = False
        self.handshake_status: int | None = None

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = True

    def send_json(self, message: Any) -> None:
        self.sendMessage(json.dumps(message).encode())

    def of(self, message_id: str) -> list[dict[str, Any]]:
        return [message for message in self.messages if message.get("id") == message_id]


class HeldStream:
    """A LiteLLM stream that the test writes event by event; knows whether it was closed."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.lost: list[bool] = []

    def __call__(self, request: Request) -> int:
        index = len(self.requests)
        self.requests.append(request)
        self.lost.append(False)
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"")
        request.notifyFinish().addErrback(lambda _: self.lost.__setitem__(index, True))
        return NOT_DONE_YET


def whole_stream(*events: bytes) -> Any:
    """A LiteLLM stream that sends ``events`` at once and ends."""

    def handle(request: Request) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        for raw in events:
            request.write(raw)
        request.finish()
        return NOT_DONE_YET

    return handle


class Harness:
    """The daemon's Site in memory; ``connect`` opens a WebSocket to it."""

    def __init__(self, keys: Any = None, **overrides: Any) -> None:
        built = make_harness(keys=keys, **overrides)
        self.parts = built.parts
        self.settings = built.settings
        self.fake = built.fake
        self.clock = built.clock
        self.upstream_stub = built.upstream_stub
        self.gateway = built.gateway
        # No timers of autobahn's own: they would run on the global reactor.
        self.gateway.websockets.factory.setProtocolOptions(
            openHandshakeTimeout=0, closeHandshakeTimeout=0, autoPingInterval=0, autoPingTimeout=0
        )
        self.site = GatewaySite(
            self.gateway.resource(), self.settings.max_body_bytes, reactor=self.clock
        )
        self.pumps: list[iosim.IOPump] = []
        self.server_transports: list[iosim.FakeTransport] = []

    def connect(self, path: str = "/api/ws", headers: dict[str, str] | None = None) -> Client:
        factory = WebSocketClientFactory(
            url=f"ws://mpcapi.test{path}", headers=headers or {}, reactor=self.clock
        )
        factory.protocol = Client
        factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
        client = factory.buildProtocol(SERVER)
        assert isinstance(client, Client)
        server = self.site.buildProtocol(CLIENT)
        server_transport = iosim.FakeTransport(
            server, isServer=True, hostAddress=SERVER, peerAddress=CLIENT
        )
        client_transport = iosim.FakeTransport(
            client, isServer=False, hostAddress=CLIENT, peerAddress=SERVER
        )
        self.server_transports.append(server_transport)
        self.pumps.append(
            iosim.connect(server, server_transport, client, client_transport, clock=self.clock)
        )
        self.settle()
        return client

    def open(self, path: str = "/api/ws", headers: dict[str, str] | None = None) -> Client:
        client = self.connect(path, headers)
        assert client.opened
        return client

    def protocol(self, index: int = 0) -> GatewayWebSocketProtocol:
        """The server side of the ``index``-th socket, once Klein handed it to autobahn."""
        protocol = self.server_transports[index].protocol
        assert isinstance(protocol, GatewayWebSocketProtocol)
        return protocol

    def session(self, index: int = 0) -> WebSocketSession:
        session = self.protocol(index).session
        assert session is not None
        return session

    def settle(self) -> None:
        for _ in range(10):
            for pump in self.pumps:
                pump.flush()
            self.upstream_stub.flush()

    def step(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    def request(self, client: Client, message_id: str, body: Any = None, **extra: Any) -> None:
        message = {"id": message_id, "type": "chat.completions", "body": body or CHAT, **extra}
        client.send_json(message)
        self.settle()

    def seen_body(self, index: int = -1) -> Any:
        return json.loads(self.fake.seen[index].body)


@pytest.fixture
def harness() -> Harness:
    return Harness()


@pytest.fixture
def logged() -> Iterator[list[Any]]:
    """The per-request log events of WebSocket requests."""
    with captured("mpcapi.request", lambda event: event.get("method") == "WS") as events:
        yield events


# Streams


def test_chunks_then_done(harness: Harness, logged: list[LogEvent]) -> None:
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(
        event(0), event(1), event(2), b"data: [DONE]\n\n"
    )
    client = harness.open()
    harness.request(client, "a", CHAT)
    assert client.messages == [
        {"id": "a", "type": "chunk", "data": chunk(0)},
        {"id": "a", "type": "chunk", "data": chunk(1)},
        {"id": "a", "type": "chunk", "data": chunk(2)},
        {"id": "a", "type": "done"},
    ]
    seen = harness.fake.seen[0]
    assert (seen.method, seen.path) == ("POST", "/chat/completions")
    assert harness.seen_body() == {**CHAT, "stream": True}
    assert seen.header("authorization") == "Bearer sk-ours"
    [entry] = logged
    assert entry["path"] == "/api/ws"
    assert entry["status"] == 200
    assert entry["outcome"] == "completed"
    assert entry["events"] == 3
    assert entry["model"] == "gpt-4o-mini"
    assert entry["ws_type"] == "chat.completions"
    assert entry["ws_id"] == "a"
    assert seen.header("x-request-id") == entry["request_id"]
    assert not harness.session().calls


def test_socket_messages_are_counted_in_metrics_as_ws(harness: Harness) -> None:
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(event(0), b"data: [DONE]\n\n")
    client = harness.open()
    harness.request(client, "a", CHAT)
    harness.request(client, "b", CHAT)
    metrics = harness.parts.metrics.exposition(None)[0].decode()
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("mpcapi_requests_total{") and 'method="WS"' in line
    ]
    assert len(counted) == 1 and 'route="/chat/completions"' in counted[0], counted
    assert counted[0].endswith(" 2.0")


def test_stream_false_is_streamed_anyway(harness: Harness) -> None:
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    client = harness.open()
    harness.request(client, "a", {**CHAT, "stream": False, "stream_options": {"x": 1}})
    assert client.messages == [{"id": "a", "type": "done"}]
    assert harness.seen_body() == {**CHAT, "stream": True, "stream_options": {"x": 1}}


def test_text_completions(harness: Harness) -> None:
    harness.fake.routes[("POST", "/completions")] = whole_stream(
        b'data: {"choices": [{"text": "hi"}]}\n\n', b"data: [DONE]\n\n"
    )
    client = harness.open()
    client.send_json({"id": "t", "type": "completions", "body": TEXT_COMPLETION})
    harness.settle()
    assert client.messages == [
        {"id": "t", "type": "chunk", "data": {"choices": [{"text": "hi"}]}},
        {"id": "t", "type": "done"},
    ]
    assert harness.fake.seen[0].path == "/completions"


def test_a_responses_request_streams_its_events_until_the_completed_one(
    harness: Harness, logged: list[LogEvent]
) -> None:
    """The Responses API ends with ``response.completed``, not [DONE]: the socket says done
    then, with the usage that event carries."""
    usage = {"input_tokens": 3, "output_tokens": 2}
    created = {"type": "response.created", "response": {"id": "resp_9"}}
    delta = {"type": "response.output_text.delta", "delta": "Hi"}
    completed = {"type": "response.completed", "response": {"id": "resp_9", "usage": usage}}
    harness.fake.routes[("POST", "/responses")] = whole_stream(
        *(
            f"event: {document['type']}\ndata: {json.dumps(document)}\n\n".encode()
            for document in (created, delta, completed)
        )
    )
    client = harness.open()
    client.send_json({"id": "r", "type": "responses", "body": {"model": "m", "input": "Hi"}})
    harness.settle()
    assert client.messages == [
        {"id": "r", "type": "chunk", "data": created},
        {"id": "r", "type": "chunk", "data": delta},
        {"id": "r", "type": "chunk", "data": completed},
        {"id": "r", "type": "done"},
    ]
    assert harness.seen_body() == {"model": "m", "input": "Hi", "stream": True}
    [entry] = logged
    assert entry["ws_type"] == "responses"
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (3, 2)
    assert entry["outcome"] == "completed"


def test_a_bad_responses_body_is_refused_naming_the_field(harness: Harness) -> None:
    client = harness.open()
    client.send_json({"id": "r", "type": "responses", "body": {"model": "m"}})
    harness.settle()
    [answer] = client.messages
    assert answer["type"] == "error" and answer["status"] == 400
    assert "input" in answer["message"]
    assert harness.fake.seen == []


def test_the_v1_alias(harness: Harness) -> None:
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    client = harness.open("/v1/ws")
    harness.request(client, "a")
    assert client.messages == [{"id": "a", "type": "done"}]


def test_events_split_anywhere_and_crlf(harness: Harness) -> None:
    held = HeldStream()
    harness.fake.routes[("POST", "/chat/completions")] = held
    client = harness.open()
    harness.request(client, "a")
    raw = event(0).replace(b"\n", b"\r\n") + b": keep-alive\r\n\r\n" + event(1)
    for byte in range(len(raw)):
        held.requests[0].write(raw[byte : byte + 1])
        harness.settle()
    held.requests[0].write(b"data: [DONE]\n\n")
    held.requests[0].finish()
    harness.settle()
    assert [m.get("data") for m in client.messages] == [chunk(0), chunk(1), None]


def test_client_authorization_passes_through_without_our_key() -> None:
    harness = Harness(litellm_api_key="")
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    client = harness.open(headers={"Authorization": "Bearer sk-client"})
    harness.request(client, "a")
    assert harness.fake.seen[0].header("authorization") == "Bearer sk-client"


def test_our_key_wins_over_the_clients(harness: Harness) -> None:
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    client = harness.open(headers={"Authorization": "Bearer sk-client"})
    harness.request(client, "a")
    assert harness.fake.seen[0].header("authorization") == "Bearer sk-ours"


# Cancel, concurrency, close


def test_cancel_stops_the_stream_upstream(harness: Harness, logged: list[LogEvent]) -> None:
    held = HeldStream()
    harness.fake.routes[("POST", "/chat/completions")] = held
    client = harness.open()
    harness.request(client, "a")
    held.requests[0].write(event(0))
    harness.settle()
    assert not held.lost[0]
    client.send_json({"id": "a", "type": "cancel"})
    harness.settle()
    assert held.lost[0]
    assert client.messages == [
        {"id": "a", "type": "chunk", "data": chunk(0)},
        {"id": "a", "type": "cancelled"},
    ]
    assert logged[-1]["outcome"] == "client_cancel"
    assert logged[-1]["events"] == 1
    # Nothing more for "a", even after LiteLLM's timeout; the id is free again.
    harness.step(harness.settings.litellm_timeout + 1)
    assert len(client.messages) == 2
    harness.request(client, "a")
    assert len(held.requests) == 2 and not held.lost[1]


def test_cancel_before_litellm_answers(harness: Harness, logged: list[LogEvent]) -> None:
    lost: list[bool] = []

    def silent(request: Request) -> int:
        request.notifyFinish().addErrback(lambda _: lost.append(True))
        return NOT_DONE_YET

    harness.fake.routes[("POST", "/chat/completions")] = silent
    client = harness.open()
    harness.request(client, "a")
    assert len(harness.fake.seen) == 1
    client.send_json({"id": "a", "type": "cancel"})
    harness.settle()
    assert lost == [True]
    assert client.messages == [{"id": "a", "type": "cancelled"}]
    assert (logged[-1]["outcome"], logged[-1]["status"]) == ("client_cancel", 499)
    assert not harness.session().calls
    harness.step(harness.settings.litellm_timeout + 1)
    assert client.messages == [{"id": "a", "type": "cancelled"}]


def test_cancel_of_an_unknown_id_is_ignored(harness: Harness) -> None:
    client = harness.open()
    client.send_json({"id": "nope", "type": "cancel"})
    harness.settle()
    assert client.messages == []
    assert client.opened and not client.closed


def test_two_requests_in_flight_on_one_socket(harness: Harness) -> None:
    held = HeldStream()
    harness.fake.routes[("POST", "/chat/completions")] = held
    client = harness.open()
    harness.request(client, "a")
    harness.request(client, "b")
    first, second = held.requests
    second.write(event(1))
    harness.settle()
    first.write(event(0))
    harness.settle()
    second.write(b"data: [DONE]\n\n")
    second.finish()
    harness.settle()
    first.write(event(2) + b"data: [DONE]\n\n")
    first.finish()
    harness.settle()
    assert client.of("a") == [
        {"id": "a", "type": "chunk", "data": chunk(0)},
        {"id": "a", "type": "chunk", "data": chunk(2)},
        {"id": "a", "type": "done"},
    ]
    assert client.of("b") == [
        {"id": "b", "type": "chunk", "data": chunk(1)},
        {"id": "b", "type": "done"},
    ]
    assert [m["id"] for m in client.messages] == ["b", "a", "b", "a", "a"]


def test_a_duplicate_id_in_flight_is_refused(harness: Harness) -> None:
    held = HeldStream()
    harness.fake.routes[("POST", "/chat/completions")] = held
    client = harness.open()
    harness.request(client, "a")
    harness.request(client, "a")
    [refusal] = client.messages
    assert refusal["type"] == "error"
    assert (refusal["id"], refusal["status"], refusal["error"]) == ("a", 409, "Conflict")
    assert len(held.requests) == 1
    held.requests[0].write(b"data: [DONE]\n\n")
    harness.settle()
    assert client.messages[-1] == {"id": "a", "type": "done"}


def test_closing_the_socket_cancels_everything(harness: Harness, logged: list[LogEvent]) -> None:
    held = HeldStream()
    harness.fake.routes[("POST", "/chat/completions")] = held
    client = harness.open()
    harness.request(client, "a")
    harness.request(client, "b")
    harness.fake.routes[("POST", "/chat/completions")] = never_answer
    harness.request(client, "c")
    session = harness.session()
    assert set(session.calls) == {"a", "b", "c"}
    client.sendClose(1000)
    harness.settle()
    assert client.closed
    assert held.lost == [True, True]
    assert not session.calls
    assert sorted(entry["outcome"] for entry in logged) == ["client_abort"] * 3
    harness.step(harness.settings.litellm_timeout + 1)
    assert len(logged) == 3


def test_a_dropped_connection_cancels_everything(harness: Harness) -> None:
    held = HeldStream()
    harness.fake.routes[("POST", "/chat/completions")] = held
    client = harness.open()
    harness.request(client, "a")
    transport: Any = client.transport
    transport.abortConnection()
    harness.settle()
    assert held.lost == [True]
    assert not harness.session().calls


# Bad messages: an error each, and the socket stays usable


@pytest.mark.parametrize(
    ("payload", "expected_id", "words"),
    [
        (b"{not json", None, "message is not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b"NaN", None, "not valid JSON"),
        (b'{"type": "chat.completions", "body": {}}', None, '"id" is required'),
        (b'{"id": 7, "type": "chat.completions", "body": {}}', None, '"id" is required'),
        (b'{"id": "x", "type": "images", "body": {}}', "x", '"type" must be one of'),
        (b'{"id": "x", "body": {}}', "x", '"type" must be one of'),
        (b'{"id": "x", "type": "chat.completions"}', "x", '"body" is required'),
        (b'{"id": "x", "type": "chat.completions", "body": {"model": "m"}}', "x", "messages"),
        (b'{"id": "x", "type": "completions", "body": {"model": 5, "prompt": "p"}}', "x", "model"),
    ],
)
def test_bad_messages_get_a_400_and_the_socket_stays_open(
    harness: Harness, logged: list[LogEvent], payload: bytes, expected_id: str | None, words: str
) -> None:
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    client = harness.open()
    client.sendMessage(payload)
    harness.settle()
    [error] = client.messages
    assert error["type"] == "error"
    assert error["id"] == expected_id
    assert (error["status"], error["error"]) == (400, "Bad Request")
    assert words in error["message"]
    assert error["request_id"] == logged[-1]["request_id"]
    assert (logged[-1]["status"], logged[-1]["outcome"]) == (400, "refused")
    assert harness.fake.seen == []
    harness.request(client, "ok")
    assert client.messages[-1] == {"id": "ok", "type": "done"}


def test_a_schema_error_names_its_fields(harness: Harness) -> None:
    client = harness.open()
    harness.request(client, "x", {"model": "m", "messages": [{"role": "wizard", "content": "hi"}]})
    [error] = client.messages
    assert error["status"] == 400
    assert error["message"].startswith("messages[0].role")
    assert error["details"]


def test_binary_messages_are_refused(harness: Harness) -> None:
    client = harness.open()
    client.sendMessage(json.dumps({"id": "a", "type": "cancel"}).encode(), isBinary=True)
    harness.settle()
    [error] = client.messages
    assert (error["status"], error["id"]) == (400, None)
    assert "binary" in error["message"]


@pytest.mark.parametrize("fragment", [0, 100])
def test_an_oversized_message_gets_a_413(fragment: int) -> None:
    harness = Harness(max_body_bytes=1000)
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    client = harness.open()
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    message = json.dumps({"id": "big", "type": "chat.completions", "body": body}).encode()
    client.sendMessage(message, fragmentSize=fragment or None)
    harness.settle()
    [error] = client.messages
    assert (error["type"], error["status"], error["id"]) == ("error", 413, None)
    assert error["message"] == "message exceeds the limit of 1000 bytes"
    assert harness.fake.seen == []
    assert client.opened and not client.closed
    harness.request(client, "ok")
    assert client.messages[-1] == {"id": "ok", "type": "done"}


def test_a_message_at_the_limit_is_read() -> None:
    harness = Harness(max_body_bytes=1000)
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    client = harness.open()
    head = json.dumps({"id": "a", "type": "chat.completions", "body": CHAT})
    message = (head[:-1] + " " * (1000 - len(head)) + "}").encode()
    assert len(message) == 1000
    client.sendMessage(message, fragmentSize=300)
    harness.settle()
    assert client.messages == [{"id": "a", "type": "done"}]


# LiteLLM's errors


def test_a_429_from_litellm_keeps_its_status(harness: Harness, logged: list[LogEvent]) -> None:
    document = {"error": {"message": "slow down", "type": "throttling_error", "code": "429"}}
    harness.fake.routes[("POST", "/chat/completions")] = answer(429, document, {"retry-after": "3"})
    client = harness.open()
    harness.request(client, "a")
    [error] = client.messages
    assert error == {
        "id": "a",
        "type": "error",
        "status": 429,
        "error": "Too Many Requests",
        "message": "slow down",
        "request_id": logged[-1]["request_id"],
        "retry_after": "3",
    }
    assert (logged[-1]["status"], logged[-1]["upstream_status"]) == (429, 429)
    assert logged[-1]["outcome"] == "upstream_error"
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    harness.request(client, "a")
    assert client.messages[-1] == {"id": "a", "type": "done"}


@pytest.mark.parametrize("status", [500, 401])
def test_litellm_failures_are_502(harness: Harness, status: int) -> None:
    document = {"error": {"message": "broken"}}
    harness.fake.routes[("POST", "/chat/completions")] = answer(status, document)
    client = harness.open()
    harness.request(client, "a")
    [error] = client.messages
    assert (error["status"], error["error"]) == (502, "Bad Gateway")
    assert "broken" in error["message"]


def test_a_stream_without_done_is_a_502(harness: Harness, logged: list[LogEvent]) -> None:
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(event(0))
    client = harness.open()
    harness.request(client, "a")
    assert client.messages[0]["type"] == "chunk"
    error = client.messages[1]
    assert (error["type"], error["status"]) == ("error", 502)
    assert error["message"] == "LiteLLM closed the stream without [DONE]"
    assert logged[-1]["outcome"] == "upstream_error"


def test_a_stream_cut_off_is_a_502(harness: Harness) -> None:
    held = HeldStream()
    harness.fake.routes[("POST", "/chat/completions")] = held
    client = harness.open()
    harness.request(client, "a")
    held.requests[0].write(event(0))
    harness.settle()
    transport: Any = held.requests[0].channel.transport
    transport.loseConnection()
    harness.settle()
    error = client.messages[-1]
    assert (error["type"], error["status"]) == ("error", 502)
    assert error["message"].startswith("LiteLLM broke off the stream")


def test_silence_longer_than_the_timeout_is_a_504(logged: list[LogEvent]) -> None:
    harness = Harness(litellm_timeout=5.0)
    held = HeldStream()
    harness.fake.routes[("POST", "/chat/completions")] = held
    client = harness.open()
    harness.request(client, "a")
    harness.step(4)
    held.requests[0].write(event(0))
    harness.settle()
    harness.step(4)
    assert [m["type"] for m in client.messages] == ["chunk"]
    harness.step(1.5)
    error = client.messages[-1]
    assert (error["type"], error["status"], error["error"]) == ("error", 504, "Gateway Timeout")
    assert error["message"] == "LiteLLM sent nothing for 5 s"
    assert held.lost == [True]
    assert logged[-1]["outcome"] == "timeout"


def test_no_answer_within_the_timeout_is_a_504() -> None:
    harness = Harness(litellm_timeout=5.0)
    harness.fake.routes[("POST", "/chat/completions")] = never_answer
    client = harness.open()
    harness.request(client, "a")
    harness.step(5.1)
    [error] = client.messages
    assert (error["status"], error["id"]) == (504, "a")
    assert "did not answer within 5 s" in error["message"]


def test_an_error_event_mid_stream_ends_the_request(harness: Harness) -> None:
    failure = {"error": {"message": "provider melted", "type": "api_error", "code": "429"}}
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(
        event(0), b"data: " + json.dumps(failure).encode() + b"\n\n"
    )
    client = harness.open()
    harness.request(client, "a")
    error = client.messages[-1]
    assert (error["type"], error["status"], error["message"]) == ("error", 429, "provider melted")
    assert len(client.messages) == 2


def test_an_event_that_is_not_json_is_a_502(harness: Harness) -> None:
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: {oops\n\n")
    client = harness.open()
    harness.request(client, "a")
    [error] = client.messages
    assert (error["status"], error["message"]) == (502, "LiteLLM sent an event that is not JSON")


# Flow control


def test_a_slow_client_pauses_litellm_and_stops_the_idle_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness = Harness(litellm_timeout=5.0)
    held = HeldStream()
    harness.fake.routes[("POST", "/chat/completions")] = held
    client = harness.open()
    protocol = harness.protocol()
    assert harness.server_transports[0].producer is protocol
    harness.request(client, "a")
    calls: list[str] = []
    monkeypatch.setattr(iosim.FakeTransport, "pauseProducing", lambda _: calls.append("pause"))
    monkeypatch.setattr(iosim.FakeTransport, "resumeProducing", lambda _: calls.append("resume"))
    protocol.pauseProducing()
    assert calls == ["pause"]
    harness.step(60)
    assert client.messages == []
    protocol.resumeProducing()
    assert calls == ["pause", "resume"]
    harness.step(5.1)
    assert client.messages[-1]["status"] == 504


# Plain HTTP on the WebSocket path, origins, options


@pytest.mark.parametrize("path", ["/api/ws", "/v1/ws"])
def test_plain_http_gets_a_426(harness: Harness, path: str) -> None:
    stub: Any = StubTreq(harness.gateway.resource())
    response = stub.get(f"http://mpcapi.test{path}")
    result: list[Any] = []
    response.addBoth(result.append)
    stub.flush()
    [answer_] = result
    assert answer_.code == 426
    content: list[Any] = []
    answer_.json().addBoth(content.append)
    stub.flush()
    assert content[0]["error"]["code"] == "upgrade_required"
    assert content[0]["request_id"]


def test_the_426_names_the_protocol_to_upgrade_to(harness: Harness) -> None:
    # (Twisted's HTTP client hides the Upgrade header, so it is checked here.)
    with pytest.raises(ApiError) as raised:
        request: Any = DummyRequest([b"api", b"ws"])
        harness.gateway.websockets.resource(request)
    assert raised.value.status == 426
    assert raised.value.headers == {"Upgrade": "websocket"}


def test_post_on_the_websocket_path_is_405(harness: Harness) -> None:
    stub: Any = StubTreq(harness.gateway.resource())
    result: list[Any] = []
    stub.post("http://mpcapi.test/api/ws", data=b"{}").addBoth(result.append)
    stub.flush()
    assert result[0].code == 405


def test_a_web_page_of_another_site_is_refused(harness: Harness) -> None:
    client = harness.connect(headers={"Origin": "https://evil.example"})
    assert not client.opened
    assert client.closed


def test_a_page_of_the_same_host_is_accepted(harness: Harness) -> None:
    client = harness.connect(headers={"Origin": "http://mpcapi.test"})
    assert client.opened


def test_same_host() -> None:
    assert same_host("http://localhost:8080", "localhost:3000")
    assert same_host("https://gw.example", "GW.example")
    assert same_host("http://[::1]:3000", "[::1]:3000")
    assert not same_host("https://evil.example", "gw.example")
    assert not same_host("null", "gw.example")
    assert not same_host("http://gw.example.evil", "gw.example")


def test_socket_options(harness: Harness) -> None:
    factory = make_harness().gateway.websockets.factory
    assert factory.autoPingInterval > 0
    assert factory.autoPingTimeout > 0
    assert factory.maxMessagePayloadSize > 2 * harness.settings.max_body_bytes
    assert factory.webStatus is False


def test_a_bug_is_a_500_without_internals(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def explode(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("secret internals")

    monkeypatch.setattr(LiteLLMClient, "send", explode)
    client = harness.open()
    harness.request(client, "a")
    [error] = client.messages
    assert (error["status"], error["error"]) == (500, "Internal Server Error")
    assert "secret" not in json.dumps(error)
    harness.request(client, "b")
    assert client.messages[-1]["id"] == "b"


# Rate limits and the response cache: the HTTP routes' policy, for every message


def http_chat(harness: Harness, body: Any = None) -> tuple[Any, Any]:
    """A non-streamed POST /api/chat/completions to the same gateway: response, document."""
    stub: Any = StubTreq(harness.gateway.resource())
    result: list[Any] = []
    url = "http://mpcapi.test/api/chat/completions"
    stub.post(url, data=json.dumps(body or CHAT).encode()).addBoth(result.append)
    for _ in range(5):
        harness.upstream_stub.flush()
        stub.flush()
    [response] = result
    content: list[Any] = []
    response.json().addBoth(content.append)
    stub.flush()
    return response, content[0]


def chat_stream(*texts: str, **choice: Any) -> list[bytes]:
    """The events of a streamed chat answer saying ``texts``, with its usage chunk."""
    base = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 7, "model": "m"}

    def delta(values: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        entry = {"index": 0, "delta": values, "finish_reason": finish, **choice}
        return {**base, "choices": [entry]}

    chunks = [delta({"role": "assistant", "content": ""})]
    chunks += [delta({"content": text}) for text in texts]
    chunks.append(delta({}, "stop"))
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunks.append({**base, "choices": [], "usage": usage})
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def text_of(messages: list[dict[str, Any]]) -> str:
    return "".join(
        m["data"]["choices"][0]["delta"].get("content") or ""
        for m in messages
        if m["type"] == "chunk" and m["data"]["choices"]
    )


def test_a_message_over_the_rate_limit_gets_a_429_and_the_socket_stays_open(
    logged: list[LogEvent],
) -> None:
    harness = Harness(default_rpm=2)
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    response, _ = http_chat(harness)  # HTTP and WebSocket count in one window per address
    assert response.code == 200
    client = harness.open()
    harness.step(12)
    harness.request(client, "a")
    harness.request(client, "b")
    assert client.of("a") == [{"id": "a", "type": "done"}]
    assert client.of("b") == [
        {
            "id": "b",
            "type": "error",
            "status": 429,
            "error": "Too Many Requests",
            "message": "rate limit of 2 requests per minute reached; retry in 48s",
            "request_id": logged[-1]["request_id"],
            "retry_after": "48",
        }
    ]
    assert len(harness.fake.seen) == 2  # the refused request never reached LiteLLM
    assert (logged[-1]["status"], logged[-1]["outcome"]) == (429, "refused")
    assert logged[-1]["rate_limited"] is True
    assert client.opened and not client.closed
    harness.step(48)
    harness.request(client, "c")
    assert client.of("c") == [{"id": "c", "type": "done"}]


def test_tokens_of_socket_streams_count_against_the_tokens_limit() -> None:
    harness = Harness(default_tpm=5)
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(*chat_stream("Hi"))
    client = harness.open()
    harness.request(client, "a", {**CHAT, "stream_options": {"include_usage": True}})
    assert client.of("a")[-1] == {"id": "a", "type": "done"}
    harness.request(client, "b")
    [refusal] = client.of("b")
    assert (refusal["status"], refusal["retry_after"]) == (429, "60")
    assert "5 tokens per minute" in refusal["message"]
    response, document = http_chat(harness)  # and over HTTP too
    assert response.code == 429
    assert document["error"]["code"] == "rate_limit_exceeded"


def test_socket_limits_are_per_client_key() -> None:
    from tests.support.keys import FakeKeys, client_key

    keys = {"key_a": client_key("key_a", "alice"), "key_b": client_key("key_b", "bob", rpm=2)}
    harness = Harness(keys=FakeKeys(keys), auth="keys", default_rpm=1)
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    alice = harness.open(headers={"Authorization": "Bearer key_a"})
    bob = harness.open(headers={"Authorization": "Bearer key_b"})
    for number in range(3):
        harness.request(alice, f"a{number}")
        harness.request(bob, f"b{number}")
    assert [m["type"] for m in alice.messages] == ["done", "error", "error"]
    assert [m["type"] for m in bob.messages] == ["done", "done", "error"]
    assert {m["status"] for m in alice.messages + bob.messages if m["type"] == "error"} == {429}


def test_an_answer_stored_over_http_is_replayed_on_the_socket(logged: list[LogEvent]) -> None:
    harness = Harness(cache_ttl=60)
    response, _ = http_chat(harness)
    assert response.headers.getRawHeaders("x-mpcapi-cache") == ["miss"]
    client = harness.open()
    harness.request(client, "a", {**CHAT, "stream_options": {"include_usage": True}})
    assert len(harness.fake.seen) == 1  # LiteLLM was not asked again
    messages = client.of("a")
    assert text_of(messages) == "Hi"
    assert messages[-2]["data"]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 1,
        "total_tokens": 4,
    }
    assert messages[-1] == {"id": "a", "type": "done", "cache": "hit"}
    assert (logged[-1]["status"], logged[-1]["cache"]) == (200, "hit")
    assert logged[-1]["upstream_status"] is None
    assert harness.parts.cache.hits == 1


def test_a_socket_answer_is_stored_and_replayed_to_the_socket_and_http() -> None:
    harness = Harness(cache_ttl=60)
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(*chat_stream("Hel", "lo"))
    client = harness.open()
    harness.request(client, "a")
    # Asked for its usage (the stored answer keeps it), which the client did not ask to see.
    assert harness.seen_body()["stream_options"] == {"include_usage": True}
    first = client.of("a")
    assert all(m["data"]["choices"] for m in first[:-1])
    assert first[-1] == {"id": "a", "type": "done", "cache": "miss"}
    harness.request(client, "b", {**CHAT, "stream": False})  # delivery fields do not matter
    second = client.of("b")
    assert len(harness.fake.seen) == 1
    assert text_of(second) == "Hello"
    assert second[-2]["data"]["choices"][0]["finish_reason"] == "stop"
    assert second[-1] == {"id": "b", "type": "done", "cache": "hit"}
    response, document = http_chat(harness)
    assert response.headers.getRawHeaders("x-mpcapi-cache") == ["hit"]
    assert document["object"] == "chat.completion"
    assert document["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert document["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_the_cache_field_of_a_message(logged: list[LogEvent]) -> None:
    harness = Harness(cache_ttl=60)
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(*chat_stream("Hi"))
    client = harness.open()
    harness.request(client, "a", cache="no-store")
    assert harness.seen_body() == {**CHAT, "stream": True}  # nothing to store: no usage asked
    assert client.of("a")[-1] == {"id": "a", "type": "done", "cache": "miss"}
    harness.request(client, "b")  # a miss again: "a" was not stored; "b" is
    assert client.of("b")[-1] == {"id": "b", "type": "done", "cache": "miss"}
    harness.request(client, "c", cache="no-cache")
    assert client.of("c")[-1] == {"id": "c", "type": "done", "cache": "bypass"}
    harness.request(client, "d")
    assert client.of("d")[-1] == {"id": "d", "type": "done", "cache": "hit"}
    assert len(harness.fake.seen) == 3
    assert [entry["cache"] for entry in logged] == ["miss", "miss", "bypass", "hit"]
    harness.request(client, "e", cache="maybe")
    [error] = client.of("e")
    assert (error["status"], error["message"]) == (400, '"cache" must be "no-cache" or "no-store"')


def test_a_stream_that_a_replay_could_not_give_back_is_not_stored() -> None:
    harness = Harness(cache_ttl=60)
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1}]}
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(
        *chat_stream("Hi", logprobs=logprobs)
    )
    client = harness.open()
    harness.request(client, "a")
    harness.request(client, "b")
    assert client.of("b")[-1] == {"id": "b", "type": "done", "cache": "miss"}
    assert len(harness.fake.seen) == 2


def test_a_refused_or_failed_stream_is_not_stored() -> None:
    harness = Harness(cache_ttl=60)
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(*chat_stream("Hi")[:-1])
    client = harness.open()
    harness.request(client, "a")  # no [DONE]: a 502
    assert client.of("a")[-1]["status"] == 502
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(*chat_stream("Hi"))
    harness.request(client, "b")
    assert client.of("b")[-1] == {"id": "b", "type": "done", "cache": "miss"}


# The SSE parser


def _parse_in_pieces(raw: bytes, size: int) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for start in range(0, len(raw), size):
        events += parser.feed(raw[start : start + size])
    return events


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_sse_parser(size: int, newline: bytes) -> None:
    lines = [
        b": comment",
        b"data: one",
        b"",
        b"event: special",
        b"data:two",
        b"data:  three",
        b"id: 5",
        b"",
        b"event: no-data",
        b"",
        b'data: {"\xc3\xa9": 1}',
        b"",
        b"data: [DONE]",
        b"",
        b"data: unfinished",
    ]
    raw = newline.join(lines)
    assert _parse_in_pieces(raw, size) == [
        SSEEvent("one"),
        SSEEvent("two\n three", "special"),
        SSEEvent('{"é": 1}'),
        SSEEvent("[DONE]"),
    ]


def test_sse_parser_keeps_what_is_unfinished() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.pending
    assert parser.feed(b"\n\r\n") == [SSEEvent("a")]
    assert not parser.pending


def test_socket_requests_for_a_model_outside_the_keys_list_are_403() -> None:
    import attrs

    from tests.support.keys import FakeKeys, client_key

    limited = attrs.evolve(client_key("key_a", "alice"), models=("gpt-4o-mini",))
    harness = Harness(keys=FakeKeys({"key_a": limited}), auth="keys")
    harness.fake.routes[("POST", "/chat/completions")] = whole_stream(b"data: [DONE]\n\n")
    client = harness.open(headers={"Authorization": "Bearer key_a"})
    harness.request(client, "ok")
    harness.request(client, "no", {**CHAT, "model": "gpt-4o"})
    assert client.of("ok")[-1]["type"] == "done"
    (refused,) = client.of("no")
    assert refused["type"] == "error" and refused["status"] == 403
    assert "not allowed" in json.dumps(refused)
    assert len(harness.fake.seen) == 1  # the refused one never reached LiteLLM
