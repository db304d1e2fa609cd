"""``twistd mpcapi``: the options and the service tree, nothing else."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from mpcapi.config.settings import CONFIG_ENV, SETTINGS, ConfigError, Settings, load_settings
from mpcapi.http.app import Gateway
from mpcapi.http.site import ConnectionCap, GatewaySite
from mpcapi.ledger.ledger import PriceTable, open_ledger
from mpcapi.metrics.metrics import MULTIPROC_ENV, Metrics
from mpcapi.policy.keys import open_authenticator
from mpcapi.runtime.heap import freeze_startup_heap
from mpcapi.runtime.lifecycle import Drain
from mpcapi.runtime.logs import LogSwitch, TurnFlushedOutput, observer_for
from mpcapi.runtime.reload import Loader, Reloader, ReloadOnSighup
from mpcapi.runtime.workers import (
    WORKER_FD_ENV,
    WORKER_ID_ENV,
    AdoptedPort,
    WorkerPool,
    listening_socket,
    worker_argv,
)
from mpcapi.storage.database import DatabaseError, migrate_now
from mpcapi.upstream.balancer import HealthProbe
from mpcapi.upstream.client import LiteLLMClient, make_http_client, make_pool

log = Logger(namespace="mpcapi")


def _describe(setting: Any) -> str:
    default = "(none)" if setting.default in ("", None) else setting.default
    return f"{setting.help} [env {' or '.join(setting.env)}; default {default}]"


class Options(usage.Options):
    """Every setting is also an option; options win over every other source."""

    optParameters = [
        ["config", "c", None, f"TOML configuration file [env {CONFIG_ENV}]"],
        *[[setting.option, None, None, _describe(setting)] for setting in SETTINGS],
    ]

    def given(self) -> dict[str, Any]:
        """Option values by setting name; ``None`` where the option was not given."""
        values = {setting.name: self[setting.option] for setting in SETTINGS}
        values["config"] = self["config"]
        return values

    def as_argv(self) -> list[str]:
        """The options that were given, as command-line arguments (for worker processes)."""
        return [
            f"--{name.replace('_', '-')}={value}"
            for name, value in self.given().items()
            if value is not None
        ]


class GatewayService(MultiService):
    """The daemon's service tree; installs our log observer when the format needs one."""

    def __init__(self, settings: Settings, reactor: Any, worker: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.worker = worker
        self.logs: LogSwitch | None = None  # ours, when installed: a reload may switch it

    def setServiceParent(self, parent: Any) -> None:
        # twistd logs through the application's ILogObserver when --logger is not given;
        # without one (text, one process) twistd's own observer keeps --logfile and --syslog.
        needed = observer_for(self.settings.log_format, self.worker, sys.stdout) is not None
        if needed and isinstance(parent, Componentized):
            out = TurnFlushedOutput(sys.stdout, self.reactor)
            self.logs = LogSwitch(self.settings.log_format, self.worker, out)
            parent.setComponent(ILogObserver, self.logs)
        super().setServiceParent(parent)

    def startService(self) -> None:
        if self.worker is None:
            log.info("MPC-API configuration: {settings}", settings=self.settings.masked())
        super().startService()
        freeze_startup_heap()  # the services are built and started: what follows is requests'


class _PoolCloser(Service):
    """Closes the persistent LiteLLM connections when the daemon stops."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def stopService(self) -> Any:
        super().stopService()
        return self._pool.closeCachedConnections()


class _RedisCloser(Service):
    """Closes the Redis connections (rate limits, cache) when the daemon stops."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def stopService(self) -> Any:
        super().stopService()
        if self._gateway.redis is not None:
            return Deferred.fromCoroutine(self._gateway.redis.close())
        return None


def build_service(
    settings: Settings,
    reactor: Any,
    worker: str | None = None,
    inherited_fd: int | None = None,
    load: Loader | None = None,
) -> MultiService:
    """Wire the settings, the LiteLLM client, the app and the listening port; with ``load``
    (the start-up loader), SIGHUP reloads the configuration (see mpcapi.reload)."""
    service = GatewayService(settings, reactor, worker)
    pool = make_pool(reactor, settings)
    upstream = LiteLLMClient(
        base_url=settings.litellm_base_url,
        api_key=settings.litellm_api_key,
        http=make_http_client(reactor, pool, settings),
        clock=reactor,
        timeout=settings.litellm_timeout,
        probe_timeout=settings.ready_timeout,
    )
    # With several LiteLLM instances, the ones that fail their probe get no requests.
    probe = HealthProbe(
        upstream.balancer, upstream.probe_all, reactor, settings.upstream_probe_seconds
    )
    probe.setServiceParent(service)
    keys = open_authenticator(settings, reactor, reactor) if settings.auth == "keys" else None
    # Workers get a multiprocess metrics directory from their supervisor (see mpcapi.metrics).
    metrics = Metrics(reactor, multiproc_dir=os.environ.get(MULTIPROC_ENV) or None)
    # The usage ledger shares the client keys' database when there is one (see mpcapi.ledger).
    ledger = (
        open_ledger(settings, reactor, keys.database if keys else None, worker)
        if settings.usage_ledger
        else None
    )
    gateway = Gateway(settings, upstream, reactor, keys=keys, metrics=metrics, ledger=ledger)
    site = GatewaySite(
        gateway.resource(),
        settings.max_body_bytes,
        settings.read_timeout,
        timeout=settings.idle_timeout,
        reactor=reactor,
    )
    connections = ConnectionCap(site, settings.max_connections)
    if ledger is not None:
        ledger.idle = lambda: not connections.protocols  # its last flush waits for the drain
        ledger.setServiceParent(service)
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
            settings=settings,
            gateway=gateway,
            probe=probe,
            logs_of=lambda: service.logs,
        )
        ReloadOnSighup(reactor, reloader.reload).setServiceParent(service)
    Drain(reactor, connections, settings.drain_seconds).setServiceParent(service)
    _PoolCloser(pool).setServiceParent(service)
    _RedisCloser(gateway).setServiceParent(service)
    return service


