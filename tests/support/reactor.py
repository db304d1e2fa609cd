"""Waiting on the real reactor, for tests whose gateway talks to real Redis or databases."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet import defer, reactor, task

T = TypeVar("T")


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def driven(harness: Any, pending: Coroutine[Any, Any, T]) -> T:
    """Await a StubTreq request whose handling waits on the real reactor (Redis): StubTreq
    delivers the response only when flushed, so flush until it is there, and move the
    harness's clock on (it times the Redis commands)."""
    result = defer.ensureDeferred(pending)
    for _ in range(500):
        harness.flush()
        if result.called:
            break
        await sleep(0.01)
        harness.clock.advance(0.05)  # the gateway's clock times the Redis commands
    return await result
