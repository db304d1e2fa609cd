"""The WebSocket endpoint of a real daemon in front of the real LiteLLM mock models, driven by
the ``websockets`` library's synchronous client."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from websockets.sync.client import ClientConnection, connect

from .harness import MOCK_TEXT, REPO_ROOT, Daemon, LiteLLM, http_status

HELLO = [{"role": "user", "content": "Hello!"}]
CHAT = {"model": "gpt-4o-mini", "messages": HELLO}
TIMEOUT = 30.0
EXAMPLE = REPO_ROOT / "examples" / "ws_client.py"


@contextmanager
def socket(daemon: Daemon, path: str = "/api/ws", **kwargs: Any) -> Iterator[ClientConnection]:
    url = daemon.url.replace("http://", "ws://", 1) + path
    with connect(url, open_timeout=TIMEOUT, **kwargs) as connection:
        yield connection


def send(connection: ClientConnection, message: Any) -> None:
    connection.send(json.dumps(message))


def receive(connection: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(connection.recv(timeout=TIMEOUT))
    return message


def until_the_end(connection: ClientConnection, message_id: str) -> list[dict[str, Any]]:
    """Every message of ``message_id`` up to its done, error or cancelled (others are dropped)."""
    messages: list[dict[str, Any]] = []
    while True:
        message = receive(connection)
        if message.get("id") != message_id:
            continue
        messages.append(message)
        if message["type"] != "chunk":
            return messages


def text_of(messages: list[dict[str, Any]]) -> str:
    """The text of chat chunks (``delta.content``) or text-completion chunks (``text``)."""
    pieces = []
    for message in messages:
        if message["type"] == "chunk":
            for choice in message["data"].get("choices", []):
                pieces.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(pieces)


def test_chat_chunks_then_done(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi()
    with socket(daemon) as connection:
        send(connection, {"id": "a", "type": "chat.completions", "body": CHAT})
        messages = until_the_end(connection, "a")
    assert messages[-1] == {"id": "a", "type": "done"}
    assert len(messages) > 2
    assert all(m["data"]["object"] == "chat.completion.chunk" for m in messages[:-1])
    assert text_of(messages) == MOCK_TEXT
    log = daemon.wait_for_log("outcome=completed ttfb_ms=")
    assert "WS /api/ws 200" in log
    assert "model=gpt-4o-mini" in log
    assert "type=chat.completions" in log


def test_text_completion_on_the_v1_alias(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi()
    body = {"model": "gpt-4o-mini", "prompt": "Say hi"}
    with socket(daemon, "/v1/ws") as connection:
        send(connection, {"id": "t", "type": "completions", "body": body})
        messages = until_the_end(connection, "t")
    assert messages[-1]["type"] == "done"
    assert text_of(messages) == MOCK_TEXT


def test_two_requests_at_once(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi()
    with socket(daemon) as connection:
        send(connection, {"id": "a", "type": "chat.completions", "body": CHAT})
        send(connection, {"id": "b", "type": "chat.completions", "body": CHAT})
        received: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        ended: set[str] = set()
        while ended != {"a", "b"}:
            message = receive(connection)
            received[message["id"]].append(message)
            if message["type"] != "chunk":
                ended.add(message["id"])
    for messages in received.values():
        assert messages[-1]["type"] == "done"
        assert text_of(messages) == MOCK_TEXT


def test_cancel(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi()
    with socket(daemon) as connection:
        # The cancel follows at once: it reaches the daemon long before LiteLLM's [DONE].
        send(connection, {"id": "a", "type": "chat.completions", "body": CHAT})
        send(connection, {"id": "a", "type": "cancel"})
        messages = until_the_end(connection, "a")
        assert messages[-1] == {"id": "a", "type": "cancelled"}
        assert all(m["type"] == "chunk" for m in messages[:-1])
        # The socket goes on, and nothing more comes for "a".
        send(connection, {"id": "b", "type": "chat.completions", "body": CHAT})
        later: list[dict[str, Any]] = []
        while not later or later[-1].get("type") == "chunk":
            later.append(receive(connection))
    assert [m["id"] for m in later] == ["b"] * len(later)
    assert later[-1] == {"id": "b", "type": "done"}
    assert text_of(later) == MOCK_TEXT
    assert "type=chat.completions" in daemon.wait_for_log("outcome=client_cancel")


def test_bad_messages_keep_the_socket_open(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi()
    with socket(daemon) as connection:
        connection.send("{not json")
        error = receive(connection)
        assert (error["type"], error["status"], error["id"]) == ("error", 400, None)
        assert "not valid JSON" in error["message"]
        send(connection, {"id": "x", "type": "images", "body": CHAT})
        assert receive(connection)["status"] == 400
        send(connection, {"type": "chat.completions", "body": CHAT})
        assert receive(connection)["status"] == 400
        send(connection, {"id": "y", "type": "chat.completions", "body": {"model": "gpt-4o-mini"}})
        invalid = receive(connection)
        assert (invalid["id"], invalid["status"]) == ("y", 400)
        assert "messages" in invalid["message"]
        send(connection, {"id": "ok", "type": "chat.completions", "body": CHAT})
        messages = until_the_end(connection, "ok")
    assert text_of(messages) == MOCK_TEXT
    assert "WS /api/ws 400" in daemon.wait_for_log("outcome=refused")


def test_an_oversized_message_is_a_413(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi(MPCAPI_MAX_BODY_BYTES="2000")
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    with socket(daemon) as connection:
        send(connection, {"id": "big", "type": "chat.completions", "body": big})
        error = receive(connection)
        assert (error["type"], error["status"]) == ("error", 413)
        send(connection, {"id": "ok", "type": "chat.completions", "body": CHAT})
        assert until_the_end(connection, "ok")[-1]["type"] == "done"


def test_litellm_rate_limit_keeps_its_status(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi()
    body = {"model": "mock-rate-limited", "messages": HELLO}
    with socket(daemon) as connection:
        send(connection, {"id": "r", "type": "chat.completions", "body": body})
        [error] = until_the_end(connection, "r")
    assert (error["type"], error["status"], error["error"]) == ("error", 429, "Too Many Requests")
    assert "rate limit" in error["message"].lower()
    assert error["request_id"] in daemon.wait_for_log(error["request_id"])


def test_messages_over_our_rate_limit_get_a_429_on_an_open_socket(
    start_mpcapi: Callable[..., Daemon],
) -> None:
    daemon = start_mpcapi(MPCAPI_DEFAULT_RPM="2")
    with socket(daemon) as connection:
        for message_id in ("a", "b"):
            send(connection, {"id": message_id, "type": "chat.completions", "body": CHAT})
            assert until_the_end(connection, message_id)[-1] == {"id": message_id, "type": "done"}
        for message_id in ("c", "d"):  # the socket stays open after a refusal
            send(connection, {"id": message_id, "type": "chat.completions", "body": CHAT})
            [error] = until_the_end(connection, message_id)
            assert (error["type"], error["status"]) == ("error", 429)
            assert error["error"] == "Too Many Requests"
            assert error["message"].startswith("rate limit of 2 requests per minute reached")
            assert 1 <= int(error["retry_after"]) <= 60
    log = daemon.wait_for_log(error["request_id"])
    assert "WS /api/ws 429" in log
    assert "outcome=refused" in log


def test_the_cache_answers_a_repeated_message_and_http_alike(
    start_mpcapi: Callable[..., Daemon],
) -> None:
    daemon = start_mpcapi(MPCAPI_CACHE_TTL="60")
    messages = [{"role": "user", "content": "cache me over the socket"}]
    body = {"model": "gpt-4o-mini", "messages": messages}
    with socket(daemon) as connection:
        send(connection, {"id": "a", "type": "chat.completions", "body": body})
        first = until_the_end(connection, "a")
        send(connection, {"id": "b", "type": "chat.completions", "body": body})
        second = until_the_end(connection, "b")
        usage = {**body, "stream_options": {"include_usage": True}}
        send(
            connection, {"id": "c", "type": "chat.completions", "body": usage, "cache": "no-cache"}
        )
        bypass = until_the_end(connection, "c")
    assert first[-1] == {"id": "a", "type": "done", "cache": "miss"}
    assert second[-1] == {"id": "b", "type": "done", "cache": "hit"}
    assert bypass[-1] == {"id": "c", "type": "done", "cache": "bypass"}
    assert text_of(first) == text_of(second) == text_of(bypass) == MOCK_TEXT
    assert second[0]["data"]["id"] == first[0]["data"]["id"]  # the same answer, replayed
    assert bypass[0]["data"]["id"] != first[0]["data"]["id"]  # a fresh one from LiteLLM
    assert bypass[-2]["data"]["usage"]["total_tokens"] > 0
    # The socket's answer is stored whole: a plain HTTP request gets it too.
    request = urllib.request.Request(
        daemon.url + "/api/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert response.headers["x-mpcapi-cache"] == "hit"
        answer = json.loads(response.read())
    assert answer["id"] == bypass[0]["data"]["id"]  # "no-cache" skips the lookup, not the store
    assert answer["choices"][0]["message"]["content"] == MOCK_TEXT
    assert answer["usage"]["total_tokens"] == bypass[-2]["data"]["usage"]["total_tokens"]


def test_the_clients_key_passes_through_without_ours(
    start_mpcapi: Callable[..., Daemon], litellm: LiteLLM
) -> None:
    daemon = start_mpcapi(LITELLM_API_KEY=None)
    headers = {"Authorization": f"Bearer {litellm.key}"}
    with socket(daemon, additional_headers=headers) as connection:
        send(connection, {"id": "a", "type": "chat.completions", "body": CHAT})
        assert until_the_end(connection, "a")[-1]["type"] == "done"
    with socket(daemon) as connection:
        send(connection, {"id": "a", "type": "chat.completions", "body": CHAT})
        [error] = until_the_end(connection, "a")
    # Without a key LiteLLM refuses the call (this one answers 500, hence 502).
    assert error["type"] == "error"
    assert error["status"] in (400, 401, 502)


def test_plain_http_is_426(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi()
    assert http_status(daemon.url + "/api/ws") == 426


def run_example(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    url = daemon.url.replace("http://", "ws://", 1) + "/api/ws"
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_example_client(start_mpcapi: Callable[..., Daemon]) -> None:
    daemon = start_mpcapi()
    one = run_example(daemon, "Hello!")
    assert (one.returncode, one.stdout, one.stderr) == (0, MOCK_TEXT + "\n", "")
    two = run_example(daemon, "Hello!", "Hi again")
    assert two.returncode == 0
    assert sorted(two.stdout.splitlines()) == [f"[1] {MOCK_TEXT}", f"[2] {MOCK_TEXT}"]
    bad = run_example(daemon, "--model", "mock-rate-limited", "Hello!")
    assert bad.returncode == 1
    assert "error 429 Too Many Requests" in bad.stderr
