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
valid SSE stream; streamed HTTP answers themselves are not stored. The WebSocket (whose
requests are all streamed) uses the same cache through ``scope_for``, ``fetch``, ``keep`` and
``replay_of``, and stores its complete streams (``answer_of_chunks``).

Backends: ``MemoryStore`` (a least-recently-used dict bounded in bytes) and ``RedisStore``
(shared by instances; ``SET … EX``; ``mpcapi.cacheindex`` tells it which lookups need not ask
Redis). A Redis error is a miss, never a failed request.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from mpcapi.config.settings import Settings
from mpcapi.errors import JSON_CONTENT_TYPE, set_status, with_length
from mpcapi.http.requestlog import record_of
from mpcapi.http.streaming import SSE_HEADERS
from mpcapi.policy.cacheindex import BYTES_PER_KEY, KeyIndex, announcement, channel_of
from mpcapi.storage.redis import RedisClient, RedisUnavailableError

log = Logger(namespace="mpcapi.cache")

CACHE_HEADER = b"x-mpcapi-cache"
CACHEABLE_ROUTES = ("/chat/completions", "/completions", "/embeddings")
# Request fields that change how an answer is delivered, not what it says.
DELIVERY_FIELDS = ("stream", "stream_options")
_PENDING = "_mpcapi_cache_key"  # the cache key of a miss, on the request, until it is stored


_Item = TypeVar("_Item")
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
# then the channel and the announcement of the batch (see mpcapi.cacheindex). Announced
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


def cache_control(request: IRequest) -> set[str]:
    values = request.requestHeaders.getRawHeaders(b"cache-control") or []
    return {
        part.strip().split(b"=", 1)[0].lower().decode("latin-1")
        for value in values
        for part in value.split(b",")
        if part.strip()
    }


class ResponseCache:
    """``lookup`` before forwarding, ``store_answer`` after a 200; off when ``ttl`` is 0."""

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

    def scope_of(self, request: IRequest) -> str:
        record = record_of(request)
        peer = request.getClientAddress()
        authorization = None if self._our_key else request.getHeader(b"authorization")
        return self.scope_for(
            record.user, record.key_id, getattr(peer, "host", None), authorization
        )

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

    async def lookup(self, request: IRequest, route: str, document: dict[str, Any]) -> bytes | None:
        """The whole response (status and headers set) on a hit; None otherwise, after
        noting what to store if the answer turns out to be a 200."""
        if not self.enabled or route not in CACHEABLE_ROUTES:
            return None
        directives = cache_control(request)
        key = cache_key(self.scope_of(request), route, document)
        streamed = document.get("stream") is True
        if "no-store" not in directives and not streamed:
            setattr(request, _PENDING, key)
        if "no-cache" in directives:
            self._mark(request, "bypass")
            return None
        cached = await self.fetch(key)
        if cached is not None:
            response = self._replay(request, document, cached) if streamed else cached
            if response is not None:
                setattr(request, _PENDING, None)
                self._mark(request, "hit")
                if not streamed:
                    set_status(request, 200)
                    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
                return with_length(request, response)
        self._mark(request, "miss")
        return None

    def store_answer(self, request: IRequest, answer: bytes) -> None:
        """Keep a 200 answer of a miss (or bypass); in the background for Redis."""
        key = getattr(request, _PENDING, None)
        if key is None or request.code != 200:  # type: ignore[attr-defined]
            return
        setattr(request, _PENDING, None)
        self.keep(key, answer)

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

    def _mark(self, request: IRequest, outcome: str) -> None:
        record_of(request).cache = outcome
        request.setHeader(CACHE_HEADER, outcome.encode("ascii"))
        self.count(outcome)

    def count(self, outcome: str) -> None:
        """Count a lookup's outcome (hit, miss or bypass) for the metrics."""
        if outcome == "hit":
            self.hits += 1
        elif outcome == "miss":
            self.misses += 1
        else:
            self.bypasses += 1

    @staticmethod
    def _replay(request: IRequest, document: dict[str, Any], cached: bytes) -> bytes | None:
        events = replay_of(cached, document)
        if events is None:
            return None  # not an answer we know how to stream: forward instead
        set_status(request, 200)
        for name, value in SSE_HEADERS.items():
            request.setHeader(name, value)
        return (
            b"".join(b"data: " + json.dumps(event).encode("utf-8") + b"\n\n" for event in events)
            + b"data: [DONE]\n\n"
        )


def _store_failed(failure: Failure) -> None:
    if not failure.check(RedisUnavailableError):
        log.failure("cache store failed", failure)


