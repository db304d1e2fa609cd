"""``Admission``: client key, then budget, then rate limits, for HTTP and WebSocket alike."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from mpcapi.errors import ApiError
from mpcapi.exchange import Exchange
from mpcapi.policy.admission import Admission
from mpcapi.policy.limits import MemoryWindows, RateLimiter
from mpcapi.storage.keys import ClientKey
from tests.support.keys import FakeKeys, client_key


class Budgets:
    """Refuses the keys it is given; remembers every key it was asked about."""

    def __init__(self, *spent: str) -> None:
        self.spent = set(spent)
        self.asked: list[str | None] = []

    async def check_budget(self, key: ClientKey | None) -> None:
        self.asked.append(key.id if key else None)
        if key is not None and key.id in self.spent:
            raise ApiError(429, "Too Many Requests", "budget spent")


def admission(budgets: Budgets | None = None, rpm: int = 1) -> Admission:
    keys = {"a": client_key("a", "alice"), "b": client_key("b", "bob")}
    limiter = RateLimiter(MemoryWindows(Clock()), default_rpm=rpm, default_tpm=0)
    return Admission(limiter, FakeKeys(keys), budgets)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_the_key_goes_on_the_exchange_and_the_limit_headers_come_back() -> None:
    exchange = Exchange("r", 0.0, client="10.0.0.1")
    headers = await admission().admit(exchange, b"Bearer a")
    assert exchange.key_id == "a" and exchange.user == "alice"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert not exchange.rate_limited


@pytest_twisted.ensureDeferred
async def test_a_spent_budget_refuses_before_the_limits_count() -> None:
    budgets = Budgets("a")
    policy = admission(budgets)
    refused = Exchange("r1", 0.0)
    with pytest.raises(ApiError) as error:
        await policy.admit(refused, b"Bearer a")
    assert error.value.message == "budget spent"
    assert not refused.rate_limited
    assert policy.limiter.refused == 0
    await policy.admit(Exchange("r2", 0.0), b"Bearer b")  # bob's one request is still free
    assert budgets.asked == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_over_the_limit_marks_the_exchange() -> None:
    policy = admission()
    await policy.admit(Exchange("r1", 0.0), b"Bearer a")
    second = Exchange("r2", 0.0)
    with pytest.raises(ApiError) as error:
        await policy.admit(second, b"Bearer a")
    assert error.value.status == 429
    assert second.rate_limited


@pytest_twisted.ensureDeferred
async def test_without_keys_nobody_is_authenticated_and_limits_go_by_address() -> None:
    limiter = RateLimiter(MemoryWindows(Clock()), default_rpm=1, default_tpm=0)
    policy = Admission(limiter)
    first, other = Exchange("r1", 0.0, client="10.0.0.1"), Exchange("r2", 0.0, client="10.0.0.2")
    await policy.authenticate(first, b"Bearer whatever")
    assert first.key is None
    await policy.admit(first, None)
    await policy.admit(other, None)  # another address, another window
    with pytest.raises(ApiError):
        await policy.admit(Exchange("r3", 0.0, client="10.0.0.1"), None)
