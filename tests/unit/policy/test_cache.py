"""The response cache: hit, miss, bypass, no-store, scopes, SSE replay, LRU and TTL, Redis."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock

from mpcapi.openai.replay import answer_of_chunks, replay_events
from mpcapi.openai.sse import DONE, SSEParser
from mpcapi.policy.cache import (
    STORE_DELAY,
    MemoryStore,
    RedisStore,
    ResponseCache,
    cache_key,
    canonical_body,
)
from mpcapi.storage.keys import ClientKey
from mpcapi.storage.redis import RedisClient, RedisUnavailableError
from tests.support.gateway import CHAT, COMPLETION, Harness, answer, header, json_body, make_harness
from tests.support.keys import bearer, client_key, keyed_harness
from tests.support.logs import captured
from tests.support.ports import closed_port
from tests.support.reactor import driven, sleep
from tests.support.redisserver import SHARED_REDIS_URL as REDIS_URL

CHAT_ROUTE = "/api/chat/completions"
TEXT_ANSWER = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [{"index": 0, "text": "Hello there", "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
}


def cached_harness(**overrides: Any) -> Harness:
    return make_harness(cache_ttl=60, **overrides)


async def chat(harness: Harness, body: Any = None, **kwargs: Any) -> tuple[Any, bytes]:
    response = await harness.post(CHAT_ROUTE, CHAT if body is None else body, **kwargs)
    return response, await response.content()


def cache_state(response: Any) -> str | None:
    return header(response, "x-mpcapi-cache")


def upstream_calls(harness: Harness) -> int:
    return len([seen for seen in harness.fake.seen if seen.method == "POST"])


# --- hit, miss, bypass, no-store ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_repeated_request_is_a_hit_and_never_reaches_litellm() -> None:
    harness = cached_harness()
    first, first_body = await chat(harness)
    second, second_body = await chat(harness)
    assert (cache_state(first), cache_state(second)) == ("miss", "hit")
    assert (first.code, second.code) == (200, 200)
    assert second_body == first_body
    assert json.loads(second_body) == COMPLETION
    assert header(second, "content-type") == "application/json"
    assert second.length == len(second_body)
    assert header(second, "x-request-id")
    assert upstream_calls(harness) == 1


@pytest_twisted.ensureDeferred
async def test_key_order_and_whitespace_do_not_matter() -> None:
    harness = cached_harness()
    spaced = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}'
    await chat(harness, spaced)
    reordered = b'{ "messages":[ {"content":"Hi","role":"user"} ],\n "model":"gpt-4o-mini" }'
    response, _ = await chat(harness, reordered)
    assert cache_state(response) == "hit"
    other, _ = await chat(harness, {**CHAT, "temperature": 0.5})
    assert cache_state(other) == "miss"
    other_model, _ = await chat(harness, {**CHAT, "model": "gpt-4o"})
    assert cache_state(other_model) == "miss"


@pytest_twisted.ensureDeferred
async def test_no_cache_bypasses_the_lookup_but_stores_the_answer() -> None:
    harness = cached_harness()
    await chat(harness)
    bypass, _ = await chat(harness, headers={"Cache-Control": "no-cache"})
    assert cache_state(bypass) == "bypass"
    assert upstream_calls(harness) == 2
    harness.fake.routes[("POST", "/chat/completions")] = answer(200, {**COMPLETION, "id": "new"})
    fresh, _ = await chat(harness, {**CHAT, "seed": 1}, headers={"Cache-Control": "no-cache"})
    hit, body = await chat(harness, {**CHAT, "seed": 1})
    assert (cache_state(fresh), cache_state(hit)) == ("bypass", "hit")
    assert json.loads(body)["id"] == "new"


@pytest_twisted.ensureDeferred
async def test_no_store_keeps_the_answer_out() -> None:
    harness = cached_harness()
    first, _ = await chat(harness, headers={"Cache-Control": "no-store"})
    second, _ = await chat(harness)
    third, _ = await chat(harness, headers={"Cache-Control": "max-age=0, no-store"})
    assert [cache_state(r) for r in (first, second, third)] == ["miss", "miss", "hit"]
    assert upstream_calls(harness) == 2


@pytest_twisted.ensureDeferred
async def test_only_200_answers_are_stored() -> None:
    harness = cached_harness()
    harness.fake.routes[("POST", "/chat/completions")] = answer(
        429, {"error": {"message": "slow down"}}, {"retry-after": "1"}
    )
    first, _ = await chat(harness)
    second, _ = await chat(harness)
    assert (first.code, second.code) == (429, 429)
    assert [cache_state(r) for r in (first, second)] == ["miss", "miss"]
    assert upstream_calls(harness) == 2


@pytest_twisted.ensureDeferred
async def test_completions_and_embeddings_are_cached_models_are_not() -> None:
    harness = cached_harness()
    harness.fake.routes[("POST", "/completions")] = answer(200, TEXT_ANSWER)
    for path, body in (
        ("/v1/completions", {"model": "m", "prompt": "Say hi"}),
        ("/api/embeddings", {"model": "e", "input": "x"}),
    ):
        first = await harness.post(path, body)
        second = await harness.post(path, body)
        assert (cache_state(first), cache_state(second)) == ("miss", "hit"), path
    models = await harness.get("/api/models")
    assert cache_state(models) is None


@pytest_twisted.ensureDeferred
async def test_routes_do_not_share_answers() -> None:
    harness = cached_harness()
    body = {"model": "m", "prompt": "x", "input": "x"}
    await harness.post("/api/completions", body)
    response = await harness.post("/api/embeddings", body)
    assert cache_state(response) == "miss"


@pytest_twisted.ensureDeferred
async def test_off_by_default_and_says_nothing(harness: Harness) -> None:
    first, _ = await chat(harness)
    second, _ = await chat(harness)
    assert (cache_state(first), cache_state(second)) == (None, None)
    assert upstream_calls(harness) == 2


@pytest_twisted.ensureDeferred
async def test_answers_expire_after_the_ttl() -> None:
    harness = make_harness(cache_ttl=30)
    await chat(harness)
    harness.clock.advance(29.9)
    assert cache_state((await chat(harness))[0]) == "hit"
    harness.clock.advance(0.1)
    assert cache_state((await chat(harness))[0]) == "miss"


@pytest_twisted.ensureDeferred
async def test_a_hit_is_rate_limited_like_any_request() -> None:
    harness = cached_harness(default_rpm=2)
    await chat(harness)
    hit, _ = await chat(harness)
    refused, _ = await chat(harness)
    assert (hit.code, cache_state(hit), refused.code) == (200, "hit", 429)
    assert header(hit, "x-ratelimit-remaining-requests") == "0"


# --- scope ----------------------------------------------------------------------------------


KEYS = {
    "key_a1": client_key("key_a1", "alice"),
    "key_a2": client_key("key_a2", "alice"),
    "key_b": client_key("key_b", "bob"),
}


@pytest_twisted.ensureDeferred
async def test_scope_key_gives_each_owner_a_cache_of_their_own() -> None:
    harness = keyed_harness(KEYS, cache_ttl=60)
    states = [
        cache_state((await chat(harness, **bearer(token)))[0])
        for token in ("key_a1", "key_a2", "key_b", "key_b")
    ]
    assert states == ["miss", "hit", "miss", "hit"]  # alice's two keys share hers


@pytest_twisted.ensureDeferred
async def test_scope_global_is_one_cache_for_everyone() -> None:
    harness = keyed_harness(KEYS, cache_ttl=60, cache_scope="global")
    states = [
        cache_state((await chat(harness, **bearer(token)))[0]) for token in ("key_a1", "key_b")
    ]
    assert states == ["miss", "hit"]


@pytest_twisted.ensureDeferred
async def test_without_our_key_each_client_authorization_has_its_own_cache() -> None:
    harness = make_harness(cache_ttl=60, cache_scope="global", litellm_api_key="")
    states = []
    for token in ("sk-one", "sk-two", "sk-one"):
        response, _ = await chat(harness, headers={"Authorization": f"Bearer {token}"})
        states.append(cache_state(response))
    assert states == ["miss", "miss", "hit"]


def test_the_canonical_body_sorts_keys_keeps_unicode_and_takes_any_json_number() -> None:
    document = {"model": "m", "user": "zoë", "seed": 2**70, "n": 1, "temperature": 0.7}
    assert canonical_body(document) == (
        '{"model":"m","n":1,"seed":1180591620717411303424,"temperature":0.7,"user":"zoë"}'
    )
    assert canonical_body({"b": {"y": 1, "x": [2, {"d": 0, "c": None}]}, "a": True}) == (
        '{"a":true,"b":{"x":[2,{"c":null,"d":0}],"y":1}}'
    )


def test_the_key_ignores_delivery_fields_and_depends_on_scope_and_route() -> None:
    document = {"model": "m", "messages": [], "stream": True, "stream_options": {"x": 1}}
    assert canonical_body(document) == '{"messages":[],"model":"m"}'
    assert cache_key("s", "/chat/completions", document) == cache_key(
        "s", "/chat/completions", {"messages": [], "model": "m"}
    )
    assert cache_key("s", "/r", document) != cache_key("t", "/r", document)
    assert cache_key("s", "/r", document) != cache_key("s", "/q", document)


# --- streamed replay ------------------------------------------------------------------------


def parse_stream(raw: bytes) -> list[Any]:
    parser = SSEParser()
    events = list(parser.feed(raw))
    assert events[-1].data == DONE
    return [json.loads(event.data) for event in events[:-1]]


@pytest_twisted.ensureDeferred
async def test_a_stream_request_replays_a_cached_answer_as_sse() -> None:
    harness = cached_harness()
    await chat(harness)
    response, raw = await chat(harness, {**CHAT, "stream": True})
    assert (response.code, cache_state(response)) == (200, "hit")
    assert header(response, "content-type") == "text/event-stream"
    chunks = parse_stream(raw)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk["id"] == "chatcmpl-1" for chunk in chunks)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content") or "" for d in deltas) == "Hi"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in chunk for chunk in chunks)
    assert upstream_calls(harness) == 1


@pytest_twisted.ensureDeferred
async def test_a_replay_with_include_usage_ends_with_the_usage_chunk() -> None:
    harness = cached_harness()
    await chat(harness)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    _, raw = await chat(harness, body)
    chunks = parse_stream(raw)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == COMPLETION["usage"]
    assert all(chunk["usage"] is None for chunk in chunks[:-1])


@pytest_twisted.ensureDeferred
async def test_a_streamed_miss_is_relayed_and_not_stored() -> None:
    harness = cached_harness()

    def stream(request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/event-stream")
        return b'data: {"choices": []}\n\ndata: [DONE]\n\n'

    harness.fake.routes[("POST", "/chat/completions")] = stream
    first, raw = await chat(harness, {**CHAT, "stream": True})
    second, _ = await chat(harness, {**CHAT, "stream": True})
    assert raw == b'data: {"choices": []}\n\ndata: [DONE]\n\n'
    assert (cache_state(first), cache_state(second)) == ("miss", "miss")


@pytest_twisted.ensureDeferred
async def test_text_completions_replay_as_text_completion_chunks() -> None:
    harness = cached_harness()
    harness.fake.routes[("POST", "/completions")] = answer(200, TEXT_ANSWER)
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"}
    await harness.post("/api/completions", body)
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    response = await harness.post("/api/completions", streamed)
    chunks = parse_stream(await response.content())
    assert cache_state(response) == "hit"
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == TEXT_ANSWER["usage"]


def test_tool_calls_replay_as_tool_call_deltas() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    answer_ = {
        **COMPLETION,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
            }
        ],
    }
    chunks = replay_events(answer_, include_usage=False)
    assert chunks[1]["choices"][0]["delta"] == {"tool_calls": [{"index": 0, **call}]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_whole_stream_is_the_answer_it_replays_from() -> None:
    """``answer_of_chunks`` (what the WebSocket stores) undoes ``replay_events``."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    chat = {
        **COMPLETION,
        "created": 5,
        "system_fingerprint": "fp",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi", "tool_calls": [call]},
                "logprobs": None,
                "finish_reason": "tool_calls",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": None, "refusal": "no"},
                "logprobs": None,
                "finish_reason": "stop",
            },
        ],
    }
    text = {**TEXT_ANSWER, "choices": [{**TEXT_ANSWER["choices"][0]}]}  # type: ignore[list-item]
    for answer_ in (chat, text):
        assert answer_of_chunks(replay_events(answer_, include_usage=True)) == answer_


