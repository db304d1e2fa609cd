"""The composition root: every long-lived object of one process, constructed and wired here.

``build_gateway`` makes the request side (the LiteLLM client, policy, ledger, metrics, the
forwarding pipeline and the Klein app) from settings, a reactor, a clock and an HTTP
client; the tests call it with ``StubTreq`` and ``task.Clock``. ``build_service`` adds what
a running daemon needs (the connection pool, the listening port, the health probe, reload,
drain) as a twistd service tree; ``build_supervisor`` runs several of those as workers.
Every object gets its collaborators when it is made; none is assigned one afterwards. What a
reload changes reaches the parts through ``LiveSettings`` (see ``mpcapi.config.live``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mpcapi.config.live import LiveSettings
from mpcapi.config.settings import Settings
from mpcapi.exchange import ExchangeObserver
from mpcapi.http.adminapi import AdminApi
from mpcapi.http.app import Gateway
from mpcapi.http.forwarding import Forwarding
from mpcapi.http.site import ConnectionCap, GatewaySite
from mpcapi.ledger.ledger import UsageLedger, open_ledger
from mpcapi.metrics.metrics import Metrics
from mpcapi.metrics.multiprocess import MULTIPROC_ENV
from mpcapi.openai.validation import RequestValidator
from mpcapi.policy.admission import Admission
from mpcapi.policy.cache import ResponseCache
from mpcapi.policy.keys import KeyAuthenticator, open_authenticator
from mpcapi.policy.limits import RateLimiter
from mpcapi.policy.ownership import Ownership
from mpcapi.runtime.lifecycle import Drain
from mpcapi.runtime.reload import Loader, Reloader, ReloadOnSighup
from mpcapi.runtime.service import GatewayService
from mpcapi.runtime.workers import AdoptedPort, WorkerPool, listening_socket, worker_argv
from mpcapi.storage.database import Database
from mpcapi.storage.redis import RedisClient
from mpcapi.upstream.balancer import HealthProbe, split_urls
from mpcapi.upstream.client import LiteLLMClient
from mpcapi.upstream.http import make_http_client, make_pool

if TYPE_CHECKING:
    from mpcapi.tracing.export import Tracing
    from mpcapi.websocket.endpoint import WebSocketEndpoint

log = Logger(namespace="mpcapi")


@attrs.frozen
class GatewayParts:
    """The request side of one process, as ``build_gateway`` made it."""

    live: LiveSettings
    upstream: LiteLLMClient
    metrics: Metrics
    redis: RedisClient | None
    limiter: RateLimiter
    cache: ResponseCache
    keys: KeyAuthenticator | None
    ledger: UsageLedger | None
    admission: Admission
    forwarding: Forwarding
    gateway: Gateway
    tracing: Tracing | None = None  # OpenTelemetry export, when an endpoint is configured


def build_gateway(
    settings: Settings,
    reactor: Any,
    clock: IReactorTime,
    http: Any,
    *,
    worker: str | None = None,
    metrics_dir: str | None = None,
    open_connections: dict[Any, int] | None = None,
    keys: KeyAuthenticator | None = None,
    ledger: UsageLedger | None = None,
    tracing: Tracing | None = None,
    observers: Sequence[ExchangeObserver] = (),
) -> GatewayParts:
    """The request side: ``http`` is the client the LiteLLM calls go through (treq over our
    pool in the daemon, ``StubTreq`` in tests); ``reactor`` runs the databases' threads;
    ``open_connections`` (filled by the site's connection cap) lets the ledger's last flush
    wait for the requests in flight. ``keys`` and ``ledger``, when given, replace the ones
    the settings would open (tests give their own), and so does ``tracing``; ``observers``
    hear of every finished HTTP exchange after the built-in ones (metrics, token counts, the
    ledger)."""
    live = LiveSettings(settings)
    upstream = LiteLLMClient(live, http, clock)
    metrics = Metrics(clock, multiproc_dir=metrics_dir)
    # Rate limits and the response cache, in Redis when redis_url is set (see limits, cache).
    redis = RedisClient.from_settings(settings, clock, report_failure=metrics.redis_failed)
    limiter = RateLimiter.from_settings(settings, clock, redis)
    cache = ResponseCache.from_settings(settings, clock, redis)
    if keys is None and settings.auth == "keys":
        keys = open_authenticator(settings, reactor, clock)
    if ledger is None and settings.usage_ledger:
        # The usage ledger shares the client keys' database when there is one.
        ledger = open_ledger(
            settings,
            reactor,
            keys.database if keys else None,
            worker,
            idle=(lambda: not open_connections) if open_connections is not None else None,
            report_queue=metrics.usage_queue.set,
            report_refused=metrics.usage_refused.inc,
            clock=clock,
        )
    admission = Admission(limiter, keys, ledger)
    validator = RequestValidator()
    # With client keys, who made each stored object (responses, files, batches) is kept in
    # their database: LiteLLM sees one key for every client and cannot tell them apart.
    database = keys.database if keys is not None else None
    ownership = Ownership(database) if database is not None else None
    forwarding = Forwarding(
        live, upstream, clock, admission, cache, validator, ledger, settings.log_bodies, ownership
    )
    every: list[ExchangeObserver] = [limiter.count_tokens, metrics.observe]
    # WebSocket messages count their tokens, have their rows and are counted in /metrics
    # (method "WS"), as HTTP requests are.
    message_observers: list[ExchangeObserver] = [limiter.count_tokens, metrics.observe]
    if ledger is not None:
        every.append(ledger.observe)
        message_observers.insert(0, ledger.observe)
    if tracing is None and settings.otel_endpoint:
        # OpenTelemetry on first use: the SDK would cost every worker memory it does not need.
        from mpcapi.tracing.export import open_tracing

        tracing = open_tracing(
            settings,
            report_dropped=metrics.spans_dropped.inc,
            call_from_thread=reactor.callFromThread,
            run_blocking=lambda f: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f),
        )
    if tracing is not None:
        every.append(tracing.observe)
        message_observers.append(tracing.observe)
    every.extend(observers)

    def websockets() -> WebSocketEndpoint:
        from mpcapi.websocket.endpoint import WebSocketEndpoint  # autobahn: on first use

        return WebSocketEndpoint(
            live,
            upstream,
            clock,
            validator,
            admission,
            cache,
            message_observers,
            counts_usage=ledger is not None,
            traced=tracing is not None,
            ownership=ownership,
        )

    admin_api = AdminApi(
        live,
        clock,
        _database_opener(settings, reactor, keys, ledger),
        keys,
        ledger,
    )
    gateway = Gateway(
        live,
        clock,
        upstream,
        forwarding,
        metrics,
        every,
        ledger,
        websockets,
        trace_of=tracing.context_of if tracing is not None else None,
        admin_api=admin_api,
    )
    # What a reload changes beyond the values these parts read from `live` when they need them.
    live.subscribe(lambda new: upstream.balancer.replace(split_urls(new.litellm_base_url)))
    live.subscribe(lambda new: limiter.use_defaults(new.default_rpm, new.default_tpm))
    if keys is not None:
        live.subscribe(lambda new: keys.forget())  # revoked keys, new limits: read them now
    return GatewayParts(
        live,
        upstream,
        metrics,
        redis,
        limiter,
        cache,
        keys,
        ledger,
        admission,
        forwarding,
        gateway,
        tracing,
    )


def _database_opener(
    settings: Settings, reactor: Any, keys: KeyAuthenticator | None, ledger: UsageLedger | None
) -> Callable[[], Database]:
    """The admin API's database: the client keys' (which the ledger shares), else one of
    its own, opened when first asked for."""
    if keys is not None:
        return lambda: keys.database
    if ledger is not None:
        return lambda: ledger.database
    return lambda: Database(settings.database_url, reactor)


class _Closing(Service):
    """Runs ``close`` when the daemon stops (the LiteLLM pool, the Redis connections)."""

    def __init__(self, close: Callable[[], Any]) -> None:
        self._close = close

    def stopService(self) -> Any:
        super().stopService()
        return self._close()


def _closing_redis(redis: RedisClient | None) -> Callable[[], Any]:
    def close() -> Any:
        return Deferred.fromCoroutine(redis.close()) if redis is not None else None

    return close


def build_service(
    settings: Settings,
    reactor: Any,
    worker: str | None = None,
    inherited_fd: int | None = None,
    load: Loader | None = None,
) -> MultiService:
    """The daemon's service tree for one process; with ``load`` (the start-up loader),
    SIGHUP reloads the configuration (see mpcapi.runtime.reload)."""
    service = GatewayService(settings, reactor, worker)
    pool = make_pool(reactor, settings)
    open_connections: dict[Any, int] = {}
    parts = build_gateway(
        settings,
        reactor,
        reactor,
        make_http_client(reactor, pool, settings),
        worker=worker,
        # Workers get a multiprocess metrics directory from their supervisor.
        metrics_dir=os.environ.get(MULTIPROC_ENV) or None,
        open_connections=open_connections,
    )
    upstream = parts.upstream
    # With several LiteLLM instances, the ones that fail their probe get no requests.
    probe = HealthProbe(
        upstream.balancer, upstream.probe_all, reactor, settings.upstream_probe_seconds
    )
    parts.live.subscribe(lambda new: probe.set_interval(new.upstream_probe_seconds))
    probe.setServiceParent(service)
    site = GatewaySite(
        parts.gateway.resource(),
        settings.max_body_bytes,
        settings.read_timeout,
        settings.error_format,
        timeout=settings.idle_timeout,
        reactor=reactor,
    )
    connections = ConnectionCap(site, settings.max_connections, open_connections)
    if parts.ledger is not None:
        parts.ledger.setServiceParent(service)
    if parts.tracing is not None:
        parts.tracing.setServiceParent(service)
    listening: Service
    if inherited_fd is None:
        listening = strports.service(settings.listen_endpoint, connections, reactor=reactor)
    else:
        listening = AdoptedPort(reactor, inherited_fd, connections)
    listening.setServiceParent(service)
    if load is not None:
        reloader = Reloader(
            load=load,
            run_blocking=lambda f: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f),
            live=parts.live,
            logs_of=lambda: service.logs,
        )
        ReloadOnSighup(reactor, reloader.reload).setServiceParent(service)
    Drain(reactor, connections, settings.drain_seconds).setServiceParent(service)
    _Closing(pool.closeCachedConnections).setServiceParent(service)
    _Closing(_closing_redis(parts.redis)).setServiceParent(service)
    return service


def build_supervisor(settings: Settings, reactor: Any, options: Sequence[str]) -> MultiService:
    """Bind the port once and run ``settings.workers`` workers on it; ``options`` are the
    command-line options that were given, passed on to every worker."""
    service = GatewayService(settings, reactor, worker="supervisor")
    sock = listening_socket(settings.host, settings.port)  # checked at start (mpcapi.tap)
    grace = settings.drain_seconds + 5  # the workers' drain, then they are killed
    WorkerPool(reactor, sock, settings.workers, worker_argv(options), grace).setServiceParent(
        service
    )
    log.info("MPC-API configuration: {settings}", settings=settings.masked())
    return service


__all__ = ["GatewayParts", "build_gateway", "build_service", "build_supervisor"]
