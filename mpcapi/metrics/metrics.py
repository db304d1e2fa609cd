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

import glob
import json
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
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
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from mpcapi.config.settings import Settings
from mpcapi.errors import ApiError
from mpcapi.exchange import Exchange
from mpcapi.openai.routes import ROUTES
from mpcapi.policy.keys import require_admin

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MODEL_LABEL_LIMIT = 50
PRINCIPAL_LIMIT = 500  # distinct users and keys the dashboard tells apart (per process)
OTHER = "other"
ANONYMOUS = "anonymous"

OPENAI_ROUTES = (*(route.path for route in ROUTES), "/ws")
# Routes that are not API traffic: the dashboard's rates and errors leave them out.
SERVICE_ROUTES = (
    "/health",
    "/health/ready",
    "/metrics",
    "/api/stats",
    "/api/usage",
    "/openapi.json",
    "/dashboard",
)
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
UPSTREAM_FAILURES = ("unreachable", "timeout", "status_5xx", "key_refused", "broken")
CACHE_RESULTS = ("hit", "miss", "bypass")
TOKEN_TYPES = ("prompt", "completion")
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
# The dashboard's own families: in the multiprocess directory with the rest, never exported.
_DASHBOARD_PREFIX = "mpcapi_dashboard_"
LATEST_ERRORS = 20
TOP_KEYS = 10


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


# --- labels ---------------------------------------------------------------------------------


def route_of(exchange: Exchange) -> str:
    """The operation of a request: the route the app named, else one derived from a known
    path, else ``other`` (never the raw path: that would be unbounded)."""
    if exchange.route:
        return exchange.route
    path = exchange.path
    for prefix in ("/api", "/v1"):
        if path.startswith(prefix + "/") and path[len(prefix) :] in OPENAI_ROUTES:
            return path[len(prefix) :]
    if path in SERVICE_ROUTES:
        return str(path)
    if path.startswith("/dashboard/"):
        return "/dashboard"
    return OTHER


def is_api_traffic(route: str) -> bool:
    return route not in SERVICE_ROUTES


def failure_kind(exchange: Exchange) -> str | None:
    """Why LiteLLM failed this request, if it did (a stream that broke off counts too)."""
    failure = exchange.upstream_failure
    if failure is not None:
        return failure if failure in UPSTREAM_FAILURES else OTHER
    if exchange.streamed:
        if exchange.outcome == "timeout":
            return "timeout"
        if exchange.outcome == "upstream_error":
            return "broken"
    return None


