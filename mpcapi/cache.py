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
valid SSE stream; streamed answers themselves are not stored.

Backends: ``MemoryStore`` (a least-recently-used dict bounded in bytes) and ``RedisStore``
(shared by instances; ``SET … EX``). A Redis error is a miss, never a failed request.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from mpcapi.errors import JSON_CONTENT_TYPE, set_status, with_length
from mpcapi.redisclient import RedisClient, RedisUnavailableError
from mpcapi.requestlog import record_of
from mpcapi.settings import Settings
from mpcapi.streaming import SSE_HEADERS

log = Logger(namespace="mpcapi.cache")

CACHE_HEADER = b"x-mpcapi-cache"
CACHEABLE_ROUTES = ("/chat/completions", "/completions", "/embeddings")
# Request fields that change how an answer is delivered, not what it says.
DELIVERY_FIELDS = ("stream", "stream_options")
_PENDING = "_mpcapi_cache_key"  # the cache key of a miss, on the request, until it is stored


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: int) -> None: ...


class MemoryStore:
    """An LRU of answers bounded by ``max_bytes`` (keys and bodies), each with a TTL."""

    def __init__(self, clock: IReactorTime, max_bytes: int) -> None:
        self._clock = clock
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self._clock.seconds():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl: int) -> None:
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


class RedisStore:
    """Answers in Redis, shared by every instance that uses it; Redis expires them."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis

    async def get(self, key: str) -> bytes | None:
        return await self._redis.get(self._redis.key("cache", key))

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        await self._redis.set(self._redis.key("cache", key), value, expire=ttl)


def canonical_body(document: dict[str, Any]) -> str:
    """The request as the cache sees it: sorted keys, no whitespace, no delivery fields."""
    content = {k: v for k, v in document.items() if k not in DELIVERY_FIELDS}
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
        store: Store = (
            RedisStore(redis) if redis is not None else MemoryStore(clock, settings.cache_max_bytes)
        )
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
        if self.scope == "global":
            scope = "global"
        elif record.user:
            scope = "user:" + record.user
        elif record.key_id:
            scope = "key:" + record.key_id
        else:
            peer = request.getClientAddress()
            scope = "addr:" + str(getattr(peer, "host", "unknown"))
        if not self._our_key:
            authorization = request.getHeader(b"authorization") or b""
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
        try:
            cached = await self.store.get(key)
        except RedisUnavailableError:
            cached = None
        except Exception:
            log.failure("cache lookup failed")
            cached = None
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
        Deferred.fromCoroutine(self._set(key, answer))

    async def _set(self, key: str, answer: bytes) -> None:
        try:
            await self.store.set(key, answer, self.ttl)
        except RedisUnavailableError:
            pass
        except Exception:
            log.failure("cache store failed")

    def _mark(self, request: IRequest, outcome: str) -> None:
        record_of(request).cache = outcome
        request.setHeader(CACHE_HEADER, outcome.encode("ascii"))
        if outcome == "hit":
            self.hits += 1
        elif outcome == "miss":
            self.misses += 1
        else:
            self.bypasses += 1

    @staticmethod
    def _replay(request: IRequest, document: dict[str, Any], cached: bytes) -> bytes | None:
        try:
            answer = json.loads(cached)
            options = document.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            events = replay_events(answer, usage)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None  # not an answer we know how to stream: forward instead
        set_status(request, 200)
        for name, value in SSE_HEADERS.items():
            request.setHeader(name, value)
        return (
            b"".join(b"data: " + json.dumps(event).encode("utf-8") + b"\n\n" for event in events)
            + b"data: [DONE]\n\n"
        )


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
