"""The index of the answers the Redis cache holds: learnt from the stores' announcements and
from a scan at each subscription, trusted only between the two, bounded in size.

Two ``RedisStore``s on one prefix stand for two MPC-API instances sharing one Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock

from mpcapi.config.settings import Settings
from mpcapi.policy.cache import RedisStore, ResponseCache
from mpcapi.policy.cacheindex import KeyIndex, announcement, channel_of
from mpcapi.storage.redis import RedisClient, RedisUnavailableError
from tests.support.logs import captured
from tests.support.ports import free_port
from tests.support.reactor import sleep
from tests.support.redisserver import REDIS_SERVER, RedisServer, redis_server
from tests.support.redisserver import SHARED_REDIS_URL as REDIS_URL


class CountingClient(RedisClient):
    """A real client that counts its MGETs (the round trips the index saves)."""

    mgets = 0

    async def mget(self, keys: Any) -> list[bytes | None]:
        self.mgets += 1
        return await super().mget(keys)


class Instance:
    """One instance's client, index and store."""

    def __init__(self, url: str, prefix: str, max_keys: int = 10_000, rebuild: float = 60) -> None:
        self.client = CountingClient(url, reactor, prefix=prefix)
        self.index = KeyIndex(self.client, reactor, max_keys, rebuild_after=rebuild)
        self.store = RedisStore(self.client, reactor, self.index)

    async def started(self) -> Instance:
        """Its index subscribed and scanned (what its first lookup starts)."""
        self.index.start()
        await until(lambda: self.index.ready)
        return self


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await sleep(0.01)


@asynccontextmanager
async def instances(url: str = REDIS_URL, **options: Any) -> AsyncIterator[Any]:
    """A factory of instances on a key prefix of their own; closed and cleaned up after."""
    prefix = f"mpcapi-test:{uuid.uuid4().hex}:"
    made: list[Instance] = []

    def make(**more: Any) -> Instance:
        made.append(Instance(url, prefix, **{**options, **more}))
        return made[-1]

    try:
        yield make
    finally:
        for instance in made:
            await instance.client.close()
        cleaner = RedisClient(url, reactor, prefix=prefix)
        try:
            script = "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end"
            await cleaner.eval(script, [], [prefix + "*"])
        finally:
            await cleaner.close()


@pytest_twisted.ensureDeferred
async def test_an_answer_stored_by_one_instance_is_known_to_the_other() -> None:
    async with instances() as make:
        one, two = make(), await make().started()
        await one.store.set("k1", b"answer", 60)
        await until(lambda: two.index.may_hold("k1"))
        assert await two.store.get("k1") == b"answer"
        assert two.client.mgets == 1
        # A key nobody stored: a miss without asking Redis.
        assert await two.store.get("never-stored") is None
        assert two.client.mgets == 1


@pytest_twisted.ensureDeferred
async def test_answers_stored_before_the_subscription_are_found_by_its_scan() -> None:
    async with instances() as make:
        one = make()
        # Three pages of the scan.
        await gatherResults([one.store.set(f"old{n}", b"v%d" % n, 60) for n in range(2500)])
        two = await make().started()
        assert len(two.index) == 2500
        assert await two.store.get("old1234") == b"v1234"
        assert await two.store.get("new") is None
        assert two.client.mgets == 1


@pytest_twisted.ensureDeferred
async def test_until_the_index_is_ready_every_lookup_asks_redis() -> None:
    async with instances() as make:
        one = make()
        assert not one.index.ready
        assert one.index.may_hold("anything")
        assert await one.store.get("anything") is None  # asked: it started the subscription
        assert one.client.mgets == 1
        await until(lambda: one.index.ready)
        assert await one.store.get("anything") is None
        assert one.client.mgets == 1


@pytest_twisted.ensureDeferred
async def test_a_glob_character_in_the_prefix_is_matched_literally() -> None:
    async with instances() as make:
        one = make()
        # Another prefix that the unescaped pattern "mpcapi-test:[x]*:cache:*" would match.
        tricky = RedisClient(REDIS_URL, reactor, prefix="mpcapi-test:[x]*:")
        other = RedisClient(REDIS_URL, reactor, prefix="mpcapi-test:x-other:")
        try:
            await other.set(other.key("cache", "theirs"), b"v", 60)
            index = KeyIndex(tricky, reactor, 100, rebuild_after=60)
            index.start()
            await until(lambda: index.ready)
            assert len(index) == 0
            assert one.index.may_hold("theirs")  # not started: asks Redis
        finally:
            await other.eval("redis.call('DEL', KEYS[1])", [other.key("cache", "theirs")], [])
            await tricky.close()
            await other.close()


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
@pytest_twisted.ensureDeferred
async def test_a_lost_subscription_is_not_trusted_and_is_rebuilt_after_reconnecting() -> None:
    with redis_server() as server:
        async with instances(server.url) as make:
            one, two = make(), await make().started()
            await one.store.set("before", b"1", 60)
            await until(lambda: two.index.may_hold("before"))
            server.stop()
            await until(lambda: not two.index.ready)
            assert two.index.may_hold("anything")  # unsure: asks Redis
            server.start()  # a fresh server: "before" is gone
            await until(lambda: two.index.ready, seconds=15)
            assert len(two.index) == 0
            await until(lambda: one.client.available or not one.client.errors)
            stored = False
            while not stored:  # the store client reconnects on its own schedule
                try:
                    await one.store.set("after", b"2", 60)
                    stored = True
                except Exception:
                    await sleep(0.2)
            await until(lambda: two.index.may_hold("after"))
            assert await two.store.get("after") == b"2"


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")
@pytest_twisted.ensureDeferred
async def test_the_subscription_authenticates_like_the_commands() -> None:
    server = RedisServer(free_port(), password="s3cret-subscriber")
    server.start()
    try:
        async with instances(server.url) as make:
            one, two = make(), await make().started()
            await one.store.set("k", b"v", 60)
            await until(lambda: two.index.may_hold("k"))
            assert not two.index.may_hold("other")
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_a_full_index_asks_redis_for_everything_then_rebuilds() -> None:
    async with instances(max_keys=3, rebuild=0.3) as make:
        one = await make().started()
        with captured("mpcapi.cache") as events:
            await one.store.set("a", b"1", 60)
            await one.store.set("b", b"2", 60)
            await until(lambda: len(one.index) == 2)
            await one.store.set("c", b"3", 60)
            await one.store.set("d", b"4", 60)
            await until(lambda: not one.index.ready)
            assert len(one.index) == 0
            assert one.index.may_hold("e")
            assert [e["max_keys"] for e in events if "more than" in e["log_format"]] == [3]
            # The rebuild scans four answers: full again, until the next rebuild.
            await sleep(0.5)
            assert not one.index.ready
            assert len(events) >= 2
            assert await one.store.get("d") == b"4"


