"""SIGTERM: stop accepting, let what is in flight finish (up to MPCAPI_DRAIN_SECONDS), exit 0."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable

from .harness import Daemon
from .test_stream_relay import EVENTS, open_stream, read_event, streaming_standin


def refuses_connections(daemon: Daemon) -> bool:
    host, port = daemon.url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_lets_a_stream_finish_then_exits_0(start_mpcapi: Callable[..., Daemon]) -> None:
    with streaming_standin() as standin:
        daemon = start_mpcapi(LITELLM_BASE_URL=standin.url)
        connection, response = open_stream(daemon)
        read_event(response)
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert refuses_connections(daemon), "no new connections once draining"
        events = [read_event(response) for _ in range(EVENTS)]  # the rest, then [DONE]
        assert events[-1] == b"data: [DONE]\n\n"
        # The connection closes after the answer (no keep-alive while draining): the daemon
        # exits without waiting for the client to hang up.
        assert daemon.process.wait(timeout=10) == 0
        connection.close()
    assert "drained" in daemon.log_text()


def test_drain_time_is_bounded(
    start_mpcapi: Callable[..., Daemon], stalled_upstream_url: str
) -> None:
    daemon = start_mpcapi(LITELLM_BASE_URL=stalled_upstream_url, MPCAPI_DRAIN_SECONDS="1")
    host, port = daemon.url.removeprefix("http://").split(":")
    hanging = socket.create_connection((host, int(port)), timeout=5)
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}'
    hanging.sendall(
        b"POST /api/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    time.sleep(0.3)
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    hanging.close()
    assert "drain time is up" in daemon.log_text()


def test_idle_connections_do_not_hold_the_stop(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi()
    host, port = daemon.url.removeprefix("http://").split(":")
    idle = socket.create_connection((host, int(port)), timeout=5)
    idle.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=10) == 0
    assert time.monotonic() - started < 3
    idle.close()
