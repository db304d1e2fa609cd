"""Rate limits: requests and tokens per minute, per key or client address, in memory and Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock

from mpcapi.errors import ApiError
from mpcapi.exchange import Exchange
from mpcapi.policy.admission import Admission
from mpcapi.policy.limits import (
    Counts,
    MemoryWindows,
    RateLimiter,
    RedisWindows,
    duration_text,
    limit_headers,
)
from mpcapi.storage.redis import RedisClient, RedisUnavailableError, parse_redis_url
from tests.support.gateway import (
    CHAT,
    Harness,
    header,
    json_body,
    make_harness,
)
from tests.support.keys import bearer, client_key, keyed_harness
from tests.support.redisserver import SHARED_REDIS_URL as REDIS_URL

TRIO = ("limit", "remaining", "reset")


def limit_of(response: Any, kind: str = "requests") -> dict[str, str | None]:
    return {part: header(response, f"x-ratelimit-{part}-{kind}") for part in TRIO}


# --- requests per minute --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_third_request_of_two_per_minute_is_a_429_with_retry_after() -> None:
    harness = make_harness(default_rpm=2)
    first = await harness.post("/api/chat/completions", CHAT)
    harness.clock.advance(12)
    second = await harness.post("/api/chat/completions", CHAT)
    third = await harness.post("/api/chat/completions", CHAT)

    assert (first.code, second.code, third.code) == (200, 200, 429)
    document = await json_body(third)
    assert document["error"]["code"] == "rate_limit_exceeded"
    assert document["message"] == "rate limit of 2 requests per minute reached; retry in 48s"
    assert document["request_id"] == header(third, "x-request-id")
    assert header(third, "retry-after") == "48"
    assert header(third, "retry-after-ms") == "48000"
    assert header(third, "content-type") == "application/json"
    assert len(harness.fake.seen) == 2  # the refused request never reached LiteLLM


@pytest_twisted.ensureDeferred
async def test_every_response_of_a_limited_client_carries_the_header_trio() -> None:
    harness = make_harness(default_rpm=3)
    responses = []
    for _ in range(4):
        responses.append(await harness.post("/api/chat/completions", CHAT))
        harness.clock.advance(1.5)
    assert [r.code for r in responses] == [200, 200, 200, 429]
    assert [limit_of(r) for r in responses] == [
        {"limit": "3", "remaining": "2", "reset": "1m0s"},
        {"limit": "3", "remaining": "1", "reset": "59s"},  # 58.5 s, rounded up
        {"limit": "3", "remaining": "0", "reset": "57s"},
        {"limit": "3", "remaining": "0", "reset": "56s"},
    ]
    assert limit_of(responses[0], "tokens") == dict.fromkeys(TRIO)  # no tokens limit


@pytest_twisted.ensureDeferred
async def test_errors_and_other_routes_count_and_carry_the_headers_too() -> None:
    harness = make_harness(default_rpm=2)
    invalid = await harness.post("/api/chat/completions", b"{not json")
    models = await harness.get("/api/models")
    assert (invalid.code, models.code) == (400, 200)
    assert limit_of(invalid)["remaining"] == "1"
    assert limit_of(models)["remaining"] == "0"
    assert (await harness.post("/v1/embeddings", {"model": "e", "input": "x"})).code == 429


@pytest_twisted.ensureDeferred
async def test_the_window_ends_a_minute_after_its_first_request() -> None:
    harness = make_harness(default_rpm=1)
    assert (await harness.post("/api/chat/completions", CHAT)).code == 200
    harness.clock.advance(59.9)
    refused = await harness.post("/api/chat/completions", CHAT)
    assert refused.code == 429
    assert limit_of(refused)["reset"] == "100ms"
    assert header(refused, "retry-after") == "1"
    assert header(refused, "retry-after-ms") == "100"
    harness.clock.advance(0.1)
    again = await harness.post("/api/chat/completions", CHAT)
    assert again.code == 200
    assert limit_of(again) == {"limit": "1", "remaining": "0", "reset": "1m0s"}


@pytest_twisted.ensureDeferred
async def test_no_limit_no_headers(harness: Harness) -> None:
    for _ in range(5):
        response = await harness.post("/api/chat/completions", CHAT)
        assert response.code == 200
        assert limit_of(response) == dict.fromkeys(TRIO)


# --- tokens per minute ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens_per_minute_count_the_usage_of_answers() -> None:
    harness = make_harness(default_tpm=10)  # every answer uses 3 + 1 tokens
    responses = [await harness.post("/api/chat/completions", CHAT) for _ in range(4)]
    assert [r.code for r in responses] == [200, 200, 200, 429]
    assert [limit_of(r, "tokens")["remaining"] for r in responses] == ["10", "6", "2", "0"]
    assert limit_of(responses[0]) == dict.fromkeys(TRIO)  # no requests limit
    document = await json_body(responses[3])
    assert document["message"] == "rate limit of 10 tokens per minute reached; retry in 1m0s"
    assert header(responses[3], "retry-after") == "60"
    harness.clock.advance(60)
    assert (await harness.post("/api/chat/completions", CHAT)).code == 200


@pytest_twisted.ensureDeferred
async def test_tokens_of_streams_count_from_their_usage_chunk() -> None:
    harness = make_harness(default_tpm=20)
    usage = {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}
    final = b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"

    def stream(request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/event-stream")
        return final + b"data: [DONE]\n\n"

    harness.fake.routes[("POST", "/chat/completions")] = stream
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    first = await harness.post("/api/chat/completions", body)
    await first.content()
    second = await harness.post("/api/chat/completions", body)
    assert (first.code, second.code) == (200, 429)
    assert limit_of(second, "tokens") == {"limit": "20", "remaining": "0", "reset": "1m0s"}


@pytest_twisted.ensureDeferred
async def test_both_limits_report_both_trios() -> None:
    harness = make_harness(default_rpm=5, default_tpm=100)
    response = await harness.post("/api/chat/completions", CHAT)
    assert limit_of(response) == {"limit": "5", "remaining": "4", "reset": "1m0s"}
    assert limit_of(response, "tokens") == {"limit": "100", "remaining": "100", "reset": "1m0s"}
    response = await harness.post("/api/chat/completions", CHAT)
    assert limit_of(response, "tokens")["remaining"] == "96"


# --- per key, per address -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_limits_are_per_key_and_a_key_may_set_its_own() -> None:
    keys = {
        "key_a": client_key("key_a", "alice"),  # the default: 1 per minute
        "key_b": client_key("key_b", "bob", rpm=3),
        "key_c": client_key("key_c", "carol", rpm=0),  # unlimited
    }
    harness = keyed_harness(keys, default_rpm=1)

    async def codes(token: str, n: int) -> list[int]:
        return [
            (await harness.post("/api/chat/completions", CHAT, **bearer(token))).code
            for _ in range(n)
        ]

    assert await codes("key_a", 2) == [200, 429]
    assert await codes("key_b", 4) == [200, 200, 200, 429]
    assert await codes("key_c", 5) == [200] * 5
    response = await harness.post("/api/chat/completions", CHAT, **bearer("key_c"))
    assert limit_of(response) == dict.fromkeys(TRIO)


@pytest_twisted.ensureDeferred
async def test_a_keys_own_tokens_limit_counts_its_tokens() -> None:
    keys = {"key_t": client_key("key_t", "tess", tpm=5), "key_u": client_key("key_u", "ugo")}
    harness = keyed_harness(keys)
    codes = []
    for token in ("key_t", "key_t", "key_u", "key_u", "key_t"):
        codes.append((await harness.post("/api/chat/completions", CHAT, **bearer(token))).code)
    assert codes == [200, 200, 200, 200, 429]  # 4 + 4 tokens > 5; key_u is unlimited


@pytest_twisted.ensureDeferred
async def test_without_auth_the_limit_is_per_client_address() -> None:
    clock = Clock()
    admission = Admission(RateLimiter(MemoryWindows(clock), default_rpm=1, default_tpm=0))
    exchanges = [Exchange("r", 0.0, client=host) for host in ("10.0.0.1", "10.0.0.2", "10.0.0.1")]
    outcomes = []
    for exchange in exchanges:
        try:
            headers = await admission.admit(exchange, None)
            outcomes.append(headers["x-ratelimit-remaining-requests"])
        except ApiError as error:
            outcomes.append(str(error.status))
    assert outcomes == ["0", "0", "429"]
    assert [exchange.rate_limited for exchange in exchanges] == [False, False, True]
    assert admission.limiter.refused == 1


@pytest_twisted.ensureDeferred
async def test_admit_takes_the_identity_without_a_request() -> None:
    """What the WebSocket uses: the key (or None) and the client address, no IRequest."""
    clock = Clock()
    limiter = RateLimiter(MemoryWindows(clock), default_rpm=1, default_tpm=0)
    own = client_key("key_own", "alice", rpm=2)
    assert await limiter.admit(None, "10.0.0.1") == {
        "x-ratelimit-limit-requests": "1",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
    }
    assert await limiter.admit(None, "10.0.0.2")  # another address, another window
    assert await limiter.admit(own, "10.0.0.1")  # a key is counted apart from its address
    assert await limiter.admit(own, "10.0.0.2")
    clock.advance(15)
    for key, address in ((None, "10.0.0.1"), (own, "10.0.0.3")):
        with pytest.raises(ApiError) as refused:
            await limiter.admit(key, address)
        assert refused.value.status == 429
        assert refused.value.headers["Retry-After"] == "45"
    assert limiter.refused == 2
    assert await limiter.admit(client_key("key_free", "bob", rpm=0), "10.0.0.1") == {}


def test_duration_text_is_what_openai_sends() -> None:
    assert [duration_text(s) for s in (0.0004, 0.02, 1, 12.2, 59.5, 60, 61, 600)] == [
        "1ms",
        "20ms",
        "1s",
        "13s",
        "1m0s",
        "1m0s",
        "1m1s",
        "10m0s",
    ]
    counts = Counts(True, requests=2, requests_reset=5, tokens=7, tokens_reset=30)
    assert limit_headers(3, 0, counts) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "5s",
    }


def test_memory_windows_forget_expired_windows() -> None:
    clock = Clock()
    windows = MemoryWindows(clock)
    for n in range(100):
        windows._current(f"r:{n}", clock.seconds()).used += 1
    clock.advance(61)
    windows._sweep(clock.seconds())
    assert windows._windows == {}


# --- Redis ----------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def redis_client() -> AsyncIterator[RedisClient]:
    client = RedisClient(REDIS_URL, global_reactor, prefix=f"mpcapi-test:{uuid.uuid4().hex}:")
    yield client
    await _cleanup(client)


async def _cleanup(client: RedisClient) -> None:
    script = "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end"
    try:
        await client.eval(script, [], [client.prefix + "*"])
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_redis_windows_count_requests_and_tokens(redis_client: RedisClient) -> None:
    windows = RedisWindows(redis_client, global_reactor)
    first = await windows.admit("addr:1", 2, 10)
    second = await windows.admit("addr:1", 2, 10)
    third = await windows.admit("addr:1", 2, 10)
    assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
    assert (first.requests, second.requests, third.requests) == (1, 2, 2)
    assert 59 < third.requests_reset <= 60
    assert (await windows.admit("addr:2", 2, 10)).allowed  # another identity
    windows.add_tokens("addr:3", 10)
    refused = await windows.admit("addr:3", 0, 10)
    assert not refused.allowed
    assert refused.tokens == 10
    assert 59 < refused.tokens_reset <= 60


@pytest_twisted.ensureDeferred
async def test_redis_tokens_go_with_the_next_admission_or_on_their_own(
    redis_client: RedisClient,
) -> None:
    clock = Clock()
    windows = RedisWindows(redis_client, clock)
    windows.add_tokens("addr:1", 4)
    windows.add_tokens("addr:1", 3)
    counts = await windows.admit("addr:1", 0, 100)
    assert counts.tokens == 7  # added by the admission's own script
    windows.add_tokens("addr:2", 5)
    assert (await windows.admit("addr:3", 0, 100)).tokens == 0
    clock.advance(0.25)  # nobody admitted addr:2: its tokens go on their own
    assert windows.flushing is not None
    await windows.flushing
    assert (await windows.admit("addr:2", 0, 100)).tokens == 5


@pytest_twisted.ensureDeferred
async def test_redis_high_limits_are_admitted_locally_between_scripts(
    redis_client: RedisClient,
) -> None:
    clock = Clock()
    windows = RedisWindows(redis_client, clock)
    scripts = done = 0
    original = redis_client.eval

    async def counted(*args: Any) -> Any:
        nonlocal scripts, done
        scripts += 1
        result = await original(*args)
        done += 1
        return result

    redis_client.eval = counted  # type: ignore[method-assign]
    counts = [await windows.admit("addr:1", 2000, 0) for _ in range(11)]
    assert [c.requests for c in counts] == list(range(1, 12))
    assert scripts == 1  # one script; ten admitted here
    clock.advance(0.1)  # the lease ends, and the ten are added in Redis
    for _ in range(100):
        if done == 2:
            break
        await task.deferLater(global_reactor, 0.01, lambda: None)
    assert (scripts, done) == (2, 2)
    assert (await windows.admit("addr:1", 2000, 0)).requests == 12
    assert scripts == 3


@pytest_twisted.ensureDeferred
async def test_redis_admissions_while_the_lease_is_renewed_wait_for_that_one_script(
    redis_client: RedisClient,
) -> None:
    windows = RedisWindows(redis_client, Clock())
    scripts = 0
    original = redis_client.eval

    async def counted(*args: Any) -> Any:
        nonlocal scripts
        scripts += 1
        return await original(*args)

    redis_client.eval = counted  # type: ignore[method-assign]
    together = [defer.ensureDeferred(windows.admit("addr:1", 2000, 0)) for _ in range(20)]
    counts = await defer.gatherResults(together)
    assert scripts == 1  # not one per admission: the other 19 used its answer
    assert sorted(c.requests for c in counts) == list(range(1, 21))
    assert all(c.allowed for c in counts)


@pytest_twisted.ensureDeferred
async def test_redis_near_a_high_limit_every_admission_asks_redis(
    redis_client: RedisClient,
) -> None:
    windows = RedisWindows(redis_client, Clock())
    from mpcapi.policy.limits import _ADMIT

    keys = windows._keys("addr:1")
    await redis_client.eval(_ADMIT, keys, [0, 0, 60000, 0, 899])  # 899 requests so far
    counts = [await windows.admit("addr:1", 1000, 0) for _ in range(3)]
    assert [c.requests for c in counts] == [900, 901, 902]
    assert windows._known["addr:1"].unsynced == 0  # all three went to Redis
    await redis_client.eval(_ADMIT, keys, [0, 0, 60000, 0, 98])  # another instance: 1000
    assert not (await windows.admit("addr:1", 1000, 0)).allowed


@pytest_twisted.ensureDeferred
async def test_redis_windows_end_when_redis_expires_them(redis_client: RedisClient) -> None:
    windows = RedisWindows(redis_client, global_reactor, window=0.2)
    assert (await windows.admit("addr:1", 1, 0)).allowed
    assert not (await windows.admit("addr:1", 1, 0)).allowed
    await task.deferLater(global_reactor, 0.3, lambda: None)
    assert (await windows.admit("addr:1", 1, 0)).allowed


@pytest_twisted.ensureDeferred
async def test_redis_down_fails_open_counted_and_fast() -> None:
    from tests.support.ports import closed_port
    from tests.support.reactor import driven

    with closed_port() as port:
        harness = make_harness(default_rpm=1, redis_url=f"redis://127.0.0.1:{port}")
        codes = []
        for _ in range(3):
            response = await driven(harness, harness.post("/api/chat/completions", CHAT))
            codes.append(response.code)
            assert limit_of(response) == dict.fromkeys(TRIO)  # no counts to report
        assert codes == [200, 200, 200]
        assert harness.gateway is not None
        redis = harness.parts.redis
        assert redis is not None
        assert (redis.outages, redis.errors, redis.available) == (1, 3, False)
        with pytest.raises(RedisUnavailableError):
            await redis.get("x")
        await redis.close()


def test_redis_urls() -> None:
    assert parse_redis_url("redis://:pw@redis.local:6380/2").password == "pw"
    address = parse_redis_url("redis://redis.local:6380/2")
    assert (address.host, address.port, address.db) == ("redis.local", 6380, 2)
    assert parse_redis_url("redis://127.0.0.1").port == 6379
    assert parse_redis_url("unix:///run/redis.sock?db=1").path == "/run/redis.sock"