def build_supervisor(settings: Settings, reactor: Any, options: Options) -> MultiService:
    """Bind the port once and run ``settings.workers`` workers on it."""
    service = GatewayService(settings, reactor, worker="supervisor")
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as error:
        sys.stderr.write(f"mpcapi: cannot listen on {settings.host}:{settings.port}: {error}\n")
        raise SystemExit(1) from None
    argv = worker_argv(options.as_argv())
    grace = settings.drain_seconds + 5  # the workers' drain, then they are killed
    WorkerPool(reactor, sock, settings.workers, argv, grace).setServiceParent(service)
    log.info("MPC-API configuration: {settings}", settings=settings.masked())
    return service


def read_settings(options: Options) -> Settings:
    """The configuration from every source, checked as at start; ``ConfigError`` if unusable."""
    settings = load_settings(options.given(), os.environ)
    try:
        PriceTable.load(settings.prices)
    except ValueError as error:
        raise ConfigError(f"MPCAPI_PRICES: {error}") from None
    return settings


def makeService(options: Options) -> IService:
    try:
        settings = read_settings(options)
    except ConfigError as error:
        sys.stderr.write(f"mpcapi: configuration error: {error}\n")
        raise SystemExit(2) from None
    if settings.auth == "keys":  # client keys need their table before the first request
        try:
            migrate_now(settings.database_url)
        except DatabaseError as error:
            sys.stderr.write(f"mpcapi: database error: MPCAPI_DATABASE_URL: {error}\n")
            raise SystemExit(2) from None
    from twisted.internet import reactor

    inherited_fd = os.environ.get(WORKER_FD_ENV)
    if inherited_fd is not None:
        worker = os.environ.get(WORKER_ID_ENV, "?")
        return build_service(
            settings, reactor, worker, int(inherited_fd), lambda: read_settings(options)
        )
    if settings.workers > 1:
        return build_supervisor(settings, reactor, options)
    return build_service(settings, reactor, load=lambda: read_settings(options))