class LabelCap:
    """The first ``limit`` values admitted keep their name; the rest are ``other``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._known: set[str] = set()

    def __call__(self, value: str, admit: bool = True) -> str:
        if value in self._known:
            return value
        if admit and len(self._known) < self._limit:
            self._known.add(value)
            return value
        return OTHER


def _short(value: Any, limit: int = 120) -> str:
    return str(value)[:limit]


# --- the ring of recent errors --------------------------------------------------------------


class ErrorRing:
    """The latest errors of one process, in fixed slots of a buffer (a bytearray, or a
    memory-mapped file in the multiprocess directory so that any worker can read them)."""

    SLOTS = 64
    SLOT_BYTES = 1024
    _HEADER = struct.Struct("<Q")  # the number of records ever written
    _LENGTH = struct.Struct("<I")
    SIZE = _HEADER.size + SLOTS * SLOT_BYTES

    def __init__(self, buffer: bytearray | mmap.mmap) -> None:
        self._buffer = buffer

    @classmethod
    def in_memory(cls) -> ErrorRing:
        return cls(bytearray(cls.SIZE))

    @classmethod
    def in_directory(cls, directory: str, pid: int) -> ErrorRing:
        path = os.path.join(directory, f"errors_{pid}.ring")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, cls.SIZE)
            return cls(mmap.mmap(fd, cls.SIZE))
        finally:
            os.close(fd)

    def append(self, record: dict[str, Any]) -> None:
        (written,) = self._HEADER.unpack_from(self._buffer, 0)
        record = {**record, "seq": written}  # orders the records of one process
        data = json.dumps(record, separators=(",", ":")).encode("utf-8")
        if len(data) > self.SLOT_BYTES - self._LENGTH.size:
            return  # every field is shortened before; nothing sane is this long
        offset = self._HEADER.size + (written % self.SLOTS) * self.SLOT_BYTES
        self._LENGTH.pack_into(self._buffer, offset, len(data))
        end = offset + self._LENGTH.size + len(data)
        self._buffer[offset + self._LENGTH.size : end] = data
        self._HEADER.pack_into(self._buffer, 0, written + 1)

    def records(self) -> list[dict[str, Any]]:
        return _ring_records(bytes(self._buffer))

    @classmethod
    def read_directory(cls, directory: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for path in glob.glob(os.path.join(directory, "errors_*.ring")):
            try:
                with open(path, "rb") as handle:
                    found.extend(_ring_records(handle.read(cls.SIZE)))
            except OSError:
                continue
        return found


def _ring_records(raw: bytes) -> list[dict[str, Any]]:
    if len(raw) < ErrorRing.SIZE:
        return []
    (written,) = ErrorRing._HEADER.unpack_from(raw, 0)
    records = []
    for slot in range(min(written, ErrorRing.SLOTS)):
        offset = ErrorRing._HEADER.size + slot * ErrorRing.SLOT_BYTES
        (length,) = ErrorRing._LENGTH.unpack_from(raw, offset)
        start = offset + ErrorRing._LENGTH.size
        try:
            records.append(json.loads(raw[start : start + length]))
        except ValueError:
            continue  # a slot being written right now
    return records


# --- multiprocess helpers -------------------------------------------------------------------


def fresh_multiproc_dir() -> str:
    """The supervisor's directory for its workers' metric files (empty, private)."""
    return tempfile.mkdtemp(prefix="mpcapi-metrics-")


def forget_process(directory: str, pid: int) -> None:
    """A worker died: its in-flight gauge no longer counts (its counters still do)."""
    mark_process_dead(pid, directory)


def remove_multiproc_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def live_pids(directory: str) -> list[int]:
    """The processes with files in ``directory`` that are still running."""
    pids: set[int] = set()
    for path in glob.glob(os.path.join(directory, "*.db")):
        tail = os.path.basename(path)[: -len(".db")].rsplit("_", 1)[-1]
        if tail.isdigit():
            pids.add(int(tail))
    return sorted(pid for pid in pids if os.path.exists(f"/proc/{pid}"))


class _Without(Collector):
    """A collector minus the families whose names start with ``prefix``."""

    def __init__(self, collector: Collector, prefix: str) -> None:
        self._collector = collector
        self._prefix = prefix

    def collect(self) -> Iterable[Metric]:
        return (m for m in self._collector.collect() if not m.name.startswith(self._prefix))


class _WorkerProcesses(Collector):
    """``process_*`` of every live worker, told apart by a ``pid`` label."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for pid in live_pids(self._directory):
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in collector.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "pid": str(pid)}, sample.value)
        return list(families.values())


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
            _DASHBOARD_PREFIX + "user_requests", "Requests by user", ["user"], registry=d
        )
        self._user_tokens = Counter(
            _DASHBOARD_PREFIX + "user_tokens", "Tokens by user", ["user", "type"], registry=d
        )
        self._user_cost = Counter(
            _DASHBOARD_PREFIX + "user_cost_usd", "Cost by user", ["user"], registry=d
        )
        self._key_requests = Counter(
            _DASHBOARD_PREFIX + "key_requests", "Requests by key", ["key_id", "user"], registry=d
        )
        self._key_tokens = Counter(
            _DASHBOARD_PREFIX + "key_tokens", "Tokens by key", ["key_id"], registry=d
        )
        self._key_cost = Counter(
            _DASHBOARD_PREFIX + "key_cost_usd", "Cost by key", ["key_id"], registry=d
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
        model = self._model_label(exchange)
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
        user = self._users(_short(exchange.user or ANONYMOUS))
        cost = cost or 0.0
        self._child(self._user_requests, user).inc()
        self._child(self._user_tokens, user, "prompt").inc(prompt)
        self._child(self._user_tokens, user, "completion").inc(completion)
        self._child(self._user_cost, user).inc(cost)
        if exchange.key_id:
            key = self._keys(_short(exchange.key_id))
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

    def _model_label(self, exchange: Exchange) -> str:
        model = exchange.model
        if not model:
            return ""
        # A model becomes a label value once LiteLLM served it: made-up names stay "other".
        served = exchange.upstream_status == 200 or exchange.cache == "hit"
        return self._models(_short(model), admit=served)

    def _error_record(
        self, exchange: Exchange, route: str, status: int, kind: str | None
    ) -> dict[str, Any]:
        return {
            "time": round(self._clock.seconds(), 3),
            "method": _short(exchange.method, 10),
            "path": _short(exchange.path, 200),
            "route": route,
            "status": status,
            "model": _short(exchange.model, 100) if exchange.model else None,
            "request_id": _short(exchange.request_id, 128),
            "user": _short(exchange.user, 100) if exchange.user else None,
            "key_id": _short(exchange.key_id, 100) if exchange.key_id else None,
            "upstream_failure": kind,
            "outcome": _short(exchange.outcome, 20),
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
        registry.register(_Without(collector, _DASHBOARD_PREFIX))
        registry.register(_WorkerProcesses(self.multiproc_dir))
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


# --- the dashboard's summary ----------------------------------------------------------------


def _entry() -> dict[str, Any]:
    return {
        "requests": 0,
        "errors": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": 0.0,
    }


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``(le, count)`` buckets."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def summarize(
    families: Iterable[Metric], now: float, errors: list[dict[str, Any]], workers: int
) -> dict[str, Any]:
    totals = {
        "requests": 0,
        "errors_4xx": 0,
        "errors_5xx": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": 0.0,
        "ratelimited": 0,
        "inflight": 0,
    }
    models: dict[str, dict[str, Any]] = {}
    users: dict[str, dict[str, Any]] = {}
    keys: dict[str, dict[str, Any]] = {}
    routes: dict[str, int] = {}
    buckets: dict[float, float] = {}
    latency = {"count": 0.0, "sum": 0.0}
    cache = dict.fromkeys(CACHE_RESULTS, 0)
    upstream_errors = dict.fromkeys(UPSTREAM_FAILURES, 0)

    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "mpcapi_requests_total":
                route, status = labels["route"], int(labels["status"])
                if not is_api_traffic(route):
                    continue
                routes[route] = routes.get(route, 0) + int(value)
                totals["requests"] += int(value)
                model = models.setdefault(labels["model"] or "(none)", _entry())
                model["requests"] += int(value)
                if status >= 400:
                    model["errors"] += int(value)
                    totals["errors_4xx" if status < 500 else "errors_5xx"] += int(value)
            elif name == "mpcapi_tokens_total":
                model = models.setdefault(labels["model"] or "(none)", _entry())
                model[labels["type"] + "_tokens"] += int(value)
                totals[labels["type"] + "_tokens"] += int(value)
            elif name == "mpcapi_cost_usd_total":
                models.setdefault(labels["model"] or "(none)", _entry())["cost_usd"] += value
                totals["cost_usd"] += value
            elif name.startswith("mpcapi_request_duration_seconds") and is_api_traffic(
                labels["route"]
            ):
                if name.endswith("_bucket"):
                    bound = float(labels["le"])
                    buckets[bound] = buckets.get(bound, 0) + value
                elif name.endswith("_count"):
                    latency["count"] += value
                elif name.endswith("_sum"):
                    latency["sum"] += value
            elif name == "mpcapi_inflight_requests":
                totals["inflight"] += int(value)
            elif name == "mpcapi_ratelimited_total":
                totals["ratelimited"] += int(value)
            elif name == "mpcapi_cache_requests_total":
                cache[labels["result"]] = cache.get(labels["result"], 0) + int(value)
            elif name == "mpcapi_upstream_errors_total":
                upstream_errors[labels["kind"]] = upstream_errors.get(labels["kind"], 0) + int(
                    value
                )
            elif name == _DASHBOARD_PREFIX + "user_requests_total":
                users.setdefault(labels["user"], _entry())["requests"] += int(value)
            elif name == _DASHBOARD_PREFIX + "user_tokens_total":
                users.setdefault(labels["user"], _entry())[labels["type"] + "_tokens"] += int(value)
            elif name == _DASHBOARD_PREFIX + "user_cost_usd_total":
                users.setdefault(labels["user"], _entry())["cost_usd"] += value
            elif name == _DASHBOARD_PREFIX + "key_requests_total":
                key = keys.setdefault(labels["key_id"], {"tokens": 0, "cost_usd": 0.0})
                key["requests"] = key.get("requests", 0) + int(value)
                key["user"] = labels["user"]
            elif name == _DASHBOARD_PREFIX + "key_tokens_total":
                keys.setdefault(labels["key_id"], {"tokens": 0, "cost_usd": 0.0})["tokens"] += int(
                    value
                )
            elif name == _DASHBOARD_PREFIX + "key_cost_usd_total":
                keys.setdefault(labels["key_id"], {"tokens": 0, "cost_usd": 0.0})["cost_usd"] += (
                    value
                )

    cumulative = sorted(buckets.items())
    p50, p95 = quantile(cumulative, 0.5), quantile(cumulative, 0.95)
    top_keys = sorted(
        ({"key_id": key_id, "requests": 0, **values} for key_id, values in keys.items()),
        key=lambda entry: (-entry["requests"], entry["key_id"]),
    )[:TOP_KEYS]
    return {
        "now": now,
        "workers": workers,
        "totals": totals,
        "routes": routes,
        "latency": {
            "count": int(latency["count"]),
            "sum_seconds": latency["sum"],
            "p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "p95_ms": None if p95 is None else round(p95 * 1000, 2),
            "buckets": [
                [bound if bound != float("inf") else "+Inf", count] for bound, count in cumulative
            ],
        },
        "models": models,
        "users": users,
        "top_keys": top_keys,
        "cache": cache,
        "upstream_errors": upstream_errors,
        "errors": errors,
    }
