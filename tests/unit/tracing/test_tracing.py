"""Spans, metrics and trace context of calls through the gateway, exported in memory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest_twisted
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mpcapi.tracing.export import GenAIMeters, SpanShipper, Tracing
from tests.support.gateway import CHAT, Harness, answer, header, make_harness
from tests.support.logs import captured

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Traced:
    """A harness whose gateway traces into memory."""

    def __init__(self, **overrides: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.dropped: list[int] = []
        self.reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[self.reader])
        self.tracing = Tracing(
            SpanShipper(self.exporter, self.dropped.append, lambda message: None),
            Resource.create({"service.name": "mpc-api-test"}),
            GenAIMeters(provider.get_meter("test")),
        )
        self.harness: Harness = make_harness(tracing=self.tracing, **overrides)

    def spans(self) -> list[ReadableSpan]:
        self.tracing.shipper.stop()  # exports what is queued (no thread in these tests)
        return list(self.exporter.get_finished_spans())

    def metrics(self) -> dict[str, list[Any]]:
        found: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found[metric.name] = list(metric.data.data_points)
        return found


def by_kind(spans: Sequence[ReadableSpan]) -> dict[SpanKind, ReadableSpan]:
    kinds = {span.kind: span for span in spans}
    assert len(kinds) == len(spans)
    return kinds


@pytest_twisted.ensureDeferred
async def test_a_chat_is_a_server_span_with_a_client_span_for_litellm() -> None:
    traced = Traced()
    body = {**CHAT, "max_tokens": 50, "temperature": 0.5}
    response = await traced.harness.post(
        "/api/chat/completions",
        body,
        headers={"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "app=1"},
    )
    assert response.code == 200
    spans = by_kind(traced.spans())
    server, client = spans[SpanKind.SERVER], spans[SpanKind.CLIENT]
    assert server.name == client.name == "chat gpt-4o-mini"
    assert server.context is not None and client.context is not None
    assert f"{server.context.trace_id:032x}" == TRACE
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT
    assert server.parent.is_remote
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert server.context.trace_state.to_header() == "app=1"
    attributes = dict(server.attributes or {})
    assert {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.request.max_tokens": 50,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.usage.input_tokens": 3,
        "gen_ai.usage.output_tokens": 1,
        "http.request.method": "POST",
        "http.route": "/chat/completions",
        "url.path": "/api/chat/completions",
        "http.response.status_code": 200,
        "mpcapi.outcome": "completed",
        "mpcapi.rate_limited": False,
    }.items() <= attributes.items()
    assert attributes["mpcapi.request_id"] == header(response, "x-request-id")
    assert server.status.status_code is StatusCode.UNSET
    assert dict(client.attributes or {})["http.response.status_code"] == 200
    assert server.start_time is not None and client.start_time is not None
    assert server.start_time <= client.start_time
    # LiteLLM continues the trace below our client span.
    [seen] = traced.harness.fake.seen
    expected = f"00-{TRACE}-{client.context.span_id:016x}-01"
    assert seen.header("traceparent") == expected
    assert seen.header("tracestate") == "app=1"


@pytest_twisted.ensureDeferred
async def test_without_a_traceparent_a_new_trace_starts() -> None:
    traced = Traced()
    await traced.harness.post("/api/chat/completions", CHAT)
    await traced.harness.post("/api/chat/completions", CHAT)
    servers = [s for s in traced.spans() if s.kind is SpanKind.SERVER]
    assert [s.parent for s in servers] == [None, None]
    assert len({s.context.trace_id for s in servers if s.context}) == 2


@pytest_twisted.ensureDeferred
async def test_an_unsampled_trace_is_forwarded_but_not_exported() -> None:
    traced = Traced()
    await traced.harness.post(
        "/api/chat/completions", CHAT, headers={"traceparent": f"00-{TRACE}-{PARENT}-00"}
    )
    assert traced.spans() == []
    [seen] = traced.harness.fake.seen
    assert (seen.header("traceparent") or "").startswith(f"00-{TRACE}-")


@pytest_twisted.ensureDeferred
async def test_a_502_is_an_error_on_both_spans() -> None:
    traced = Traced()
    traced.harness.fake.routes[("POST", "/chat/completions")] = answer(500, {"error": "down"})
    response = await traced.harness.post("/api/chat/completions", CHAT)
    assert response.code == 502
    spans = by_kind(traced.spans())
    for span in spans.values():
        assert span.status.status_code is StatusCode.ERROR
        assert dict(span.attributes or {})["error.type"] == "status_5xx"


@pytest_twisted.ensureDeferred
async def test_a_rate_limited_call_has_no_litellm_span() -> None:
    traced = Traced(default_rpm=1)
    await traced.harness.post("/api/chat/completions", CHAT)
    refused = await traced.harness.post("/api/chat/completions", CHAT)
    assert refused.code == 429
    last = [s for s in traced.spans() if s.kind is SpanKind.SERVER][-1]
    attributes = dict(last.attributes or {})
    assert attributes["mpcapi.rate_limited"] is True
    assert attributes["http.response.status_code"] == 429
    assert last.status.status_code is StatusCode.UNSET  # the client's error, not ours
    assert len([s for s in traced.spans() if s.kind is SpanKind.CLIENT]) == 1


@pytest_twisted.ensureDeferred
async def test_a_cache_hit_has_no_litellm_span() -> None:
    traced = Traced(cache_ttl=60)
    await traced.harness.post("/api/chat/completions", CHAT)
    await traced.harness.post("/api/chat/completions", CHAT)
    servers = [s for s in traced.spans() if s.kind is SpanKind.SERVER]
    assert [dict(s.attributes or {})["mpcapi.cache"] for s in servers] == ["miss", "hit"]
    assert len([s for s in traced.spans() if s.kind is SpanKind.CLIENT]) == 1


@pytest_twisted.ensureDeferred
async def test_non_api_requests_are_not_traced() -> None:
    traced = Traced()
    assert (await traced.harness.get("/health")).code == 200
    assert traced.spans() == []


@pytest_twisted.ensureDeferred
async def test_gen_ai_metrics_are_recorded() -> None:
    traced = Traced()
    await traced.harness.post("/api/chat/completions", CHAT)
    metrics = traced.metrics()
    points = metrics["gen_ai.client.token.usage"]
    tokens = {point.attributes["gen_ai.token.type"]: point.sum for point in points}
    assert tokens == {"input": 3, "output": 1}
    [duration] = metrics["gen_ai.client.operation.duration"]
    assert duration.count == 1
    assert duration.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o-mini",
    }


@pytest_twisted.ensureDeferred
async def test_the_trace_id_is_in_the_log_line() -> None:
    traced = Traced()
    with captured("mpcapi.request") as events:
        await traced.harness.post(
            "/api/chat/completions", CHAT, headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}
        )
    assert [e.get("trace_id") for e in events] == [TRACE]


@pytest_twisted.ensureDeferred
async def test_with_tracing_off_nothing_is_forwarded_or_logged() -> None:
    harness = make_harness()
    await harness.post(
        "/api/chat/completions", CHAT, headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}
    )
    [seen] = harness.fake.seen
    assert seen.header("traceparent") is None
    assert harness.parts.tracing is None


# The shipper


class Failing(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


def test_a_failing_collector_drops_and_counts_spans() -> None:
    dropped: list[int] = []
    warnings: list[str] = []
    shipper = SpanShipper(Failing(), dropped.append, warnings.append, batch_size=2)
    shipper.ship([ReadableSpan("a"), ReadableSpan("b"), ReadableSpan("c")])
    shipper.stop()
    assert sum(dropped) == 3
    assert len(warnings) == 1 and "dropped" in warnings[0]


def test_a_full_queue_drops_and_counts_spans() -> None:
    dropped: list[int] = []
    exporter = InMemorySpanExporter()
    shipper = SpanShipper(exporter, dropped.append, lambda m: None, max_queued=3)
    shipper.ship([ReadableSpan("a"), ReadableSpan("b")])
    shipper.ship([ReadableSpan("c"), ReadableSpan("d")])
    shipper.stop()
    assert dropped == [1]
    assert [s.name for s in exporter.get_finished_spans()] == ["a", "b", "c"]


def test_the_thread_exports_in_the_background() -> None:
    exporter = InMemorySpanExporter()
    shipper = SpanShipper(exporter, lambda n: None, lambda m: None, delay=0.01)
    shipper.start()
    shipper.ship([ReadableSpan("a")])
    shipper.stop()
    assert [s.name for s in exporter.get_finished_spans()] == ["a"]


@pytest_twisted.ensureDeferred
async def test_bodies_are_exported_redacted_only_with_log_bodies() -> None:
    body = {**CHAT, "api_key": "sk-secretsecret"}
    plain = Traced()
    await plain.harness.post("/api/chat/completions", body)
    [server] = [s for s in plain.spans() if s.kind is SpanKind.SERVER]
    assert not {"mpcapi.request.body", "mpcapi.response.body"} & set(server.attributes or {})
    logged = Traced(log_bodies=True)
    await logged.harness.post("/api/chat/completions", body)
    [server] = [s for s in logged.spans() if s.kind is SpanKind.SERVER]
    attributes = dict(server.attributes or {})
    assert '"api_key":"[redacted]"' in attributes["mpcapi.request.body"]
    assert "sk-secretsecret" not in attributes["mpcapi.request.body"]
    assert '"content":"Hello!"' in attributes["mpcapi.request.body"]
    assert '"content":"Hi"' in attributes["mpcapi.response.body"]


@pytest_twisted.ensureDeferred
async def test_models_litellm_never_served_share_one_metric_series() -> None:
    traced = Traced()
    traced.harness.fake.routes[("POST", "/chat/completions")] = answer(
        404, {"error": {"message": "no such model"}}
    )
    for model in ("made-up-1", "made-up-2"):
        assert (
            await traced.harness.post("/api/chat/completions", {**CHAT, "model": model})
        ).code == 404
    [duration] = traced.metrics()["gen_ai.client.operation.duration"]
    assert duration.count == 2
    assert duration.attributes["gen_ai.request.model"] == "other"
    # The spans still name the model asked for.
    names = {s.name for s in traced.spans() if s.kind is SpanKind.SERVER}
    assert names == {"chat made-up-1", "chat made-up-2"}
