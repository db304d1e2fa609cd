"""Rate limits: requests per minute and tokens per minute, per client key (or address), and
per team for keys in a team with limits of its own (a request must pass both).

Each limited identity has two fixed one-minute windows, one for requests and one for
tokens, each starting with the first request (or token) counted in it. A request is
admitted when neither window is full; it then counts one request. Tokens are counted
after the fact, from the usage of the answers (streams included), by ``count_tokens``,
an exchange observer (see ``mpcapi.exchange``). A request that finds the tokens window full is
refused until the window ends, like OpenAI's.

Two backends: ``MemoryWindows`` (one process; the default) and ``RedisWindows`` (every
instance sharing one Redis shares the limits; each decision is one atomic Lua script).
When Redis is down, requests are served (fail open) and counted
(``mpcapi_redis_failures_total``; outages in ``mpcapi_redis_outages_total``).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mpcapi.config.settings import Settings
from mpcapi.errors import ApiError
from mpcapi.storage.redis import RedisClient, RedisUnavailableError

if TYPE_CHECKING:
    from mpcapi.exchange import Exchange
    from mpcapi.storage.keys import ClientKey

log = Logger(namespace="mpcapi.limits")

WINDOW_SECONDS = 60.0


@attrs.frozen
class Counts:
    """The state of one identity's windows after a decision."""

    allowed: bool
    requests: int  # counted in the requests window (this request included when allowed)
    requests_reset: float  # seconds until the requests window ends
    tokens: int
    tokens_reset: float


class Windows(Protocol):
    async def admit(self, identity: str, rpm: int, tpm: int) -> Counts: ...

    def add_tokens(self, identity: str, tokens: int) -> None:
        """Count tokens now (memory) or with the next batch (Redis); never waits."""


@attrs.define
class _Window:
    ends: float
    used: int = 0


class MemoryWindows:
    """Fixed windows in a dict; expired ones are swept once a window length."""

    def __init__(self, clock: IReactorTime, window: float = WINDOW_SECONDS) -> None:
        self._clock = clock
        self._window = window
        self._windows: dict[str, _Window] = {}
        self._next_sweep = clock.seconds() + window

    def _current(self, key: str, now: float) -> _Window:
        window = self._windows.get(key)
        if window is None or window.ends <= now:
            window = self._windows[key] = _Window(ends=now + self._window)
        return window

    def _peek(self, key: str, now: float) -> tuple[int, float]:
        window = self._windows.get(key)
        if window is None or window.ends <= now:
            return 0, self._window
        return window.used, window.ends - now

    def _sweep(self, now: float) -> None:
        if now >= self._next_sweep:
            self._next_sweep = now + self._window
            for key in [k for k, w in self._windows.items() if w.ends <= now]:
                del self._windows[key]

    async def admit(self, identity: str, rpm: int, tpm: int) -> Counts:
        now = self._clock.seconds()
        self._sweep(now)
        tokens, tokens_reset = self._peek("t:" + identity, now) if tpm else (0, self._window)
        requests, requests_reset = self._peek("r:" + identity, now) if rpm else (0, self._window)
        allowed = not (tpm and tokens >= tpm) and not (rpm and requests >= rpm)
        if allowed and rpm:
            window = self._current("r:" + identity, now)
            window.used += 1
            requests, requests_reset = window.used, window.ends - now
        return Counts(allowed, requests, requests_reset, tokens, tokens_reset)

    def add_tokens(self, identity: str, tokens: int) -> None:
        window = self._current("t:" + identity, self._clock.seconds())
        window.used += tokens


