"""The Redis connection shared by the rate limiter and the response cache.

``txredisapi`` does the protocol, the pooling and the reconnecting (with backoff, in the
background). This wrapper adds what the policies need on top of it:

- a lazy start: nothing connects until the first command;
- a time limit on every command (the reactor is never blocked and a request never waits
  for Redis longer than ``command_timeout``);
- fail-fast while Redis is known to be down, so an outage costs no latency;
- one log line when an outage begins and one when Redis is back, and counters
  (``errors``, ``outages``, ``available``) that metrics can read;
- subscriptions (``subscribe``), each on a connection of its own, kept up until ``close``.

Every failure is raised as ``RedisUnavailableError``; callers fail open.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import attrs
from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogPublisher

from mpcapi.config.settings import Settings
from mpcapi.internals import redis_pool_size

log = Logger(namespace="mpcapi.redis")

DEFAULT_PREFIX = "mpcapi:"
CONNECT_TIMEOUT = 1.0
COMMAND_TIMEOUT = 0.5
# Longest wait between two reconnection attempts during an outage.
MAX_RECONNECT_DELAY = 2.0


class RedisUnavailableError(Exception):
    """Redis did not answer (down, unreachable, too slow, or refused the command)."""


@attrs.frozen
class RedisAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # unix socket
    db: int | None = None
    password: str | None = None
    username: str | None = None


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]`` or ``unix:///path[?db=N]``."""
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    if parts.scheme == "unix":
        query = dict(pair.split("=", 1) for pair in parts.query.split("&") if "=" in pair)
        db = int(query["db"]) if "db" in query else None
        return RedisAddress(path=parts.path, db=db, password=password, username=username)
    db_text = parts.path.strip("/")
    return RedisAddress(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=int(db_text) if db_text else None,
        password=password,
        username=username or None,
    )


def _connect(address: RedisAddress, connect_timeout: float, command_timeout: float) -> Any:
    """A lazy txredisapi pool: it returns at once and connects in the background."""
    import txredisapi  # type: ignore[import-untyped]

    common: dict[str, Any] = {
        "dbid": address.db,
        "poolsize": 2,
        "reconnect": True,
        "charset": None,  # values are bytes
        "password": address.password,
        "connectTimeout": connect_timeout,
        "replyTimeout": command_timeout,
        "convertNumbers": False,
    }
    if address.username:
        common["username"] = address.username
    if address.path is not None:
        handler = txredisapi.lazyUnixConnectionPool(address.path, **common)
    else:
        handler = txredisapi.lazyConnectionPool(host=address.host, port=address.port, **common)
    factory = getattr(handler, "_factory", None)
    if factory is not None:
        factory.maxDelay = MAX_RECONNECT_DELAY  # recover soon after an outage
        for slot in getattr(factory, "slots", ()):
            _quiet_reconnects(getattr(slot, "service", None))
    return handler


def _quiet_reconnects(service: Any) -> None:
    """Silence the "Scheduling retry" line Twisted's ClientService logs for every attempt of
    a connection: an outage is logged once, by ``RedisClient``. Best effort (it reaches
    into the state machine); without it the daemon is only noisier."""
    silent = Logger(namespace=log.namespace, observer=LogPublisher())  # no one listens
    core = getattr(getattr(service, "_machine", None), "__automat_core__", None)
    if core is not None and hasattr(core, "log"):
        core.log = silent


class SubscriptionListener(Protocol):
    """What a subscription tells: between ``subscribed`` and ``unsubscribed`` every message
    published on the channel arrives; outside, messages may be missed."""

    def subscribed(self) -> None: ...

    def message(self, payload: bytes) -> None: ...

    def unsubscribed(self) -> None: ...


def _subscribe(address: RedisAddress, channel: str, listener: SubscriptionListener) -> IService:
    """A started ClientService holding one subscribed connection, reconnecting with backoff."""
    from twisted.application.internet import ClientService, backoffPolicy
    from twisted.internet import reactor
    from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint

    endpoint: Any
    if address.path is not None:
        endpoint = UNIXClientEndpoint(reactor, address.path, timeout=CONNECT_TIMEOUT)
    else:
        endpoint = HostnameEndpoint(reactor, address.host, address.port, CONNECT_TIMEOUT)
    factory = _SubscriberFactory(address, channel, listener)
    service = ClientService(endpoint, factory, backoffPolicy(maxDelay=MAX_RECONNECT_DELAY))
    _quiet_reconnects(service)
    service.startService()
    return service


class _SubscriberFactory(Factory):
    noisy = False  # no "Starting factory" line at every reconnection

    # What txredisapi's protocol asks of its factory when AUTH fails: it then drops the
    # connection, and ClientService tries again later; not lazy: no log line at each try
    # (the command connections report the outage, once).
    isLazy = False

    def __init__(self, address: RedisAddress, channel: str, listener: SubscriptionListener) -> None:
        self.address, self.channel, self.listener = address, channel, listener

    def buildProtocol(self, addr: Any) -> Any:
        protocol = _subscriber_protocol()(
            charset=None,
            password=self.address.password,
            username=self.address.username,
            convertNumbers=False,
        )
        protocol.factory = self
        return protocol

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        pass


