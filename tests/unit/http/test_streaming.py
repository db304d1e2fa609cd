"""The SSE relay, driven by a fake LiteLLM that emits events on a task.Clock."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.server import NOT_DONE_YET, Request

from mpcapi.openai.events import CHAT_EVENTS
from tests.support.gateway import CHAT, Harness, answer, json_body, make_harness

STREAM = {**CHAT, "stream": True}


def event(n: int) -> bytes:
    chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": f"t{n}"}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class EventSource:
    """A LiteLLM stream: one event per ``interval`` seconds of the clock, then an ending."""

    def __init__(self, clock: Clock, events: int, interval: float = 0.1, ending: str = "done"):
        self.clock = clock
        self.events = events
        self.interval = interval
        self.ending = ending
        self.request: Request | None = None

    def __call__(self, request: Request) -> int:
        self.request = request
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"")
        for n in range(self.events):
            self.clock.callLater(self.interval * (n + 1), request.write, event(n))
        self.clock.callLater(self.interval * (self.events + 1), self._end)
        return NOT_DONE_YET

    def _end(self) -> None:
        assert self.request is not None
        if self.ending == "done":
            self.request.write(b"data: [DONE]\n\n")
            self.request.finish()
        elif self.ending == "no-done":
            self.request.finish()
        elif self.ending == "cut":
            self.request.channel.transport.loseConnection()
        # "hang": say nothing more


async def open_stream(harness: Harness, source: EventSource) -> tuple[Any, list[bytes], Any]:
    harness.fake.routes[("POST", "/chat/completions")] = source
    pending = defer.ensureDeferred(harness.post("/api/chat/completions", STREAM))
    harness.flush()
    response = await pending
    chunks: list[bytes] = []
    done = treq.collect(response, chunks.append)
    return response, chunks, done


def step(harness: Harness, seconds: float) -> None:
    harness.clock.advance(seconds)
    harness.flush()


@pytest_twisted.ensureDeferred
async def test_each_event_reaches_the_client_on_its_own(harness: Harness) -> None:
    source = EventSource(harness.clock, events=3)
    response, chunks, done = await open_stream(harness, source)
    assert response.code == 200
    headers = response.headers
    assert headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert headers.getRawHeaders("cache-control") == ["no-cache"]
    assert headers.getRawHeaders("x-accel-buffering") == ["no"]
    assert headers.getRawHeaders("content-length") is None
    assert headers.getRawHeaders("x-request-id")
    for n in range(3):
        step(harness, 0.1)
        # Event n is at the client before event n+1 even exists upstream.
        assert b"".join(chunks).endswith(event(n))
        assert b"".join(chunks).count(b"data: ") == n + 1
    step(harness, 0.1)
    await done
    assert b"".join(chunks) == b"".join(event(n) for n in range(3)) + b"data: [DONE]\n\n"


@pytest_twisted.ensureDeferred
async def test_upstream_closing_without_done_ends_with_an_error_event(harness: Harness) -> None:
    source = EventSource(harness.clock, events=2, ending="no-done")
    _, chunks, done = await open_stream(harness, source)
    step(harness, 0.5)
    await done
    body = b"".join(chunks)
    assert body.startswith(event(0) + event(1))
    assert body.endswith(
        CHAT_EVENTS.error_event("LiteLLM closed the stream without [DONE]", "upstream_error")
    )


@pytest_twisted.ensureDeferred
async def test_upstream_cut_mid_stream_ends_with_an_error_event(harness: Harness) -> None:
    source = EventSource(harness.clock, events=1, ending="cut")
    _, chunks, done = await open_stream(harness, source)
    step(harness, 0.5)
    await done
    last = b"".join(chunks).split(b"\n\n")[-2]
    assert json.loads(last.removeprefix(b"data: "))["error"]["type"] == "upstream_error"


@pytest_twisted.ensureDeferred
async def test_silence_longer_than_the_timeout_ends_the_stream() -> None:
    harness = make_harness(litellm_timeout=5.0)
    source = EventSource(harness.clock, events=1, ending="hang")
    _, chunks, done = await open_stream(harness, source)
    step(harness, 0.1)
    step(harness, 4.9)
    assert not done.called
    step(harness, 0.2)
    await done
    body = b"".join(chunks)
    assert body == event(0) + CHAT_EVENTS.error_event("LiteLLM sent nothing for 5 s", "timeout")


@pytest_twisted.ensureDeferred
async def test_errors_before_the_first_byte_are_plain_json(harness: Harness) -> None:
    error = {"error": {"message": "slow down", "type": "throttling_error", "code": "429"}}
    harness.fake.routes[("POST", "/chat/completions")] = answer(429, error, {"retry-after": "3"})
    response = await harness.post("/api/chat/completions", STREAM)
    assert response.code == 429
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert response.headers.getRawHeaders("retry-after") == ["3"]
    assert await json_body(response) == error


@pytest_twisted.ensureDeferred
async def test_stream_options_pass_through(harness: Harness) -> None:
    source = EventSource(harness.clock, events=1)
    harness.fake.routes[("POST", "/chat/completions")] = source
    body = {**STREAM, "stream_options": {"include_usage": True}}
    pending = defer.ensureDeferred(harness.post("/api/chat/completions", body))
    harness.flush()
    await pending
    assert json.loads(harness.fake.seen[0].body)["stream_options"] == {"include_usage": True}


@pytest_twisted.ensureDeferred
async def test_embeddings_never_stream(harness: Harness) -> None:
    body = {"model": "e", "input": "x", "stream": True}
    response = await harness.post("/api/embeddings", body)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]


def test_error_event_is_one_sse_event() -> None:
    raw = CHAT_EVENTS.error_event("boom", "upstream_error")
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n\n") == 1
    assert json.loads(raw[6:]) == {"error": {"message": "boom", "type": "upstream_error"}}


@pytest_twisted.ensureDeferred
async def test_usage_of_a_stream_comes_from_its_last_chunk() -> None:
    from tests.support.gateway import observed_harness

    harness, seen = observed_harness()
    usage = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    final = b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"

    def stream(request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/event-stream")
        return event(0) + final + b"data: [DONE]\n\n"

    harness.fake.routes[("POST", "/chat/completions")] = stream
    response = await harness.post("/api/chat/completions", STREAM)
    assert (await response.content()).endswith(final + b"data: [DONE]\n\n")
    (exchange,) = seen
    assert exchange.usage is not None
    assert (exchange.usage.prompt_tokens, exchange.usage.completion_tokens) == (9, 5)
    assert exchange.events == 3
    assert exchange.outcome == "completed"
