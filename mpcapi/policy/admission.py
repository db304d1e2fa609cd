"""``Admission``: the one policy in front of every API call, HTTP request or WebSocket message.

In order: who is calling (the client key, when ``MPCAPI_AUTH=keys``), whether their budget
allows another call (the usage ledger's spend), whether their rate limits do. Each step
refuses with the ``ApiError`` the client gets (401, 429); what it learns goes on the
``Exchange`` (the key, whether a limit refused it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import attrs

from mpcapi.errors import ApiError
from mpcapi.exchange import Exchange
from mpcapi.policy.limits import RateLimiter

if TYPE_CHECKING:
    from mpcapi.policy.keys import KeyAuthenticator
    from mpcapi.storage.keys import ClientKey


class Budgets(Protocol):
    """Refuses (429) a key whose budget is spent (``mpcapi.ledger.UsageLedger``)."""

    async def check_budget(self, key: ClientKey | None) -> None: ...


@attrs.frozen
class Admission:
    """Admits or refuses calls; ``keys`` None: auth off, ``budgets`` None: no ledger."""

    limiter: RateLimiter
    keys: KeyAuthenticator | None = None
    budgets: Budgets | None = None

    async def authenticate(self, exchange: Exchange, authorization: bytes | str | None) -> None:
        """With client keys on: the caller's key (401 without a valid one), on the exchange."""
        if self.keys is not None:
            exchange.key = await self.keys.authenticate(authorization)

    async def admit(self, exchange: Exchange, authorization: bytes | str | None) -> dict[str, str]:
        """Authenticate, check the budget, count the call against its limits. Returns the
        ``x-ratelimit-*`` headers for the answer; raises the ApiError that refuses it."""
        if self.keys is not None:  # as authenticate does, without a coroutine more per call
            exchange.key = await self.keys.authenticate(authorization)
        if self.budgets is not None:
            await self.budgets.check_budget(exchange.key)
        try:
            return await self.limiter.admit(exchange.key, exchange.client)
        except ApiError:
            exchange.rate_limited = True
            raise


__all__ = ["Admission", "Budgets"]