# KEYS: requests window, tokens window; ARGV: rpm, tpm, window in ms, then the tokens and the
# requests (admitted locally) to add first. rpm = tpm = 0 only adds.
# Returns {allowed, requests, requests ms left, tokens, tokens ms left}.
_ADMIT = """
local rpm, tpm, win = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function add(key, n)
  if n > 0 then
    redis.call('INCRBY', key, n)
    if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, win) end
  end
end
add(KEYS[2], tonumber(ARGV[4]))
add(KEYS[1], tonumber(ARGV[5]))
local function peek(key)
  local used = tonumber(redis.call('GET', key) or '0')
  local left = redis.call('PTTL', key)
  if left < 0 then left = win end
  return used, left
end
local requests, requests_left, tokens, tokens_left = 0, win, 0, win
if tpm > 0 then tokens, tokens_left = peek(KEYS[2]) end
if rpm > 0 then requests, requests_left = peek(KEYS[1]) end
local allowed = 1
if (tpm > 0 and tokens >= tpm) or (rpm > 0 and requests >= rpm) then allowed = 0 end
if allowed == 1 and rpm > 0 then
  requests = redis.call('INCR', KEYS[1])
  if requests == 1 or redis.call('PTTL', KEYS[1]) < 0 then
    redis.call('PEXPIRE', KEYS[1], win)
    requests_left = win
  end
end
return {allowed, requests, requests_left, tokens, tokens_left}
"""

# Limits at least this high may be admitted without asking Redis, for LEASE_SECONDS after an
# answer from it, while more than LOCAL_SHARE of the limit was left (see RedisWindows).
LOCAL_MIN_LIMIT = 1000
LEASE_SECONDS = 0.1
LOCAL_SHARE = 0.1


@attrs.define
class _Known:
    """What Redis last said about an identity, and what was admitted here since."""

    requests: int
    requests_ends: float
    tokens: int
    tokens_ends: float
    fresh_until: float
    unsynced: int = 0  # requests admitted locally, not yet added in Redis


