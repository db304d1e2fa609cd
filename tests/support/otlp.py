"""A real OTLP/HTTP receiver (what an OpenTelemetry collector listens with on :4318): it
decodes the exporter's protobuf with opentelemetry-proto and keeps the spans and metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any

import attrs
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.support.httpserver import serving


@attrs.define
class ReceivedSpan:
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 2 server, 3 client
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    service_name: str
    start_ns: int
    end_ns: int


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@attrs.define
class Receiver:
    url: str = ""
    delay: float = 0.0  # seconds each answer waits: a slow collector
    spans: list[ReceivedSpan] = attrs.Factory(list)
    metric_names: set[str] = attrs.Factory(set)
    posts: int = 0

    def take(self, body: bytes, path: str) -> None:
        self.posts += 1
        if path == "/v1/traces":
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            ReceivedSpan(
                                name=span.name,
                                kind=span.kind,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in span.attributes},
                                status_code=span.status.code,
                                service_name=resource.get("service.name", ""),
                                start_ns=span.start_time_unix_nano,
                                end_ns=span.end_time_unix_nano,
                            )
                        )
        elif path == "/v1/metrics":
            metrics = ExportMetricsServiceRequest.FromString(body)
            for resource_metrics in metrics.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    self.metric_names.update(m.name for m in scope_metrics.metrics)

    def wait_for_spans(self, count: int, timeout: float = 15.0) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while len(self.spans) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.spans) >= count, self.spans
        return self.spans


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if receiver.delay:
                time.sleep(receiver.delay)
            receiver.take(body, self.path)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def otlp_receiver(delay: float = 0.0) -> Iterator[Receiver]:
    receiver = Receiver(delay=delay)
    with serving(_handler(receiver), "otlp-receiver") as url:
        receiver.url = url
        yield receiver
