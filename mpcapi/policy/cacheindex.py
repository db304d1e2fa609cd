"""Which answers the Redis cache holds, known in each instance: a lookup of an answer nobody
stored is a miss without a round trip to Redis.

Every instance's store script publishes the keys it sets, with their TTLs, on one channel
(``announcement``, ``channel_of``); every instance subscribes to it. After each subscription
(the first, and every one after a lost connection) the index scans the keys Redis already
holds, with their TTLs; from the end of that scan until the connection drops it knows every
answer stored anywhere, and ``may_hold`` can say False. While it cannot (connecting,
scanning, unsubscribed, full), ``may_hold`` says True and the lookup asks Redis, as it
would without an index. An answer Redis drops early (eviction, FLUSHDB) is still asked for
until its TTL ends: a miss, the same as without an index. An answer stored elsewhere is
known here about a millisecond after it is stored (the publish's delivery); a lookup in
between misses, as one made just before the store would.

Memory: about ``BYTES_PER_KEY`` per answer. Past ``max_keys`` the index empties itself,
logs it, lets every lookup ask Redis, and rebuilds after ``rebuild_after`` seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from mpcapi.storage.redis import RedisClient, RedisUnavailableError

log = Logger(namespace="mpcapi.cache")

BYTES_PER_KEY = 160  # what one known answer costs the index (measured: about 120 bytes)
SCAN_COUNT = 1000  # keys per SCAN page
# Seconds before a scan page that failed is tried again, doubling up to SCAN_RETRY_MAX: a
# Redis that refuses the script (an ACL without SCAN, say) costs a failure a minute.
SCAN_RETRY = 1.0
SCAN_RETRY_MAX = 60.0
PURGE_INTERVAL = 1.0  # seconds between sweeps of expired answers

# One page of the scan: a cursor and, for each answer in it, its name and milliseconds left.
_SCAN_PAGE = """
local page = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local found = {}
for _, key in ipairs(page[2]) do
  local left = redis.call('PTTL', key)
  if left > 0 then
    found[#found + 1] = key
    found[#found + 1] = left
  end
end
return {page[1], found}
"""


def channel_of(redis: RedisClient) -> str:
    """The channel on which stores are announced: one per key prefix."""
    return redis.key("cache", "stored")


def announcement(entries: Iterable[tuple[str, int]]) -> bytes:
    """What a store publishes: a ``<ttl> <key>`` line per answer (keys are hex digests)."""
    return b"\n".join(b"%d %s" % (ttl, key.encode("utf-8")) for key, ttl in entries)


class KeyIndex:
    """The answers Redis holds, by key, each until its TTL ends (see the module)."""

    def __init__(
        self, redis: RedisClient, clock: IReactorTime, max_keys: int, rebuild_after: float
    ) -> None:
        self._redis = redis
        self._clock = clock
        self.max_keys = max_keys
        self.rebuild_after = rebuild_after
        self._prefix = redis.key("cache", "").encode("utf-8")  # of an answer's Redis key
        self.ready = False  # True: every stored answer is known here
        self._started = False
        self._generation = 0  # moves on at every (un)subscription: a scan of an older one stops
        self._rebuild: IDelayedCall | None = None  # while full
        # hash of an answer's key -> when it expires; expiries by whole second, for the sweep.
        self._expiries: dict[int, float] = {}
        self._by_second: dict[int, list[int]] = {}
        self._purger = LoopingCall(self._purge)
        self._purger.clock = clock

    def __len__(self) -> int:
        return len(self._expiries)

    def start(self) -> None:
        """Subscribe (once; the first lookup calls this, so nothing connects before it). The
        subscription, and with it the sweeps, end when the Redis client is closed."""
        if not self._started:
            self._started = True
            self._redis.subscribe(channel_of(self._redis), self)

    def may_hold(self, key: str) -> bool:
        """False only when Redis surely has no answer under ``key``."""
        if not self.ready:
            return True
        expiry = self._expiries.get(hash(key))
        return expiry is not None and expiry > self._clock.seconds()

    # SubscriptionListener

    def subscribed(self) -> None:
        if not self._purger.running:
            self._purger.start(PURGE_INTERVAL, now=False)
        self._build()

    def unsubscribed(self) -> None:
        self._generation += 1
        self.ready = False
        self._clear()
        if self._purger.running:
            self._purger.stop()
        if self._rebuild is not None:
            self._rebuild.cancel()
            self._rebuild = None

    def message(self, payload: bytes) -> None:
        if self._rebuild is not None:
            return  # full: forgetting everything until the rebuild
        now = self._clock.seconds()
        for line in payload.split(b"\n"):
            ttl, _, key = line.partition(b" ")
            try:
                self._add(key.decode("utf-8"), now + int(ttl))
            except ValueError:
                log.warn("cache index: ignored an announcement line {line!r}", line=line[:200])
            if self._rebuild is not None:
                return  # that one made it full

    # Building, adding, sweeping

    def _build(self) -> None:
        self._generation += 1
        self.ready = False
        self._clear()
        Deferred.fromCoroutine(self._scan(self._generation))

    async def _scan(self, generation: int) -> None:
        pattern = _glob_escaped(self._prefix) + b"*"
        cursor: Any = b"0"
        retry = SCAN_RETRY
        while True:
            try:
                cursor, found = await self._redis.eval(
                    _SCAN_PAGE, [], [cursor, pattern, SCAN_COUNT]
                )
            except RedisUnavailableError:  # logged by the client; try again later
                await deferLater(self._clock, retry, lambda: None)
                retry = min(retry * 2, SCAN_RETRY_MAX)
                if generation != self._generation:
                    return
                continue
            if generation != self._generation:
                return  # unsubscribed, resubscribed or full meanwhile
            now = self._clock.seconds()
            for name, left in zip(found[::2], found[1::2], strict=True):
                self._add(bytes(name).removeprefix(self._prefix).decode("utf-8"), now + left / 1000)
                if generation != self._generation:
                    return  # full
            if cursor in (b"0", 0, "0"):
                break
        self.ready = True

    def _add(self, key: str, expiry: float) -> None:
        hashed = hash(key)
        if len(self._expiries) >= self.max_keys and hashed not in self._expiries:
            self._overflow()
            return
        self._expiries[hashed] = expiry
        second = int(expiry) + 1
        bucket = self._by_second.get(second)
        if bucket is None:
            self._by_second[second] = [hashed]
        else:
            bucket.append(hashed)

    def _purge(self) -> None:
        now = self._clock.seconds()
        for second in [second for second in self._by_second if second <= now]:
            for hashed in self._by_second.pop(second):
                if self._expiries.get(hashed, now + 1) <= now:
                    del self._expiries[hashed]

    def _overflow(self) -> None:
        log.warn(
            "cache index: Redis holds more than {max_keys} answers (MPCAPI_CACHE_MAX_BYTES); "
            "every lookup asks Redis until a rebuild in {seconds:g} s",
            max_keys=self.max_keys,
            seconds=self.rebuild_after,
        )
        self._generation += 1
        self.ready = False
        self._clear()
        self._rebuild = self._clock.callLater(self.rebuild_after, self._rebuilt)

    def _rebuilt(self) -> None:
        self._rebuild = None
        self._build()

    def _clear(self) -> None:
        self._expiries = {}
        self._by_second = {}


def _glob_escaped(text: bytes) -> bytes:
    """``text`` matched literally by a Redis glob pattern."""
    for special in (b"\\", b"*", b"?", b"[", b"]"):
        text = text.replace(special, b"\\" + special)
    return text
