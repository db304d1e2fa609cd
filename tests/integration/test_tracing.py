"""OpenTelemetry for real: ``twistd -n mpcapi`` with ``MPCAPI_OTEL_ENDPOINT`` exporting to a
real OTLP/HTTP receiver (tests/support/otlp.py), in front of the real LiteLLM, driven by the
openai SDK."""

from __future__ import annotations

import sqlite3
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.support.otlp import ReceivedSpan, Receiver, otlp_receiver
from tests.support.ports import closed_port

from .harness import HELLO, MOCK_TEXT, Daemon, FakeUpstream, wait_until
from .test_websocket import CHAT, send, socket, until_the_end

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
SERVER, CLIENT = 2, 3  # the protobuf's SpanKind
ERROR = 2  # the protobuf's StatusCode


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as running:
        yield running


def traced(start_mpcapi: Callable[..., Daemon], endpoint: str, **env: str) -> Daemon:
    return start_mpcapi(
        MPCAPI_OTEL_ENDPOINT=endpoint,
        OTEL_SERVICE_NAME="mpc-api-under-test",
        OTEL_METRIC_EXPORT_INTERVAL="300",
        **env,
    )


def sdk(daemon: Daemon, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=daemon.api_base,
        api_key="unused",
        max_retries=0,
        timeout=30,
        default_headers=headers,
    )


def of_trace(spans: list[ReceivedSpan], trace: str = TRACE) -> dict[int, ReceivedSpan]:
    found = {span.kind: span for span in spans if span.trace_id == trace}
    assert set(found) <= {SERVER, CLIENT}
    return found


def test_a_chat_continues_the_clients_trace(
    start_mpcapi: Callable[..., Daemon], receiver: Receiver, tmp_path: Path
) -> None:
    database = tmp_path / "usage.db"
    daemon = traced(start_mpcapi, receiver.url, MPCAPI_DATABASE_URL=f"sqlite:///{database}")
    with sdk(daemon, traceparent=TRACEPARENT, tracestate="app=1") as client:
        completion = client.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, max_tokens=20, temperature=0.3
        )
    assert completion.choices[0].message.content == MOCK_TEXT
    spans = of_trace(receiver.wait_for_spans(2))
    server, litellm_call = spans[SERVER], spans[CLIENT]
    assert server.parent_span_id == PARENT
    assert litellm_call.parent_span_id == server.span_id
    assert server.service_name == "mpc-api-under-test"
    assert server.name == "chat gpt-4o-mini"
    assert {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.request.max_tokens": 20,
        "gen_ai.request.temperature": 0.3,
        "http.response.status_code": 200,
        "http.request.method": "POST",
        "url.path": "/api/chat/completions",
    }.items() <= server.attributes.items()
    assert server.attributes["gen_ai.usage.input_tokens"] > 0
    assert server.attributes["gen_ai.usage.output_tokens"] > 0
    assert server.attributes["gen_ai.response.model"]
    assert server.start_ns <= litellm_call.start_ns <= litellm_call.end_ns <= server.end_ns
    # The trace id is in the log line and in the usage row.
    assert f"trace_id={TRACE}" in daemon.wait_for_log(f"trace_id={TRACE}")

    def stored() -> list[tuple[str]]:
        try:
            with sqlite3.connect(database) as connection:
                return connection.execute("SELECT trace_id FROM usage").fetchall()
        except sqlite3.OperationalError:  # the row writer has not made the table yet
            return []

    assert wait_until(lambda: stored() == [(TRACE,)], 10), stored()
    assert wait_until(lambda: "gen_ai.client.token.usage" in receiver.metric_names, 10)
    assert "gen_ai.client.operation.duration" in receiver.metric_names