def test_streamed_deltas_and_tool_call_fragments_are_joined() -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    fragments = [
        chunk({"role": "assistant", "content": None, "function_call": None}),
        chunk(
            {"tool_calls": [{"index": 0, "id": "t1", "function": {"name": "f", "arguments": ""}}]}
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        chunk({}, "tool_calls"),
    ]
    [choice] = answer_of_chunks(fragments)["choices"]  # type: ignore[index]
    assert choice["message"]["tool_calls"] == [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert choice["message"]["content"] is None
    assert choice["finish_reason"] == "tool_calls"


def test_a_stream_with_more_than_a_replay_gives_back_is_no_answer() -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    choice = {"index": 0, "delta": {"content": "x"}, "finish_reason": None}
    assert answer_of_chunks([]) is None
    assert (
        answer_of_chunks([{**base, "choices": [{**choice, "logprobs": {"content": []}}]}]) is None
    )
    assert answer_of_chunks([{**base, "choices": [{**choice, "delta": {"audio": {}}}]}]) is None
    assert answer_of_chunks([{**base, "object": "list"}]) is None
    assert answer_of_chunks(["not a chunk"]) is None


# --- memory store ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_memory_store_evicts_the_least_recently_used_by_bytes() -> None:
    store = MemoryStore(Clock(), max_bytes=300)
    for name in "abc":
        await store.set(name, b"x" * 99, ttl=60)  # 100 bytes each with the key
    assert store.size == 300
    assert await store.get("a") == b"x" * 99  # a is now the most recently used
    await store.set("d", b"y" * 99, ttl=60)
    assert await store.get("b") is None  # b was the least recently used
    assert [await store.get(k) is not None for k in "acd"] == [True, True, True]
    assert store.size == 300
    await store.set("huge", b"z" * 400, ttl=60)  # bigger than the whole cache: not kept
    assert await store.get("huge") is None
    assert len(store) == 3


@pytest_twisted.ensureDeferred
async def test_memory_store_entries_expire() -> None:
    clock = Clock()
    store = MemoryStore(clock, max_bytes=1000)
    await store.set("a", b"1", ttl=10)
    clock.advance(9)
    assert await store.get("a") == b"1"
    clock.advance(1)
    assert await store.get("a") is None
    assert (len(store), store.size) == (0, 0)
    await store.set("a", b"22", ttl=10)
    await store.set("a", b"333", ttl=10)  # replacing counts the new size only
    assert store.size == 4


# --- Redis ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_store_is_shared_by_gateways() -> None:
    prefix = f"mpcapi-test:{uuid.uuid4().hex}:"
    first = make_harness(cache_ttl=60, redis_url=REDIS_URL, redis_prefix=prefix)
    second = make_harness(cache_ttl=60, redis_url=REDIS_URL, redis_prefix=prefix)
    miss, _ = await driven(first, chat(first))
    # The store happens in the background: wait for it the way a second client would.
    client = RedisClient(REDIS_URL, global_reactor, prefix=prefix)
    try:
        for _ in range(50):
            keys = await client.eval("return redis.call('KEYS', ARGV[1])", [], [prefix + "*"])
            if keys:
                break
            await sleep(0.02)
        assert len(keys) == 1
        ttl = await client.eval("return redis.call('TTL', KEYS[1])", [keys[0].decode()], [])
        assert 0 < ttl <= 60
        hit, body = await driven(second, chat(second))
        assert (cache_state(miss), cache_state(hit)) == ("miss", "hit")
        assert json.loads(body) == COMPLETION
        assert upstream_calls(second) == 0
        await client.eval("redis.call('DEL', KEYS[1])", [keys[0].decode()], [])
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_redis_down_is_a_miss_and_the_answer_is_served() -> None:
    with closed_port() as port:
        harness = make_harness(cache_ttl=60, redis_url=f"redis://127.0.0.1:{port}")
        states = []
        for _ in range(3):
            response, body = await driven(harness, chat(harness))
            assert response.code == 200
            assert json.loads(body) == COMPLETION
            states.append(cache_state(response))
        assert states == ["miss", "miss", "miss"]


@pytest_twisted.ensureDeferred
async def test_redis_store_round_trips_bytes() -> None:
    prefix = f"mpcapi-test:{uuid.uuid4().hex}:"
    client = RedisClient(REDIS_URL, global_reactor, prefix=prefix)
    store = RedisStore(client, global_reactor)
    try:
        value = json.dumps({"n": "12345", "text": "héllo"}).encode()
        await store.set("k", value, ttl=5)
        assert await store.get("k") == value
        await store.set("n", b"12345", ttl=5)  # numbers stay bytes
        assert await store.get("n") == b"12345"
        assert await store.get("missing") is None
    finally:
        keys = [prefix + "cache:k", prefix + "cache:n"]
        await client.eval("redis.call('DEL', KEYS[1], KEYS[2])", keys, [])
        await client.close()


def test_client_key_fixture_is_a_real_client_key() -> None:
    assert isinstance(client_key("key_x", "x"), ClientKey)
    assert json_body is not None


class _FailingStore:
    """A store whose every store fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def get(self, key: str) -> defer.Deferred[bytes | None]:
        return defer.succeed(None)

    def set(self, key: str, value: bytes, ttl: int) -> defer.Deferred[None]:
        return defer.fail(self.error)


def test_a_failed_store_is_logged_unless_redis_is_away() -> None:
    with captured("mpcapi.cache") as events:
        ResponseCache(_FailingStore(RuntimeError("disk on fire")), 60, "key", True).keep("k", b"v")
        away = _FailingStore(RedisUnavailableError("down"))
        ResponseCache(away, 60, "key", True).keep("k", b"v")  # the client logs outages
    assert [event["log_format"] for event in events] == ["cache store failed"]
    assert events[0]["log_failure"].check(RuntimeError)


class _ControlledRedis:
    """A RedisClient stand-in whose MGETs and scripts the test answers by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []
        self.pending: list[defer.Deferred[Any]] = []

    def key(self, *parts: str) -> str:
        return ":".join(parts)

    def mget(self, keys: list[str]) -> defer.Deferred[Any]:
        return self._call("mget", keys)

    def eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred[Any]:
        return self._call("eval", [*keys, *args])

    def _call(self, name: str, args: list[Any]) -> defer.Deferred[Any]:
        self.calls.append((name, args))
        self.pending.append(defer.Deferred())
        return self.pending[-1]


def test_redis_lookups_made_while_one_is_in_flight_go_out_as_one_mget() -> None:
    redis = _ControlledRedis()
    store = RedisStore(redis, Clock())  # type: ignore[arg-type]
    first = store.get("a")
    waiting = [store.get("b"), store.get("c")]
    assert redis.calls == [("mget", ["cache:a"])]
    redis.pending[0].callback([b"A"])
    assert first.result == b"A"  # type: ignore[attr-defined]
    assert redis.calls[1] == ("mget", ["cache:b", "cache:c"])
    redis.pending[1].callback([None, b"C"])
    assert [d.result for d in waiting] == [None, b"C"]  # type: ignore[attr-defined]
    alone = store.get("d")  # nothing in flight: it goes at once, alone
    assert redis.calls[2] == ("mget", ["cache:d"])
    redis.pending[2].errback(RedisUnavailableError("down"))
    failures: list[Any] = []
    alone.addErrback(failures.append)
    assert failures and failures[0].check(RedisUnavailableError)


def test_redis_stores_wait_and_go_out_as_one_script() -> None:
    redis, clock = _ControlledRedis(), Clock()
    store = RedisStore(redis, clock)  # type: ignore[arg-type]
    first, second = store.set("a", b"1", 60), store.set("b", b"2", 30)
    assert redis.calls == []  # they wait for others
    clock.advance(STORE_DELAY)
    stored = ["cache:a", "cache:b", b"1", 60, b"2", 30]
    announced = ["cache:stored", b"60 a\n30 b"]  # for every instance's index
    assert redis.calls == [("eval", stored + announced)]
    third = store.set("c", b"3", 60)  # while a script is in flight: goes after it
    redis.pending[0].callback(None)
    assert first.called and second.called and not third.called
    assert redis.calls[1] == ("eval", ["cache:c", b"3", 60, "cache:stored", b"60 c"])
    redis.pending[1].errback(RedisUnavailableError("down"))
    failures: list[Any] = []
    third.addErrback(failures.append)
    assert failures and failures[0].check(RedisUnavailableError)
    assert redis.calls[2:] == []


@pytest_twisted.ensureDeferred
async def test_redis_store_batches_round_trip_in_real_redis() -> None:
    prefix = f"mpcapi-test:{uuid.uuid4().hex}:"
    client = RedisClient(REDIS_URL, global_reactor, prefix=prefix)
    store = RedisStore(client, global_reactor)
    try:
        await defer.gatherResults(
            [defer.ensureDeferred(_awaited(store.set(f"k{n}", b"v%d" % n, 5))) for n in range(20)]
        )
        values = await defer.gatherResults(
            [defer.ensureDeferred(_awaited(store.get(f"k{n}"))) for n in range(21)]
        )
        assert values == [b"v%d" % n for n in range(20)] + [None]
        ttl = await client.eval("return redis.call('TTL', KEYS[1])", [prefix + "cache:k7"], [])
        assert 0 < ttl <= 5
    finally:
        keys = [prefix + f"cache:k{n}" for n in range(20)]
        await client.eval("for _, k in ipairs(KEYS) do redis.call('DEL', k) end", keys, [])
        await client.close()


async def _awaited(pending: Any) -> Any:
    return await pending
