"""``Tracing``: every finished API call (HTTP request or WebSocket message) as spans and GenAI
metrics, exported over OTLP/HTTP (``MPCAPI_OTEL_ENDPOINT``) by threads of their own.

The request path only makes the call's trace context (``tracing.context``); the spans are
built from the finished ``Exchange`` (``tracing.spans``) and queued. ``SpanShipper`` exports
them in batches from its thread; a full queue or a collector that fails drops spans, counted
in ``mpcapi_otel_spans_dropped_total``, and never touches a request. Metrics go out through
the SDK's periodic reader (its own thread, every ``OTEL_METRIC_EXPORT_INTERVAL`` ms).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from mpcapi import __version__
from mpcapi.config.settings import Settings
from mpcapi.exchange import Exchange
from mpcapi.metrics.labels import LabelCap, model_label
from mpcapi.openai.routes import BY_PATH
from mpcapi.tracing.context import TraceContext, trace_context
from mpcapi.tracing.spans import spans_of

log = Logger(namespace="mpcapi.tracing")

MAX_QUEUED_SPANS = 2048
BATCH_SIZE = 512
EXPORT_DELAY = 1.0  # seconds a span may wait for its batch
STOP_TIMEOUT = 5.0  # seconds the last export may take when the daemon stops
MODEL_SERIES = 50  # models with metric series of their own; the rest are "other"


class SpanShipper:
    """Exports queued spans in batches from a thread of its own; what it cannot queue or
    export is dropped and reported to ``report_dropped`` (from either thread)."""

    def __init__(
        self,
        exporter: SpanExporter,
        report_dropped: Callable[[int], None],
        warn: Callable[[str], None],
        *,
        max_queued: int = MAX_QUEUED_SPANS,
        batch_size: int = BATCH_SIZE,
        delay: float = EXPORT_DELAY,
    ) -> None:
        self._exporter = exporter
        self._report_dropped = report_dropped
        self._warn = warn  # called from the thread; must hand over to the reactor
        self._max_queued = max_queued
        self._batch_size = batch_size
        self._delay = delay
        self._queue: collections.deque[ReadableSpan] = collections.deque()  # thread-safe ends
        self._wake = threading.Event()
        self._stopping = False
        self._failing = False
        self._thread = threading.Thread(target=self._work, name="mpcapi-otlp-spans", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def ship(self, spans: Sequence[ReadableSpan]) -> None:
        """Queue ``spans`` (the reactor's side: never waits)."""
        room = max(self._max_queued - len(self._queue), 0)
        if room < len(spans):
            self._report_dropped(len(spans) - room)
            spans = spans[:room]
        self._queue.extend(spans)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Export what is queued and end the thread (blocks: run it off the reactor)."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:  # never started: export here
            self._export_queued()
        self._exporter.shutdown()

    def _work(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._export_queued()
        self._export_queued()

    def _export_queued(self) -> None:
        while self._queue:
            count = min(self._batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(count)]
            try:
                result = self._exporter.export(batch)
            except Exception as problem:  # the exporter's bug must not end the thread
                result = SpanExportResult.FAILURE
                self._warn(f"exporting spans failed: {problem!r}")
            if result is SpanExportResult.SUCCESS:
                if self._failing:
                    self._failing = False
                    self._warn("spans are exported again")
                continue
            self._report_dropped(len(batch))
            if not self._failing:
                self._failing = True
                self._warn(
                    "the OpenTelemetry collector did not take a batch of spans; they are "
                    "dropped (counted in mpcapi_otel_spans_dropped_total) until it does"
                )


class _HashedResource(Resource):
    """A Resource that hashes once: the OTLP encoder groups spans by resource, and
    Resource.__hash__ serialises every attribute to JSON each time (per span)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(dict(resource.attributes), resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other)


class GenAIMeters:
    """The GenAI metrics of model calls: token usage, duration, time to first token."""

    def __init__(self, meter: Meter) -> None:
        # As in /metrics: a model names its series once LiteLLM served it (50 at most).
        self._models = LabelCap(MODEL_SERIES)
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used per call"
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of a call"
        )
        self.first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time until a stream's first event",
        )

    def record(self, exchange: Exchange) -> None:
        route = BY_PATH.get(exchange.route or "")
        if route is None or route.operation is None:
            return
        model = model_label(self._models, exchange) or None
        attributes, inputs, outputs = self._attributes(route.operation, model)
        usage = exchange.usage
        if usage is not None:
            self.tokens.record(usage.prompt_tokens, inputs)
            self.tokens.record(usage.completion_tokens, outputs)
        if exchange.finished is not None:
            timing = attributes
            if exchange.status >= 400:
                timing = {**attributes, "error.type": str(exchange.status)}
            self.duration.record(exchange.duration_ms / 1000, timing)
        ttfb_ms = exchange.ttfb_ms
        if exchange.streamed and ttfb_ms is not None:
            self.first_token.record(ttfb_ms / 1000, attributes)

    @functools.lru_cache(maxsize=4 * MODEL_SERIES)  # noqa: B019 (one instance per process)
    def _attributes(
        self, operation: str, model: str | None
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The attributes of a call, and of its input and output tokens (made once)."""
        attributes: dict[str, Any] = {"gen_ai.operation.name": operation}
        if model is not None:
            attributes["gen_ai.request.model"] = model
        return (
            attributes,
            {**attributes, "gen_ai.token.type": "input"},
            {**attributes, "gen_ai.token.type": "output"},
        )


class Tracing(Service):
    """Gives calls their trace context (``context_of``) and exports finished ones
    (``observe``, an exchange observer)."""

    def __init__(
        self,
        shipper: SpanShipper,
        resource: Resource,
        meters: GenAIMeters | None = None,
        meter_provider: MeterProvider | None = None,
        run_blocking: Callable[[Callable[[], None]], Any] | None = None,
    ) -> None:
        self.shipper = shipper
        self.resource = resource
        self.scope = InstrumentationScope("mpcapi", __version__)
        self.meters = meters
        self._meter_provider = meter_provider
        self._run_blocking = run_blocking

    def context_of(self, request: IRequest) -> TraceContext:
        """The trace context of a request: the client's ``traceparent`` continued, or new."""
        return trace_context(request.getHeader(b"traceparent"), request.getHeader(b"tracestate"))

    def observe(self, exchange: Exchange) -> None:
        """Exchange observer: the API call's spans and metrics."""
        trace = exchange.trace
        if trace is None or exchange.route is None:
            return
        if self.meters is not None:
            self.meters.record(exchange)
        if trace.sampled:
            self.shipper.ship(spans_of(exchange, self.resource, self.scope))

    def startService(self) -> None:
        super().startService()
        self.shipper.start()

    def stopService(self) -> Any:
        super().stopService()
        if self._run_blocking is None:
            return self._stop()
        return self._run_blocking(self._stop)

    def _stop(self) -> None:
        self.shipper.stop()
        if self._meter_provider is not None:
            self._meter_provider.shutdown(timeout_millis=STOP_TIMEOUT * 1000)


def open_tracing(
    settings: Settings,
    report_dropped: Callable[[int], None],
    call_from_thread: Callable[..., Any],
    run_blocking: Callable[[Callable[[], None]], Any] | None = None,
) -> Tracing:
    """``Tracing`` exporting to ``settings.otel_endpoint`` (OTLP/HTTP: /v1/traces, /v1/metrics)."""
    base = settings.otel_endpoint.rstrip("/")
    names = {"service.name": settings.otel_service_name, "service.version": __version__}
    resource = _HashedResource(Resource.create(names))

    # The span exporter logs every failed attempt through the standard library; our warning
    # says it once per outage. The metric exporter keeps its errors (not its retries).
    logging.getLogger(OTLPSpanExporter.__module__).setLevel(logging.CRITICAL)
    logging.getLogger(OTLPMetricExporter.__module__).setLevel(logging.ERROR)

    def warn(message: str) -> None:
        call_from_thread(log.warn, "{message} ({endpoint})", message=message, endpoint=base)

    shipper = SpanShipper(OTLPSpanExporter(endpoint=f"{base}/v1/traces"), report_dropped, warn)
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{base}/v1/metrics"))
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    meters = GenAIMeters(meter_provider.get_meter("mpcapi", __version__))
    return Tracing(shipper, resource, meters, meter_provider, run_blocking)


__all__ = ["GenAIMeters", "SpanShipper", "Tracing", "open_tracing"]