@functools.cache
def _subscriber_protocol() -> type:
    """txredisapi's subscriber, telling a listener (txredisapi is imported on first use)."""
    import txredisapi

    class Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        factory: _SubscriberFactory

        def connectionMade(self) -> Any:
            made = super().connectionMade()  # AUTH first, when there is a password
            ready = self.whenConnected().addCallback(lambda _: self.subscribe(self.factory.channel))
            ready.addCallbacks(self._subscribed, lambda _: self.transport.loseConnection())
            return made

        def _subscribed(self, _: object) -> None:
            self.factory.listener.subscribed()

        def messageReceived(self, pattern: Any, channel: Any, message: bytes) -> None:
            self.factory.listener.message(message)

        def connectionLost(self, why: Any) -> None:
            super().connectionLost(why)
            self.factory.listener.unsubscribed()

    return Subscriber


class RedisClient:
    """Commands with a time limit, fail-fast during outages, and outage accounting."""

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = CONNECT_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
        connect: Callable[[RedisAddress, float, float], Any] = _connect,
        subscribe: Callable[[RedisAddress, str, SubscriptionListener], IService] = _subscribe,
        report_failure: Callable[[bool], None] = lambda began_outage: None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self._address = parse_redis_url(url)
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._connect = connect
        self._subscribe = subscribe
        self._subscriptions: list[IService] = []
        self._handler: Any = None
        self._connected_once = False
        # Commands that failed (each one served without Redis), outages begun; and whom to
        # tell of each failure (the metrics), with whether it began an outage.
        self.errors = 0
        self.outages = 0
        self.available = True
        self._report_failure = report_failure

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        clock: IReactorTime,
        report_failure: Callable[[bool], None] = lambda began_outage: None,
    ) -> RedisClient | None:
        """The shared client when ``redis_url`` is set (nothing connects yet), else None."""
        if not settings.redis_url:
            return None
        return cls(
            settings.redis_url, clock, prefix=settings.redis_prefix, report_failure=report_failure
        )

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._call("eval", script, list(keys), list(args))

    async def get(self, key: str) -> bytes | None:
        return _bytes(await self._call("get", key))

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return [_bytes(value) for value in await self._call("mget", list(keys))]

    async def set(self, key: str, value: bytes, expire: int) -> None:
        await self._call("set", key, value, expire=expire)

    def subscribe(self, channel: str, listener: SubscriptionListener) -> None:
        """Tell ``listener`` the messages published on ``channel`` (a name of its own: the
        prefix is not added), over a connection of its own that reconnects until ``close``."""
        self._subscriptions.append(self._subscribe(self._address, channel, listener))

    async def close(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            await subscription.stopService()
        handler, self._handler = self._handler, None
        if handler is not None:
            with contextlib.suppress(Exception):
                await handler.disconnect()

    async def _call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        if self._handler is None:
            self._handler = self._connect(
                self._address, self._connect_timeout, self._command_timeout
            )
        elif (self._connected_once or not self.available) and not self._has_connection():
            # Every connection is down: fail at once (no request waits for Redis); the pool
            # keeps reconnecting in the background, and the first command after that finds
            # Redis back.
            self._failed(RedisUnavailableError("no connection"))
            raise RedisUnavailableError("Redis is unavailable")
        try:
            pending: Deferred[Any] = getattr(self._handler, command)(*args, **kwargs)
            timeout = self._connect_timeout + self._command_timeout
            result = await pending.addTimeout(timeout, self._clock)
        except Exception as error:
            self._failed(error)
            raise RedisUnavailableError(f"Redis {command} failed: {_describe(error)}") from None
        self._connected_once = True
        if not self.available:
            self.available = True
            log.info("Redis at {url} is available again", url=self._masked_url())
        return result

    def _has_connection(self) -> bool:
        return bool(redis_pool_size(self._handler))

    def _failed(self, error: Exception) -> None:
        self.errors += 1
        began_outage = self.available
        if began_outage:
            self.available = False
            self.outages += 1
            log.warn(
                "Redis at {url} is unavailable ({error}); serving without it until it is back",
                url=self._masked_url(),
                error=_describe(error),
            )
        self._report_failure(began_outage)

    def _masked_url(self) -> str:
        address = self._address
        if address.path is not None:
            return f"unix://{address.path}"
        return f"redis://{address.host}:{address.port}/{address.db or 0}"


def _bytes(value: Any) -> bytes | None:
    return value if isinstance(value, bytes) or value is None else str(value).encode()


def _describe(error: Exception) -> str:
    if isinstance(error, defer.TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__