def test_litellm_gets_the_trace_context_below_our_span(
    start_mpcapi: Callable[..., Daemon], receiver: Receiver, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.answer(200, {"object": "chat.completion", "model": "m", "choices": []})
    daemon = traced(start_mpcapi, receiver.url, LITELLM_BASE_URL=fake_upstream.url)
    with sdk(daemon, traceparent=TRACEPARENT, tracestate="app=1") as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    [sent] = [r for r in fake_upstream.requests if r.path == "/chat/completions"]
    litellm_call = of_trace(receiver.wait_for_spans(2))[CLIENT]
    assert sent.headers["traceparent"] == f"00-{TRACE}-{litellm_call.span_id}-01"
    assert sent.headers["tracestate"] == "app=1"


def test_a_stream_records_its_first_token(
    start_mpcapi: Callable[..., Daemon], receiver: Receiver
) -> None:
    daemon = traced(start_mpcapi, receiver.url)
    with sdk(daemon, traceparent=TRACEPARENT) as client:
        chunks = list(
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
        )
    assert chunks
    server = of_trace(receiver.wait_for_spans(2))[SERVER]
    assert server.attributes["gen_ai.server.time_to_first_token"] > 0
    assert server.attributes["mpcapi.stream.events"] >= len(chunks)
    assert wait_until(lambda: "gen_ai.server.time_to_first_token" in receiver.metric_names, 10)


def test_a_cache_hit_is_one_span(start_mpcapi: Callable[..., Daemon], receiver: Receiver) -> None:
    daemon = traced(start_mpcapi, receiver.url, MPCAPI_CACHE_TTL="60")
    with sdk(daemon) as client:
        for _ in range(2):
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, seed=7)
    spans = receiver.wait_for_spans(3)
    time.sleep(1.5)  # a span for the LiteLLM call of the hit would have come by now
    servers = [s for s in receiver.spans if s.kind == SERVER]
    assert [s.attributes["mpcapi.cache"] for s in servers] == ["miss", "hit"]
    hit = servers[1]
    assert not [s for s in spans if s.kind == CLIENT and s.trace_id == hit.trace_id]


def test_a_429_of_ours_and_a_502(
    start_mpcapi: Callable[..., Daemon], receiver: Receiver, dead_upstream_url: str
) -> None:
    limited = traced(start_mpcapi, receiver.url, MPCAPI_DEFAULT_RPM="1")
    with sdk(limited) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    dead = traced(start_mpcapi, receiver.url, LITELLM_BASE_URL=dead_upstream_url)
    with sdk(dead) as client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert caught.value.status_code == 502
    spans = receiver.wait_for_spans(5)  # chat: 2, 429: 1, 502: 2
    by_status = {s.attributes["http.response.status_code"]: s for s in spans if s.kind == SERVER}
    assert by_status[429].attributes["mpcapi.rate_limited"] is True
    assert by_status[429].status_code != ERROR
    assert by_status[502].status_code == ERROR
    assert by_status[502].attributes["error.type"] == "unreachable"
    failed_call = of_trace(spans, by_status[502].trace_id)[CLIENT]
    assert failed_call.status_code == ERROR


@pytest.mark.parametrize("collector", ["down", "slow"])
def test_a_collector_that_is_down_or_slow_changes_no_answer(
    start_mpcapi: Callable[..., Daemon], collector: str
) -> None:
    with closed_port() as port, otlp_receiver(delay=5.0) as slow:
        endpoint = f"http://127.0.0.1:{port}" if collector == "down" else slow.url
        daemon = traced(start_mpcapi, endpoint, MPCAPI_METRICS_PUBLIC="true")
        with sdk(daemon) as client:
            started = time.monotonic()
            for _ in range(20):
                completion = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
                assert completion.choices[0].message.content == MOCK_TEXT
            elapsed = time.monotonic() - started
        assert elapsed < 10, f"20 chats took {elapsed:.1f} s with a {collector} collector"
        if collector == "down":

            def dropped() -> float:
                with urllib.request.urlopen(daemon.url + "/metrics", timeout=5) as answer:
                    text = answer.read().decode()
                for line in text.splitlines():
                    if line.startswith("mpcapi_otel_spans_dropped_total "):
                        return float(line.split()[1])
                return 0.0

            assert wait_until(lambda: dropped() >= 40, 30), dropped()
            assert "OpenTelemetry collector did not take a batch" in daemon.log_text()


def test_websocket_messages_are_spans_of_the_upgrades_trace(
    start_mpcapi: Callable[..., Daemon], receiver: Receiver
) -> None:
    daemon = traced(start_mpcapi, receiver.url)
    with socket(daemon, additional_headers={"traceparent": TRACEPARENT}) as connection:
        for message_id in ("a", "b"):
            send(connection, {"id": message_id, "type": "chat.completions", "body": CHAT})
            assert until_the_end(connection, message_id)[-1]["type"] == "done"
    spans = receiver.wait_for_spans(4)
    servers = [s for s in spans if s.kind == SERVER]
    assert len(servers) == 2
    assert {s.trace_id for s in servers} == {TRACE}
    assert {s.parent_span_id for s in servers} == {PARENT}
    assert len({s.span_id for s in servers}) == 2
    for server in servers:
        assert server.attributes["mpcapi.websocket.message_type"] == "chat.completions"
        assert server.attributes["gen_ai.operation.name"] == "chat"
        [call] = [s for s in spans if s.kind == CLIENT and s.parent_span_id == server.span_id]
        assert call.attributes["http.response.status_code"] == 200