class RedisWindows:
    """The same windows in Redis, shared by every instance that uses it.

    Each admission is one atomic script, except for high limits (``LOCAL_MIN_LIMIT`` and
    more): for ``LEASE_SECONDS`` after Redis answered, while more than ``LOCAL_SHARE`` of the
    limit is left, requests are admitted here and added in Redis with the next script (at
    most ``LEASE_SECONDS`` later), so a busy key costs Redis about ten scripts a second per
    instance instead of one per request. Near the limit every admission asks Redis again.
    Tokens likewise wait (at most ``LEASE_SECONDS``) and go with the next script.
    """

    def __init__(
        self,
        redis: RedisClient,
        clock: IReactorTime,
        window: float = WINDOW_SECONDS,
        lease: float = LEASE_SECONDS,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._window_ms = int(window * 1000)
        self._lease = lease
        self._pending: dict[str, int] = {}  # tokens not yet added in Redis
        self._known: dict[str, _Known] = {}
        # Admissions waiting for the answer Redis is giving another one of the same identity:
        # when the lease ends under load, one script renews it instead of one per request.
        self._asking: dict[str, list[Deferred[None]]] = {}
        self._flush_call: IDelayedCall | None = None
        self.flushing: Deferred[None] | None = None  # the flush in progress, if any

    def _local_ok(self, identity: str, known: _Known, rpm: int, tpm: int, now: float) -> bool:
        if now >= known.fresh_until:
            return False
        if rpm and (
            rpm < LOCAL_MIN_LIMIT
            or now >= known.requests_ends
            or rpm - known.requests - known.unsynced <= rpm * LOCAL_SHARE
        ):
            return False
        tokens = known.tokens + self._pending.get(identity, 0)
        return not tpm or (
            tpm >= LOCAL_MIN_LIMIT and now < known.tokens_ends and tpm - tokens > tpm * LOCAL_SHARE
        )

    def _keys(self, identity: str) -> list[str]:
        return [self._redis.key("rl", "r", identity), self._redis.key("rl", "t", identity)]

    async def admit(self, identity: str, rpm: int, tpm: int) -> Counts:
        waiters = self._asking.get(identity)
        if waiters is not None:  # Redis is being asked for this identity: its answer may do
            waiting: Deferred[None] = Deferred()
            waiters.append(waiting)
            await waiting
        local = self._admit_locally(identity, rpm, tpm)
        if local is not None:
            return local
        asking = identity not in self._asking
        if asking:
            self._asking[identity] = []
        try:
            return await self._ask(identity, rpm, tpm)
        finally:  # the lease is renewed (or Redis failed): the waiters look again
            if asking:
                for waiting in self._asking.pop(identity):
                    waiting.callback(None)

    def _admit_locally(self, identity: str, rpm: int, tpm: int) -> Counts | None:
        now = self._clock.seconds()
        known = self._known.get(identity)
        if known is None or not self._local_ok(identity, known, rpm, tpm, now):
            return None
        known.unsynced += 1
        self._schedule_flush()
        return Counts(
            True,
            known.requests + known.unsynced,
            known.requests_ends - now,
            known.tokens + self._pending.get(identity, 0),
            known.tokens_ends - now,
        )

    async def _ask(self, identity: str, rpm: int, tpm: int) -> Counts:
        """One atomic script: admit (or not), add what waited, renew the lease."""
        now = self._clock.seconds()
        known = self._known.get(identity)
        unsynced = known.unsynced if known is not None else 0
        if known is not None:
            known.unsynced = 0
        tokens_to_add = self._pending.pop(identity, 0)
        args = [rpm, tpm, self._window_ms, tokens_to_add, unsynced]
        reply = await self._redis.eval(_ADMIT, self._keys(identity), args)
        allowed, requests, requests_ms, tokens, tokens_ms = (int(v) for v in reply)
        counts = Counts(bool(allowed), requests, requests_ms / 1000, tokens, tokens_ms / 1000)
        if max(rpm, tpm) >= LOCAL_MIN_LIMIT:
            self._known[identity] = _Known(
                requests,
                now + counts.requests_reset,
                tokens,
                now + counts.tokens_reset,
                now + self._lease,
            )
        else:
            self._known.pop(identity, None)
        return counts

    def add_tokens(self, identity: str, tokens: int) -> None:
        self._pending[identity] = self._pending.get(identity, 0) + tokens
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(self._lease, self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_call = None
        self.flushing = Deferred.fromCoroutine(self.flush())

    async def flush(self) -> None:
        """Add in Redis the tokens and requests that no admission took along."""
        now = self._clock.seconds()
        pending, self._pending = self._pending, {}
        unsynced = {}
        for identity, known in list(self._known.items()):
            if known.unsynced:
                unsynced[identity], known.unsynced = known.unsynced, 0
            elif known.fresh_until < now:
                del self._known[identity]
        for identity in pending.keys() | unsynced.keys():
            args = [0, 0, self._window_ms, pending.get(identity, 0), unsynced.get(identity, 0)]
            with contextlib.suppress(RedisUnavailableError):  # fail open: not counted
                await self._redis.eval(_ADMIT, self._keys(identity), args)


def duration_text(seconds: float) -> str:
    """A reset time as OpenAI writes it: ``20ms``, ``12s``, ``1m0s``."""
    if seconds < 1:
        return f"{_ceil(seconds * 1000)}ms"
    whole = _ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def _ceil(value: float) -> int:
    """Rounded up, at least 1, ignoring float noise (60 - 59.9 is not 0.1000000000000014)."""
    return max(1, math.ceil(round(value, 6)))


def limit_headers(rpm: int, tpm: int, counts: Counts) -> dict[str, str]:
    headers: dict[str, str] = {}
    if rpm:
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - counts.requests))
        headers["x-ratelimit-reset-requests"] = duration_text(counts.requests_reset)
    if tpm:
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - counts.tokens))
        headers["x-ratelimit-reset-tokens"] = duration_text(counts.tokens_reset)
    return headers


# The headers' names, encoded once (HTTP sets them raw on every limited response).
HEADER_NAMES = {
    f"x-ratelimit-{part}-{what}": f"x-ratelimit-{part}-{what}".encode("ascii")
    for part in ("limit", "remaining", "reset")
    for what in ("requests", "tokens")
}


def identity_of(key_id: str | None, client: str | None) -> str:
    """Whom a limit counts: the client key when there is one, else the client address."""
    if key_id:
        return "key:" + key_id
    return "addr:" + (client or "unknown")