def replay_of(cached: bytes, document: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The stream chunks of a cached answer for the request ``document`` (with the usage
    chunk when it asks for it); None for an answer that cannot be streamed."""
    try:
        answer = json.loads(cached)
        options = document.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        return replay_events(answer, usage)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def replay_events(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The chunks a stream of ``answer`` (a chat completion or a text completion) has."""
    kind = answer["object"]
    if kind == "chat.completion":
        return _chat_chunks(answer, include_usage)
    if kind == "text_completion":
        return _text_chunks(answer, include_usage)
    raise ValueError(f"cannot stream a {kind!r}")


def _chunk(answer: dict[str, Any], kind: str, choices: list[Any], usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": answer.get("id", ""),
        "object": kind,
        "created": answer.get("created", 0),
        "model": answer.get("model", ""),
        "choices": choices,
    }
    if answer.get("system_fingerprint") is not None:
        chunk["system_fingerprint"] = answer["system_fingerprint"]
    if usage:
        chunk["usage"] = None
    return chunk


def _usage_chunk(answer: dict[str, Any], kind: str) -> dict[str, Any]:
    chunk = _chunk(answer, kind, [], False)
    chunk["usage"] = answer.get("usage")
    return chunk


def _chat_chunks(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    kind = "chat.completion.chunk"
    events: list[dict[str, Any]] = []
    for choice in answer["choices"]:
        index = choice.get("index", 0)
        message = choice.get("message") or {}

        def delta(values: dict[str, Any], finish: Any = None, index: int = index) -> None:
            entry = {"index": index, "delta": values, "logprobs": None, "finish_reason": finish}
            events.append(_chunk(answer, kind, [entry], include_usage))

        delta({"role": message.get("role", "assistant"), "content": ""})
        if message.get("content"):
            delta({"content": message["content"]})
        if message.get("refusal"):
            delta({"refusal": message["refusal"]})
        for position, call in enumerate(message.get("tool_calls") or []):
            delta({"tool_calls": [{"index": position, **call}]})
        delta({}, choice.get("finish_reason") or "stop")
    if include_usage and answer.get("usage") is not None:
        events.append(_usage_chunk(answer, kind))
    return events


def _text_chunks(answer: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    kind = "text_completion"
    events: list[dict[str, Any]] = []
    for choice in answer["choices"]:
        index = choice.get("index", 0)
        for text, finish in ((choice.get("text") or "", None), ("", choice.get("finish_reason"))):
            entry = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            events.append(_chunk(answer, kind, [entry], include_usage))
    if include_usage and answer.get("usage") is not None:
        events.append(_usage_chunk(answer, kind))
    return events


# What a streamed answer is, once whole: the inverse of replay_events, for the WebSocket,
# whose requests are all streamed. Only what a replay gives back is kept (text, refusals,
# tool calls, usage); a stream with anything else (logprobs, audio…) is not stored.
_CHAT_DELTA = ("role", "content", "refusal", "tool_calls")
_CHOICE = ("index", "delta", "text", "finish_reason", "logprobs")


def answer_of_chunks(chunks: list[Any]) -> dict[str, Any] | None:
    """The answer (``chat.completion`` or ``text_completion``) that a complete stream of
    ``chunks`` says, for the cache; None when it says more than a replay would give back."""
    try:
        return _assemble(chunks)
    except (TypeError, KeyError, AttributeError, ValueError):
        return None


def _assemble(chunks: list[Any]) -> dict[str, Any] | None:
    if not chunks:
        return None
    first = chunks[0]
    kind = first["object"]
    if kind not in ("chat.completion.chunk", "text_completion"):
        return None
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        if chunk["object"] != kind:
            return None
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            if any(choice.get(name) is not None for name in choice if name not in _CHOICE):
                return None
            if choice.get("logprobs") is not None:
                return None
            index = int(choice.get("index", 0))
            whole = choices.setdefault(index, {"index": index, "finish_reason": None})
            if choice.get("finish_reason") is not None:
                whole["finish_reason"] = choice["finish_reason"]
            if kind == "text_completion":
                whole["text"] = whole.get("text", "") + (choice.get("text") or "")
            elif not _add_delta(whole, choice.get("delta") or {}):
                return None
    answer: dict[str, Any] = {
        "id": first.get("id", ""),
        "object": "chat.completion" if kind == "chat.completion.chunk" else kind,
        "created": first.get("created", 0),
        "model": first.get("model", ""),
        "choices": [_finished(choices[index], kind) for index in sorted(choices)],
    }
    if first.get("system_fingerprint") is not None:
        answer["system_fingerprint"] = first["system_fingerprint"]
    if usage is not None:
        answer["usage"] = usage
    return answer


def _add_delta(whole: dict[str, Any], delta: dict[str, Any]) -> bool:
    """Fold one chat delta into its choice's message; False for a field we cannot replay."""
    if any(value is not None for name, value in delta.items() if name not in _CHAT_DELTA):
        return False
    message = whole.setdefault("message", {"role": "assistant", "content": None})
    if delta.get("role"):
        message["role"] = delta["role"]
    for name in ("content", "refusal"):
        if delta.get(name):
            message[name] = (message.get(name) or "") + delta[name]
    for call in delta.get("tool_calls") or []:
        calls = message.setdefault("tool_calls", [])
        position = int(call["index"])
        if position == len(calls):
            calls.append(
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
        elif position > len(calls):
            return False
        merged, function = calls[position], call.get("function") or {}
        merged["id"] = call.get("id") or merged["id"]
        merged["type"] = call.get("type") or merged["type"]
        for name in ("name", "arguments"):
            merged["function"][name] += function.get(name) or ""
    return True


def _finished(whole: dict[str, Any], kind: str) -> dict[str, Any]:
    if kind == "text_completion":
        text = whole.get("text", "")
        return {
            "text": text,
            "index": whole["index"],
            "logprobs": None,
            "finish_reason": whole["finish_reason"],
        }
    message = whole.get("message") or {"role": "assistant", "content": None}
    return {
        "index": whole["index"],
        "message": message,
        "logprobs": None,
        "finish_reason": whole["finish_reason"],
    }
