"""The SSE relay against a stand-in that streams one event every 100 ms and watches for leavers.

Each event must reach the client before the stand-in has even sent the next one; a client
that leaves must show up at the stand-in as a closed connection within a second; an
upstream that breaks off mid-stream must make the OpenAI SDK raise, not hang.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import openai
import pytest

from .harness import HELLO, Daemon

INTERVAL = 0.1
EVENTS = 8


@dataclass
class StreamingStandIn:
    """Records when each event left and when the client went away."""

    url: str = ""
    events: int = EVENTS  # events per stream, one per INTERVAL
    ending: str = "done"  # or "cut": close the connection after its events, no [DONE]
    sent_at: list[float] = field(default_factory=list)
    gone_at: float | None = None
    gone: threading.Event = field(default_factory=threading.Event)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(n: int) -> bytes:
    chunk = {
        "id": "chatcmpl-standin",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": f"<{n}>"}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@contextmanager
def streaming_standin(events: int = EVENTS) -> Iterator[StreamingStandIn]:
    standin = StreamingStandIn(events=events)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += sock.recv(65536)
            sock.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for n in range(standin.events):
                # Wait INTERVAL, but notice at once if the other side closes meanwhile.
                readable, _, _ = select.select([sock], [], [], INTERVAL)
                if readable and sock.recv(1) == b"":
                    standin.gone_at = time.monotonic()
                    standin.gone.set()
                    return
                standin.sent_at.append(time.monotonic())
                sock.sendall(_chunk(_event(n)))
            if standin.ending == "cut":
                return  # closes without [DONE] and without the last chunk
            sock.sendall(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    standin.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield standin
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def standin() -> Iterator[StreamingStandIn]:
    with streaming_standin() as running:
        yield running


def open_stream(daemon: Daemon) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = daemon.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    body = json.dumps({"model": "gpt-4o-mini", "messages": HELLO, "stream": True})
    connection.request("POST", "/api/chat/completions", body, {"content-type": "application/json"})
    return connection, connection.getresponse()


def read_event(response: http.client.HTTPResponse) -> bytes:
    event = b""
    while not event.endswith(b"\n\n"):
        line = response.readline()
        assert line, "stream ended early"
        event += line
    return event


def test_each_event_reaches_the_client_before_the_next_is_sent(
    start_mpcapi: Callable[..., Daemon], standin: StreamingStandIn
) -> None:
    daemon = start_mpcapi(LITELLM_BASE_URL=standin.url)
    connection, response = open_stream(daemon)
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream"
    assert response.getheader("x-accel-buffering") == "no"
    received_at = []
    for n in range(EVENTS):
        assert f"<{n}>".encode() in read_event(response)
        received_at.append(time.monotonic())
    assert read_event(response) == b"data: [DONE]\n\n"
    connection.close()
    for n in range(EVENTS - 1):
        assert received_at[n] < standin.sent_at[n + 1], f"event {n} waited for event {n + 1}"
    delays = [received - sent for received, sent in zip(received_at, standin.sent_at, strict=True)]
    assert max(delays) < INTERVAL
    log = daemon.wait_for_log("outcome=completed ttfb_ms=")
    assert f"events={EVENTS + 1}" in log


def test_a_client_that_leaves_closes_the_upstream_within_a_second(
    start_mpcapi: Callable[..., Daemon], standin: StreamingStandIn
) -> None:
    daemon = start_mpcapi(LITELLM_BASE_URL=standin.url)
    connection, response = open_stream(daemon)
    for _ in range(3):
        read_event(response)
    left_at = time.monotonic()
    connection.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    connection.close()
    assert standin.gone.wait(timeout=3), "the stand-in never saw the connection close"
    assert standin.gone_at is not None
    assert standin.gone_at - left_at < 1.0
    assert len(standin.sent_at) < EVENTS, "the stream was stopped, not run to its end"
    assert "outcome=client_abort" in daemon.wait_for_log("outcome=client_abort")


def test_an_upstream_breaking_off_mid_stream_makes_the_sdk_raise(
    start_mpcapi: Callable[..., Daemon], standin: StreamingStandIn
) -> None:
    standin.ending = "cut"
    daemon = start_mpcapi(LITELLM_BASE_URL=standin.url)
    received = []
    with (
        openai.OpenAI(base_url=daemon.api_base, api_key="unused", max_retries=0) as client,
        pytest.raises(openai.APIError, match="LiteLLM closed the stream"),
    ):
        for chunk in client.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True
        ):
            received.append(chunk.choices[0].delta.content)
    assert received == [f"<{n}>" for n in range(EVENTS)]
    assert "outcome=upstream_error" in daemon.wait_for_log("outcome=upstream_error")
