"""The ``Exchange`` every call fills in, its log fields, and how it reaches the observers."""

from __future__ import annotations

from typing import Any

from twisted.logger import LogEvent

from mpcapi.exchange import WEBSOCKET, Exchange
from mpcapi.http.requestlog import log_fields, report
from tests.support.exchanges import exchange


def test_times_are_measured_from_the_start() -> None:
    found = exchange(duration_ms=250.0, upstream_ms=40.0, ttfb_ms=60.0)
    assert (found.duration_ms, found.upstream_ms, found.ttfb_ms) == (250.0, 40.0, 60.0)
    unfinished = Exchange("r", started=5.0)
    assert (unfinished.duration_ms, unfinished.upstream_ms, unfinished.ttfb_ms) == (0, None, None)


def test_the_key_gives_its_id_and_owner_and_never_its_hash() -> None:
    found = exchange(key_id="key_1", user="alice")
    assert (found.key_id, found.user) == ("key_1", "alice")
    assert (Exchange("r", 0.0).key_id, Exchange("r", 0.0).user) == (None, None)
    assert "x" not in log_fields(found).values()  # the key row's hash is not logged


def test_log_fields_of_a_plain_request() -> None:
    fields = log_fields(
        exchange(method="POST", path="/api/embeddings", route="/embeddings", status=200,
                 duration_ms=3.0, prompt_tokens=4, completion_tokens=0, cost_usd=0.1)
    )  # fmt: skip
    assert fields["route"] == "/embeddings"
    assert (fields["prompt_tokens"], fields["completion_tokens"], fields["cost_usd"]) == (4, 0, 0.1)
    assert "events" not in fields and "ws_type" not in fields and "upstream_ms" not in fields


def test_log_fields_of_a_stream_and_of_a_websocket_message() -> None:
    stream = log_fields(exchange(events=7, ttfb_ms=12.5, content_deltas=5))
    assert (stream["events"], stream["ttfb_ms"], stream["content_deltas"]) == (7, 12.5, 5)
    message = log_fields(
        exchange(method=WEBSOCKET, streamed=True, message_type="completions", message_id="m" * 300)
    )
    assert message["ws_type"] == "completions"
    assert message["ws_id"] == "m" * 128  # a client's id is logged cut to size


def test_report_logs_once_then_tells_every_observer_even_after_one_fails(
    log_events: list[LogEvent],
) -> None:
    seen: list[Any] = []

    def broken(found: Exchange) -> None:
        raise RuntimeError("observer bug")

    found = exchange(method="GET", path="/health", status=200)
    report(found, [broken, seen.append])
    assert seen == [found]
    lines = [e for e in log_events if e.get("log_namespace") == "mpcapi.request"]
    assert [e.get("path") for e in lines if "path" in e] == ["/health"]
    assert any(e.get("log_failure") is not None for e in lines)  # the broken observer