def test_the_daemons_index_is_bounded_by_the_cache_size_and_rebuilds_after_the_ttl() -> None:
    client = RedisClient("redis://127.0.0.1:1", reactor)

    def index_of(**settings: Any) -> Any:
        cache = ResponseCache.from_settings(Settings(**settings), Clock(), client)
        return cache.store.index  # type: ignore[attr-defined]

    default = index_of(cache_ttl=600)
    assert (default.max_keys, default.rebuild_after) == (419_430, 600)  # 64 MiB / 160 bytes
    short = index_of(cache_ttl=5, cache_max_bytes=16_000)
    assert (short.max_keys, short.rebuild_after) == (100, 60)  # at least a minute


def test_answers_are_known_until_their_ttl_ends_and_then_swept() -> None:
    clock = Clock()
    index = KeyIndex(_Unused(), clock, max_keys=100, rebuild_after=60)  # type: ignore[arg-type]
    index.subscribed()
    index.ready = True  # as after the scan (which _Unused never answers)
    index.message(announcement([("short", 5), ("long", 60)]))
    assert index.may_hold("short") and index.may_hold("long")
    assert not index.may_hold("other")
    clock.advance(5)
    assert not index.may_hold("short")
    assert index.may_hold("long")
    clock.advance(1)
    assert len(index) == 1  # swept
    index.message(announcement([("long", 600)]))  # stored again: known for longer
    clock.advance(100)
    assert index.may_hold("long")
    index.unsubscribed()
    assert not index.ready and len(index) == 0 and index.may_hold("short")


def test_a_resubscription_while_full_builds_at_once_and_hears_announcements() -> None:
    clock, redis = Clock(), _Unused()
    index = KeyIndex(redis, clock, max_keys=2, rebuild_after=60)  # type: ignore[arg-type]
    index.subscribed()
    index.message(announcement([("a", 60), ("b", 60), ("c", 60)]))  # full
    assert len(index) == 0
    index.unsubscribed()
    index.subscribed()  # reconnected before the rebuild was due
    index.message(announcement([("d", 60)]))
    assert len(index) == 1  # heard, not dropped as while full
    clock.advance(60)  # the old rebuild is cancelled: no second scan
    assert len(redis.scans) == 2


def test_a_scan_that_fails_is_tried_again_later_and_later() -> None:
    clock, redis = Clock(), _Refusing(failures=3)
    index = KeyIndex(redis, clock, max_keys=100, rebuild_after=60)  # type: ignore[arg-type]
    index.subscribed()
    attempts = []
    for wait in (0, 1, 2, 3.9, 0.1):  # 1 s, then 2 s, then 4 s between attempts
        clock.advance(wait)
        attempts.append(redis.calls)
    assert attempts == [1, 2, 3, 3, 4]
    assert index.ready


def test_a_bad_announcement_line_is_ignored_and_logged() -> None:
    index = KeyIndex(_Unused(), Clock(), max_keys=100, rebuild_after=60)  # type: ignore[arg-type]
    with captured("mpcapi.cache") as events:
        index.message(b"soon k1\n60 k2")
    assert len(index) == 1
    assert len(events) == 1 and b"soon k1" in events[0]["line"]


def test_the_channel_and_the_announcement() -> None:
    client = RedisClient("redis://127.0.0.1:1", reactor, prefix="p:")
    assert channel_of(client) == "p:cache:stored"
    assert announcement([("k1", 60), ("k2", 5)]) == b"60 k1\n5 k2"


class _Unused:
    """A RedisClient whose commands never answer: the index's scan waits forever."""

    def key(self, *parts: str) -> str:
        return "p:" + ":".join(parts)

    def __init__(self) -> None:
        self.scans: list[Any] = []

    def eval(self, *args: Any) -> Any:
        from twisted.internet.defer import Deferred

        self.scans.append(args)
        return Deferred()


class _Refusing(_Unused):
    """A RedisClient whose first ``failures`` scans fail; then an empty Redis."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.calls = 0

    def eval(self, *args: Any) -> Any:
        from twisted.internet.defer import fail, succeed

        self.calls += 1
        if self.calls <= self.failures:
            return fail(RedisUnavailableError("refused"))
        return succeed([b"0", []])