class RateLimiter:
    """Decides whether a request may go on; counts tokens once requests are over."""

    @classmethod
    def from_settings(
        cls, settings: Settings, clock: IReactorTime, redis: RedisClient | None
    ) -> RateLimiter:
        windows: Windows = RedisWindows(redis, clock) if redis is not None else MemoryWindows(clock)
        return cls(windows, settings.default_rpm, settings.default_tpm)

    def __init__(self, windows: Windows, default_rpm: int, default_tpm: int) -> None:
        self.windows = windows
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        # Keys with a tokens limit of their own: their tokens are counted even when the
        # default is unlimited.
        self._own_tpm: set[str] = set()
        self.refused = 0  # for metrics: requests answered 429

    def use_defaults(self, default_rpm: int, default_tpm: int) -> None:
        """The limits of calls without limits of their own, from now on (a reload)."""
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm

    def limits_of(self, key: ClientKey | None) -> tuple[int, int]:
        """The (rpm, tpm) of ``key``'s requests (None when auth is off); 0: no limit."""
        rpm = key.rpm if key is not None else None
        tpm = key.tpm if key is not None else None
        return (
            self.default_rpm if rpm is None else int(rpm),
            self.default_tpm if tpm is None else int(tpm),
        )

    async def admit(self, key: ClientKey | None, client: str | None) -> dict[str, str]:
        """Count one request of ``key`` (None when auth is off) from the address ``client``.
        Returns the ``x-ratelimit-*`` headers; raises a 429 ``ApiError`` (carrying them too)
        when over a limit."""
        rpm, tpm = self.limits_of(key)
        headers: dict[str, str] = {}
        if rpm or tpm:
            headers = await self._decide(identity_of(key.id if key else None, client), rpm, tpm)
        team = key.team if key is not None else None
        if team is not None and (team.rpm or team.tpm):
            # The team's windows too; the headers describe the key's.
            await self._decide(
                "team:" + team.id, team.rpm or 0, team.tpm or 0, f"team {team.name}'s "
            )
        return headers

    async def _decide(self, identity: str, rpm: int, tpm: int, whose: str = "") -> dict[str, str]:
        if tpm and tpm != self.default_tpm:
            self._own_tpm.add(identity)
        try:
            counts = await self.windows.admit(identity, rpm, tpm)
        except RedisUnavailableError:
            return {}  # fail open: served without a limit while Redis is away
        headers = limit_headers(rpm, tpm, counts)
        if counts.allowed:
            return headers
        self.refused += 1
        raise self._refusal(rpm, tpm, counts, headers, whose)  # its headers carry the trio too

    @staticmethod
    def _refusal(
        rpm: int, tpm: int, counts: Counts, headers: dict[str, str], whose: str = ""
    ) -> ApiError:
        waits = []
        if rpm and counts.requests >= rpm:
            waits.append((counts.requests_reset, f"{rpm} requests per minute"))
        if tpm and counts.tokens >= tpm:
            waits.append((counts.tokens_reset, f"{tpm} tokens per minute"))
        wait, what = max(waits)
        message = f"{whose}rate limit of {what} reached; retry in {duration_text(wait)}"
        return ApiError(
            429,
            "Too Many Requests",
            message,
            code="rate_limit_exceeded",
            headers={
                **headers,
                "Retry-After": str(_ceil(wait)),
                "retry-after-ms": str(_ceil(wait * 1000)),
            },
        )

    def count_tokens(self, exchange: Exchange) -> None:
        """Exchange observer: add a finished call's tokens to its tokens window."""
        usage = exchange.usage
        if usage is None:
            return
        tokens = usage.prompt_tokens + usage.completion_tokens
        if tokens <= 0:
            return
        identity = identity_of(exchange.key_id, exchange.client)
        team = exchange.key.team if exchange.key is not None else None
        try:
            if team is not None and team.tpm:
                self.windows.add_tokens("team:" + team.id, tokens)
            if not self.default_tpm and identity not in self._own_tpm:
                return
            self.windows.add_tokens(identity, tokens)
        except Exception:
            log.failure("counting tokens failed")
