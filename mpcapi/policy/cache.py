"""The response cache: exact-match answers of chat, completions and embeddings.

A successful (200) non-streamed answer is kept for ``cache_ttl`` seconds under a hash of
the route, the request body in canonical form (``json.dumps(sort_keys=True)``, so key order
and whitespace do not matter; ``stream`` and ``stream_options`` are left out) and the
scope: the key owner (or the client address when auth is off), or everyone with
``cache_scope = global``. When the client's own ``Authorization`` is what LiteLLM checks
(no ``LITELLM_API_KEY``), a hash of it is part of the scope too, so nobody is answered
from the cache with a key LiteLLM would refuse.

Every cacheable response says ``x-mpcapi-cache: hit|miss|bypass``. ``Cache-Control:
no-cache`` skips the lookup (the answer may still be stored); ``no-store`` keeps the
answer out. A ``"stream": true`` request whose answer is cached gets it replayed as a
valid SSE stream; streamed HTTP answers themselves are not stored. HTTP routes and
WebSocket messages (whose requests are all streamed) take the same step, ``lookup``; the
WebSocket stores its complete streams (``answer_of_chunks``).

Backends: ``MemoryStore`` (a least-recently-used dict bounded in bytes) and ``RedisStore``
(shared by instances; ``SET … EX``; ``mpcapi.policy.cacheindex`` tells it which lookups need not ask
Redis). A Redis error is a miss, never a failed request.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Generic, Protocol, TypeVar

import attrs
import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpcapi.config.settings import Settings
from mpcapi.exchange import Exchange
from mpcapi.openai.routes import CACHEABLE_PATHS
from mpcapi.policy.cacheindex import BYTES_PER_KEY, KeyIndex, announcement, channel_of
from mpcapi.storage.redis import RedisClient, RedisUnavailableError

log = Logger(namespace="mpcapi.cache")

CACHE_HEADER = b"x-mpcapi-cache"
# Request fields that change how an answer is delivered, not what it says.
DELIVERY_FIELDS = ("stream", "stream_options")
OUTCOMES = ("hit", "miss", "bypass")


_Item = TypeVar("_Item")
_Answer = TypeVar("_Answer")
_Result = TypeVar("_Result")


class Store(Protocol):
    """Where answers are kept. Deferreds, not coroutines: storing in memory, on every miss,
    then costs no coroutine and no Deferred wrapped around it."""

    def get(self, key: str) -> Deferred[bytes | None]: ...

    def set(self, key: str, value: bytes, ttl: int) -> Deferred[None]: ...


class MemoryStore:
    """An LRU of answers bounded by ``max_bytes`` (keys and bodies), each with a TTL."""

    def __init__(self, clock: IReactorTime, max_bytes: int) -> None:
        self._clock = clock
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Deferred[bytes | None]:
        return succeed(self._get(key))

    def set(self, key: str, value: bytes, ttl: int) -> Deferred[None]:
        self._set(key, value, ttl)
        return succeed(None)

    def _get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self._clock.seconds():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    def _set(self, key: str, value: bytes, ttl: int) -> None:
        cost = len(key) + len(value)
        if cost > self.max_bytes:
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = (value, self._clock.seconds() + ttl)
        self.size += cost
        while self.size > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def _remove(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self.size -= len(key) + len(value)


STORE_DELAY = 0.02  # seconds an answer waits to go to Redis with others (see RedisStore)

# Stores a batch of answers: KEYS are the keys, ARGV the values and their TTLs, in pairs,
# then the channel and the announcement of the batch (see mpcapi.policy.cacheindex). Announced
# first: should a SET fail (out of memory), an answer announced but not stored costs a
# lookup, whereas one stored but not announced would never be found by a complete index.
_SET_ALL = """
redis.call('PUBLISH', ARGV[#ARGV - 1], ARGV[#ARGV])
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[2 * i - 1], 'EX', ARGV[2 * i])
end
"""


class RedisStore:
    """Answers in Redis, shared by every instance that uses it; Redis expires them.

    One lookup is in flight at a time; those that arrive meanwhile go out together when it
    returns, as one MGET. Stores wait ``STORE_DELAY`` seconds and go out together as one
    script of SETs: every instance, this one too, finds an answer that much after it came.
    Alone, a lookup waits for nothing; under load the reactor pays for one command per
    batch instead of one per request (txredisapi spends tens of microseconds of CPU on
    each), and even a lone client costs one store script per ``STORE_DELAY``, not one per
    answer. Each store script announces its keys; with an ``index`` listening, a lookup of
    a key that nobody stored is a miss without asking Redis."""

    def __init__(
        self, redis: RedisClient, clock: IReactorTime, index: KeyIndex | None = None
    ) -> None:
        self._redis = redis
        self.index = index  # what Redis holds, when an index listens (see cacheindex)
        self._lookups = _Batches(self._get_all)
        self._stores = _Batches(self._set_all, clock, STORE_DELAY)

    def get(self, key: str) -> Deferred[bytes | None]:
        if self.index is not None:
            self.index.start()
            if not self.index.may_hold(key):
                return succeed(None)
        return self._lookups.add(key)

    def set(self, key: str, value: bytes, ttl: int) -> Deferred[None]:
        return self._stores.add((key, value, ttl))

    async def _get_all(self, keys: list[str]) -> list[bytes | None]:
        return await self._redis.mget([self._redis.key("cache", key) for key in keys])

    async def _set_all(self, entries: list[tuple[str, bytes, int]]) -> list[None]:
        keys = [self._redis.key("cache", key) for key, _, _ in entries]
        values: list[Any] = []
        for _, value, ttl in entries:
            values += [value, ttl]
        values += [channel_of(self._redis), announcement((key, ttl) for key, _, ttl in entries)]
        await self._redis.eval(_SET_ALL, keys, values)
        return [None] * len(entries)


class _Batches(Generic[_Item, _Result]):
    """Runs ``send`` on one batch of items at a time; each item's Deferred gets its result."""

    def __init__(
        self,
        send: Callable[[list[_Item]], Awaitable[list[_Result]]],
        clock: IReactorTime | None = None,
        delay: float = 0.0,
    ) -> None:
        self._send = send
        self._clock = clock
        self._delay = delay  # seconds the first item of a batch waits for others (clock's)
        self._timer: IDelayedCall | None = None
        self._waiting: list[tuple[_Item, Deferred[_Result]]] = []
        self._in_flight = False

    def add(self, item: _Item) -> Deferred[_Result]:
        result: Deferred[_Result] = Deferred()
        self._waiting.append((item, result))
        if not self._in_flight and self._timer is None:
            if self._clock is not None and self._delay > 0:
                self._timer = self._clock.callLater(self._delay, self._start)
            else:
                Deferred.fromCoroutine(self._next())
        return result

    def _start(self) -> None:
        self._timer = None
        if not self._in_flight:
            Deferred.fromCoroutine(self._next())

    async def _next(self) -> None:
        self._in_flight = True
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                results = await self._send([item for item, _ in batch])
            except Exception:
                failure = Failure()
                for _, waiting in batch:
                    waiting.errback(failure)
            else:
                for (_, waiting), result in zip(batch, results, strict=True):
                    waiting.callback(result)
        self._in_flight = False


@attrs.frozen
class Lookup(Generic[_Answer]):
    """What the cache said of one call."""

    answer: _Answer | None  # a hit: the stored answer, as the caller sends it
    store_key: str | None  # where the call's answer is kept once complete; None: not kept


def canonical_body(document: dict[str, Any]) -> str:
    """The request as the cache sees it: sorted keys, no whitespace, no delivery fields."""
    content = {k: v for k, v in document.items() if k not in DELIVERY_FIELDS}
    try:  # orjson: this runs for every cacheable request
        return orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode("utf-8")
    except (TypeError, orjson.JSONEncodeError):  # e.g. an integer past 64 bits
        return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(scope: str, route: str, document: dict[str, Any]) -> str:
    text = f"{scope}\n{route}\n{canonical_body(document)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_directives(values: Sequence[bytes]) -> set[str]:
    """The directive names of ``Cache-Control`` header values (``no-cache``, ``no-store``)."""
    return {
        part.strip().split(b"=", 1)[0].lower().decode("latin-1")
        for value in values
        for part in value.split(b",")
        if part.strip()
    }


class ResponseCache:
    """``lookup`` before forwarding, ``keep`` after a 200; off when ``ttl`` is 0."""

    @classmethod
    def from_settings(
        cls, settings: Settings, clock: IReactorTime, redis: RedisClient | None
    ) -> ResponseCache:
        store: Store
        if redis is not None:
            # The index's memory is bounded by the same setting as the memory store's.
            max_keys = settings.cache_max_bytes // BYTES_PER_KEY
            index = KeyIndex(redis, clock, max_keys, rebuild_after=max(settings.cache_ttl, 60))
            store = RedisStore(redis, clock, index)
        else:
            store = MemoryStore(clock, settings.cache_max_bytes)
        return cls(store, settings.cache_ttl, settings.cache_scope, bool(settings.litellm_api_key))

    def __init__(self, store: Store, ttl: int, scope: str, our_key: bool) -> None:
        self.store = store
        self.ttl = ttl
        self.scope = scope
        self._our_key = our_key  # False: the client's Authorization reaches LiteLLM
        self.hits = self.misses = self.bypasses = 0  # for metrics

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def scope_for(
        self,
        user: str | None,
        key_id: str | None,
        client: str | None,
        authorization: str | bytes | None,
    ) -> str:
        """Whose answers a request may get: its key owner's, or its client address's
        (auth off); with the client's ``Authorization`` header when that is what LiteLLM
        checks."""
        if self.scope == "global":
            scope = "global"
        elif user:
            scope = "user:" + user
        elif key_id:
            scope = "key:" + key_id
        else:
            scope = "addr:" + (client or "unknown")
        if not self._our_key:
            authorization = authorization or b""
            raw = (
                authorization.encode("latin-1") if isinstance(authorization, str) else authorization
            )
            scope += ":auth:" + hashlib.sha256(raw).hexdigest()[:32]
        return scope

    async def lookup(
        self,
        exchange: Exchange,
        document: dict[str, Any],
        directives: Collection[str],
        authorization: str | bytes | None,
        replay: Callable[[bytes], _Answer | None],
    ) -> Lookup[_Answer] | None:
        """The cache step of one call of ``exchange.route`` with the body ``document``:
        None when the cache is off or the route not cacheable. Otherwise the answer on a hit
        (a stored answer turned by ``replay`` into what the caller sends; None from it: a
        miss) and where to keep this call's answer. The outcome (hit, miss, bypass) goes on
        the exchange and into the counts. ``directives`` are ``Cache-Control``'s."""
        route = exchange.route
        if not self.enabled or route not in CACHEABLE_PATHS:
            return None
        scope = self.scope_for(exchange.user, exchange.key_id, exchange.client, authorization)
        key = cache_key(scope, route, document)
        store_key = None if "no-store" in directives else key
        if "no-cache" in directives:
            self._settle(exchange, "bypass")
            return Lookup(None, store_key)
        cached = await self.fetch(key)
        answer = replay(cached) if cached is not None else None
        if answer is not None:
            self._settle(exchange, "hit")
            return Lookup(answer, None)
        self._settle(exchange, "miss")
        return Lookup(None, store_key)

    async def fetch(self, key: str) -> bytes | None:
        """The answer stored under ``key``; a store that fails is a miss."""
        try:
            return await self.store.get(key)
        except RedisUnavailableError:
            return None
        except Exception:
            log.failure("cache lookup failed")
            return None

    def keep(self, key: str, answer: bytes) -> None:
        """Store ``answer`` under ``key``, in the background (Redis); a store that fails is
        logged (a Redis outage is logged once, by the client)."""
        self.store.set(key, answer, self.ttl).addErrback(_store_failed)

    def _settle(self, exchange: Exchange, outcome: str) -> None:
        exchange.cache = outcome
        self.count(outcome)

    def count(self, outcome: str) -> None:
        """Count a lookup's outcome (hit, miss or bypass) for the metrics."""
        if outcome == "hit":
            self.hits += 1
        elif outcome == "miss":
            self.misses += 1
        else:
            self.bypasses += 1


def _store_failed(failure: Failure) -> None:
    if not failure.check(RedisUnavailableError):
        log.failure("cache store failed", failure)
