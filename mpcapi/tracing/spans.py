"""The spans of one finished call, built from its ``Exchange`` after the fact: a server span
for MPC-API serving it and a client span for its LiteLLM call, with the OpenTelemetry GenAI
and HTTP semantic conventions. Nothing is recorded while the call runs."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from mpcapi.exchange import WEBSOCKET, Exchange
from mpcapi.ledger.bodies import stored_body
from mpcapi.openai.routes import BY_PATH, Route
from mpcapi.tracing.context import TraceContext

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _nanos(seconds: float) -> int:
    return int(seconds * 1e9)


def _trace_state(trace: TraceContext) -> TraceState:
    if not trace.tracestate:
        return TraceState()
    return TraceState.from_header([trace.tracestate])


def gen_ai_attributes(exchange: Exchange, route: Route | None) -> dict[str, Any]:
    """The GenAI semantic-convention attributes both spans share (``route``: the
    exchange's, from the route table)."""
    attributes: dict[str, Any] = {}
    if route is not None and route.operation is not None:
        attributes["gen_ai.operation.name"] = route.operation
    if exchange.model is not None:
        attributes["gen_ai.request.model"] = exchange.model
    if exchange.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = exchange.max_tokens
    if exchange.temperature is not None:
        attributes["gen_ai.request.temperature"] = float(exchange.temperature)
    usage = exchange.usage
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if usage.model is not None:
            attributes["gen_ai.response.model"] = usage.model
    ttfb_ms = exchange.ttfb_ms
    if exchange.streamed and ttfb_ms is not None:
        attributes["gen_ai.server.time_to_first_token"] = ttfb_ms / 1000
    return attributes


def _name(exchange: Exchange, attributes: dict[str, Any]) -> str:
    operation = attributes.get("gen_ai.operation.name")
    if operation is not None and exchange.model is not None:
        return f"{operation} {exchange.model}"
    return f"{exchange.method} {exchange.route or exchange.path}"


def _server_attributes(exchange: Exchange) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "url.path": exchange.path,
        "http.response.status_code": exchange.status,
        "mpcapi.request_id": exchange.request_id,
        "mpcapi.outcome": exchange.outcome,
        "mpcapi.rate_limited": exchange.rate_limited,
    }
    if exchange.method == WEBSOCKET:
        attributes["mpcapi.websocket.message_type"] = exchange.message_type or ""
    else:
        attributes["http.request.method"] = exchange.method
    if exchange.route is not None:
        attributes["http.route"] = exchange.route
    if exchange.client is not None:
        attributes["client.address"] = exchange.client
    if exchange.key_id is not None:
        attributes["mpcapi.key_id"] = exchange.key_id
    if exchange.user is not None:
        attributes["enduser.id"] = exchange.user
    if exchange.cache is not None:
        attributes["mpcapi.cache"] = exchange.cache
    if exchange.usage is not None and exchange.usage.cost_usd is not None:
        attributes["mpcapi.cost_usd"] = exchange.usage.cost_usd
    if exchange.streamed:
        attributes["mpcapi.stream.events"] = exchange.events
    # Only with MPCAPI_LOG_BODIES (else the exchange holds none): redacted as in the ledger.
    for name, body in (
        ("mpcapi.request.body", exchange.request_body),
        ("mpcapi.response.body", exchange.response_body),
    ):
        stored = stored_body(body)
        if stored is not None:
            attributes[name] = stored
    return attributes


def _server_status(exchange: Exchange, attributes: dict[str, Any]) -> Status:
    # Server spans: a 5xx is an error of ours, a 4xx the client's (HTTP conventions).
    if exchange.status >= 500:
        attributes["error.type"] = exchange.upstream_failure or str(exchange.status)
        return Status(StatusCode.ERROR)
    return Status(StatusCode.UNSET)


def _client_status(exchange: Exchange, attributes: dict[str, Any]) -> Status:
    # Client spans: every 4xx and 5xx, and an answer that never came, is an error.
    failure = exchange.upstream_failure
    status = exchange.upstream_status
    if failure is not None or status is None or status >= 400:
        attributes["error.type"] = failure or (str(status) if status else "no_answer")
        return Status(StatusCode.ERROR)
    return Status(StatusCode.UNSET)


def _span(
    origin: tuple[Resource, InstrumentationScope],
    name: str,
    context: SpanContext,
    parent: SpanContext | None,
    attributes: dict[str, Any],
    kind: SpanKind,
    status: Status,
    start: float,
    end: float,
) -> ReadableSpan:
    resource, scope = origin
    return ReadableSpan(
        name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=attributes,
        kind=kind,
        instrumentation_scope=scope,
        status=status,
        start_time=_nanos(start),
        end_time=_nanos(end),
    )


def spans_of(
    exchange: Exchange, resource: Resource, scope: InstrumentationScope
) -> list[ReadableSpan]:
    """The call's server span and, when LiteLLM was called, its client span (its child)."""
    trace = exchange.trace
    assert trace is not None
    state = _trace_state(trace)
    resource_and_scope = (resource, scope)
    server = SpanContext(trace.trace_id, trace.span_id, False, _SAMPLED, state)
    parent = None
    if trace.parent_span_id is not None:
        parent = SpanContext(trace.trace_id, trace.parent_span_id, True, _SAMPLED, state)
    end = exchange.finished if exchange.finished is not None else exchange.started
    route = BY_PATH.get(exchange.route or "")
    gen_ai = gen_ai_attributes(exchange, route)
    name = _name(exchange, gen_ai)
    attributes = {**gen_ai, **_server_attributes(exchange)}
    status = _server_status(exchange, attributes)
    spans = [
        _span(
            resource_and_scope,
            name,
            server,
            parent,
            attributes,
            SpanKind.SERVER,
            status,
            exchange.started,
            end,
        )
    ]
    if exchange.upstream_sent_at is not None:
        client_attributes: dict[str, Any] = {**gen_ai, "http.route": exchange.route or ""}
        if route is not None:
            client_attributes["http.request.method"] = route.method
        if exchange.upstream_status is not None:
            client_attributes["http.response.status_code"] = exchange.upstream_status
        client_status = _client_status(exchange, client_attributes)
        client = SpanContext(trace.trace_id, trace.upstream_span_id, False, _SAMPLED, state)
        sent = exchange.upstream_sent_at
        spans.append(
            _span(
                resource_and_scope,
                name,
                client,
                server,
                client_attributes,
                SpanKind.CLIENT,
                client_status,
                sent,
                max(end, sent),
            )
        )
    return spans


__all__ = ["gen_ai_attributes", "spans_of"]
