"""The shared Redis client: time limits, fail-fast during an outage, one log line each way.

Uses a ``redis-server`` of its own (started on a free port, no persistence) so that it can
stop and restart it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from mpcapi.storage.redis import RedisClient, RedisUnavailableError
from tests.support.logs import captured
from tests.support.ports import closed_port
from tests.support.reactor import sleep
from tests.support.redisserver import REDIS_SERVER, redis_server

needs_redis_server = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed")


@needs_redis_server
@pytest_twisted.ensureDeferred
async def test_an_outage_is_logged_once_fails_fast_and_recovers() -> None:
    with redis_server() as server, captured("mpcapi.redis") as events:
        reported: list[bool] = []  # what the metrics are told: whether an outage began
        client = RedisClient(
            server.url, reactor, prefix="t:", connect_timeout=0.5, report_failure=reported.append
        )
        try:
            await client.set("t:k", b"v", expire=60)
            assert await client.get("t:k") == b"v"
            server.stop()
            for _ in range(20):
                with pytest.raises(RedisUnavailableError):
                    await client.get("t:k")
            assert (client.available, client.outages, client.errors) == (False, 1, 20)
            assert reported == [True] + [False] * 19
            assert len(events) == 1
            assert "unavailable" in events[0]["log_format"]
            started = time.monotonic()
            with pytest.raises(RedisUnavailableError):
                await client.get("t:k")
            assert time.monotonic() - started < 0.05  # no waiting during the outage

            server.start()
            deadline = time.monotonic() + 10
            value = "not yet"
            while time.monotonic() < deadline:
                try:
                    value = await client.get("t:k")  # a fresh server: the key is gone
                    break
                except RedisUnavailableError:
                    await sleep(0.2)
            assert value is None
            assert client.available
            assert len(events) == 2
            assert "available again" in events[1]["log_format"]
        finally:
            await client.close()


@pytest_twisted.ensureDeferred
async def test_nothing_listening_is_an_outage_not_an_error() -> None:
    with closed_port() as port:
        client = RedisClient(f"redis://127.0.0.1:{port}", reactor, connect_timeout=0.2)
        started = time.monotonic()
        with pytest.raises(RedisUnavailableError):
            await client.get("x")
        assert time.monotonic() - started < 2
        assert client.outages == 1
        await client.close()


def test_nothing_connects_before_the_first_command() -> None:
    made: list[Any] = []
    client = RedisClient("redis://127.0.0.1:1", reactor, connect=lambda *a: made.append(a))
    assert made == []
    assert client.key("rl", "r", "x") == "mpcapi:rl:r:x"
