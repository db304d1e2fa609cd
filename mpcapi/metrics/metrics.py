"""Metrics: the Prometheus families at ``/metrics`` and the numbers of the dashboard.

``Metrics.observe`` is an exchange observer (see ``mpcapi.exchange``): it turns every
finished call into counter and histogram updates. ``Metrics.track_inflight`` wraps the
served resource to count the requests in flight.

One process (the default): the families live in this process's own registry. With
``MPCAPI_WORKERS`` above 1 the supervisor gives its workers a fresh directory in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode): every worker writes its
values to its own memory-mapped files there, and whichever worker answers ``/metrics`` or
``/api/stats`` adds up every worker's files. The same directory holds each worker's ring of
recent errors (``errors_<pid>.ring``), so the dashboard sees the errors of every worker.

Label values stay bounded: ``route`` is the operation (``/chat/completions``), never the raw
path (unknown paths are ``other``); ``model`` keeps the first ``MODEL_LABEL_LIMIT`` models that
LiteLLM answered successfully (per process) and calls the rest ``other``; users and keys of
the dashboard are capped the same way (they are not exported at ``/metrics``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from mpcapi.config.settings import Settings
from mpcapi.errors import ApiError
from mpcapi.exchange import Exchange
from mpcapi.metrics.errorring import ErrorRing
from mpcapi.metrics.labels import (
    ANONYMOUS,
    CACHE_RESULTS,
    METHODS,
    OTHER,
    UPSTREAM_FAILURES,
    LabelCap,
    failure_kind,
    is_api_traffic,
    model_label,
    route_of,
    short,
)
from mpcapi.metrics.multiprocess import Without, WorkerProcesses, live_pids
from mpcapi.metrics.summary import DASHBOARD_PREFIX, summarize
from mpcapi.policy.keys import require_admin

MODEL_LABEL_LIMIT = 50
PRINCIPAL_LIMIT = 500  # distinct users and keys the dashboard tells apart (per process)
# Seconds; from a cached answer to the longest LITELLM_TIMEOUT-bound stream.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
LATEST_ERRORS = 20


# --- the admin guard ------------------------------------------------------------------------


def require_metrics_access(request: Any, settings: Settings) -> None:
    """``/metrics``: open with ``MPCAPI_METRICS_PUBLIC``, otherwise like every admin surface
    (``keys.require_admin``: 401 without the admin key as Bearer token, 403 when no admin key
    is configured)."""
    if settings.metrics_public:
        return
    if not settings.admin_key:
        raise ApiError(
            403,
            "Forbidden",
            "/metrics is closed: set MPCAPI_ADMIN_KEY (and scrape with it as Bearer token) "
            "or MPCAPI_METRICS_PUBLIC=true",
        )
    require_admin(request, settings)


# --- the metrics ----------------------------------------------------------------------------


class Metrics:
    """Every metric family of one process, fed by ``observe``."""

    def __init__(self, clock: IReactorTime, multiproc_dir: str | None = None) -> None:
        self._clock = clock
        self.multiproc_dir = multiproc_dir
        self.registry = CollectorRegistry()
        self._dashboard_registry = CollectorRegistry()
        r, d = self.registry, self._dashboard_registry
        if multiproc_dir is None:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        buckets = LATENCY_BUCKETS
        self.requests = Counter(
            "mpcapi_requests",
            "Requests answered, by operation, method, status and model",
            ["route", "method", "status", "model"],
            registry=r,
        )
        self.request_duration = Histogram(
            "mpcapi_request_duration_seconds",
            "Time from a request's arrival to the end of its answer",
            ["route"],
            buckets=buckets,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "mpcapi_upstream_duration_seconds",
            "Time LiteLLM took to send its response headers",
            ["route"],
            buckets=buckets,
            registry=r,
        )
        self.time_to_first_byte = Histogram(
            "mpcapi_time_to_first_byte_seconds",
            "Time from a streamed request's arrival to LiteLLM's first stream bytes",
            ["route"],
            buckets=buckets,
            registry=r,
        )
        self.tokens = Counter(
            "mpcapi_tokens",
            "Tokens LiteLLM reported, by model and type (prompt or completion)",
            ["model", "type"],
            registry=r,
        )
        self.cost = Counter(
            "mpcapi_cost_usd", "Cost LiteLLM reported, in USD", ["model"], registry=r
        )
        self.inflight = Gauge(
            "mpcapi_inflight_requests",
            "Requests being served right now",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.cache = Counter(
            "mpcapi_cache_requests",
            "Cacheable requests by cache result (hit, miss, bypass)",
            ["result"],
            registry=r,
        )
        self.ratelimited = Counter(
            "mpcapi_ratelimited", "Requests refused by a rate limit", registry=r
        )
        self.redis_failures = Counter(
            "mpcapi_redis_failures",
            "Redis commands that failed; each was served without Redis (fail open)",
            registry=r,
        )
        self.redis_outages = Counter(
            "mpcapi_redis_outages", "Redis outages begun (each logged once)", registry=r
        )
        self.usage_queue = Gauge(
            "mpcapi_usage_queue_rows",
            "Usage rows waiting for the database (read once per second)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.usage_refused = Counter(
            "mpcapi_usage_rows_refused",
            "Usage rows the database refused (kept in the spool's .refused file, not retried)",
            registry=r,
        )
        self.spans_dropped = Counter(
            "mpcapi_otel_spans_dropped",
            "Trace spans never exported: the queue was full or the collector failed",
            registry=r,
        )
        self.upstream_errors = Counter(
            "mpcapi_upstream_errors",
            "Requests LiteLLM failed: unreachable, timeout, status_5xx, key_refused, broken",
            ["kind"],
            registry=r,
        )
        for kind in UPSTREAM_FAILURES:
            self.upstream_errors.labels(kind)
        for result in CACHE_RESULTS:
            self.cache.labels(result)
        # The dashboard's per-user and per-key totals (API traffic only).
        self._user_requests = Counter(
            DASHBOARD_PREFIX + "user_requests", "Requests by user", ["user"], registry=d
        )
        self._user_tokens = Counter(
            DASHBOARD_PREFIX + "user_tokens", "Tokens by user", ["user", "type"], registry=d
        )
        self._user_cost = Counter(
            DASHBOARD_PREFIX + "user_cost_usd", "Cost by user", ["user"], registry=d
        )
        self._key_requests = Counter(
            DASHBOARD_PREFIX + "key_requests", "Requests by key", ["key_id", "user"], registry=d
        )
        self._key_tokens = Counter(
            DASHBOARD_PREFIX + "key_tokens", "Tokens by key", ["key_id"], registry=d
        )
        self._key_cost = Counter(
            DASHBOARD_PREFIX + "key_cost_usd", "Cost by key", ["key_id"], registry=d
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._models = LabelCap(MODEL_LABEL_LIMIT)
        self._users = LabelCap(PRINCIPAL_LIMIT)
        self._keys = LabelCap(PRINCIPAL_LIMIT)
        if multiproc_dir is None:
            self.errors = ErrorRing.in_memory()
        else:
            self.errors = ErrorRing.in_directory(multiproc_dir, os.getpid())

    # Feeding

    def redis_failed(self, began_outage: bool) -> None:
        """A Redis command failed (the request went on without it); maybe an outage began."""
        self.redis_failures.inc()
        if began_outage:
            self.redis_outages.inc()

    def track_inflight(self, resource: IResource) -> IResource:
        """``resource``, counting the requests it is serving in ``mpcapi_inflight_requests``."""
        return _InFlight(resource, self.inflight)

    def observe(self, exchange: Exchange) -> None:
        """The exchange observer: one finished call into every family."""
        route = route_of(exchange)
        method = exchange.method if exchange.method in METHODS else OTHER
        status = exchange.status
        model = model_label(self._models, exchange)
        self._child(self.requests, route, method, str(status), model).inc()
        self._child(self.request_duration, route).observe(exchange.duration_ms / 1000)
        upstream_ms = exchange.upstream_ms
        if upstream_ms is not None:
            self._child(self.upstream_duration, route).observe(upstream_ms / 1000)
        ttfb_ms = exchange.ttfb_ms
        if ttfb_ms is not None:
            self._child(self.time_to_first_byte, route).observe(ttfb_ms / 1000)
        usage = exchange.usage
        prompt = usage.prompt_tokens if usage is not None else 0
        completion = usage.completion_tokens if usage is not None else 0
        cost = usage.cost_usd if usage is not None and usage.cost_usd is not None else None
        if usage is not None:
            self._child(self.tokens, model, "prompt").inc(prompt)
            self._child(self.tokens, model, "completion").inc(completion)
        if cost is not None:
            self._child(self.cost, model).inc(cost)
        cache = exchange.cache
        if cache:
            self._child(self.cache, cache if cache in CACHE_RESULTS else OTHER).inc()
        if exchange.rate_limited:
            self.ratelimited.inc()
        kind = failure_kind(exchange)
        if kind is not None:
            self._child(self.upstream_errors, kind).inc()
        if not is_api_traffic(route):
            return
        user = self._users(short(exchange.user or ANONYMOUS))
        cost = cost or 0.0
        self._child(self._user_requests, user).inc()
        self._child(self._user_tokens, user, "prompt").inc(prompt)
        self._child(self._user_tokens, user, "completion").inc(completion)
        self._child(self._user_cost, user).inc(cost)
        if exchange.key_id:
            key = self._keys(short(exchange.key_id))
            self._child(self._key_requests, key, user if key != OTHER else OTHER).inc()
            self._child(self._key_tokens, key).inc(prompt + completion)
            self._child(self._key_cost, key).inc(cost)
        if status >= 400 or kind is not None:
            self.errors.append(self._error_record(exchange, route, status, kind))

    def _child(self, family: Any, *values: str) -> Any:
        """``family.labels(*values)``, remembered: prometheus_client's own lookup takes a lock
        and checks every value, a dozen times per request. Bounded like the label values."""
        key = (id(family), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*values)
        return child

    def _error_record(
        self, exchange: Exchange, route: str, status: int, kind: str | None
    ) -> dict[str, Any]:
        return {
            "time": round(self._clock.seconds(), 3),
            "method": short(exchange.method, 10),
            "path": short(exchange.path, 200),
            "route": route,
            "status": status,
            "model": short(exchange.model, 100) if exchange.model else None,
            "request_id": short(exchange.request_id, 128),
            "user": short(exchange.user, 100) if exchange.user else None,
            "key_id": short(exchange.key_id, 100) if exchange.key_id else None,
            "upstream_failure": kind,
            "outcome": short(exchange.outcome, 20),
            "duration_ms": exchange.duration_ms,
        }

    # Reading

    def exposition(self, accept: bytes | str | None) -> tuple[bytes, str]:
        """The body and content type of ``/metrics``, in the format ``accept`` asks for."""
        if isinstance(accept, bytes):
            accept = accept.decode("latin-1")
        encode, content_type = choose_encoder(accept or "")
        if self.multiproc_dir is None:
            return encode(self.registry), content_type
        registry = CollectorRegistry()
        collector = MultiProcessCollector(None, self.multiproc_dir)  # type: ignore[arg-type]
        registry.register(Without(collector, DASHBOARD_PREFIX))
        registry.register(WorkerProcesses(self.multiproc_dir))
        return encode(registry), content_type

    def _families(self) -> Iterator[Metric]:
        if self.multiproc_dir is None:
            yield from self.registry.collect()
            yield from self._dashboard_registry.collect()
        else:
            yield from MultiProcessCollector(None, self.multiproc_dir).collect()  # type: ignore[arg-type]

    def _recent_errors(self) -> list[dict[str, Any]]:
        if self.multiproc_dir is None:
            found = self.errors.records()
        else:
            found = ErrorRing.read_directory(self.multiproc_dir)
        found.sort(key=lambda record: (record.get("time") or 0, record.get("seq", 0)), reverse=True)
        return found[:LATEST_ERRORS]

    def stats(self) -> dict[str, Any]:
        """The dashboard's numbers: cumulative totals of every worker, and the latest errors
        (the dashboard derives rates from two readings)."""
        return summarize(
            self._families(),
            now=self._clock.seconds(),
            errors=self._recent_errors(),
            workers=len(live_pids(self.multiproc_dir)) if self.multiproc_dir else 1,
        )


class _InFlight(Resource):
    isLeaf = True

    def __init__(self, wrapped: IResource, gauge: Gauge) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._gauge = gauge

    def render(self, request: Any) -> Any:
        self._gauge.inc()
        request.notifyFinish().addBoth(self._done)
        result = self._wrapped.render(request)
        return NOT_DONE_YET if result is NOT_DONE_YET else result

    def _done(self, _: object) -> None:
        self._gauge.dec()
