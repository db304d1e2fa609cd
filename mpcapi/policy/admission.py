"""``Admission``: the one policy in front of every API call, HTTP request or WebSocket message.

In order: who is calling (the client key, when ``MPCAPI_AUTH=keys``: not expired, not
revoked), whether their budget and their team's allow another call (the usage ledger's
spend), whether their rate limits and their team's do. Each step refuses with the
``ApiError`` the client gets (401, 429); what it learns goes on the ``Exchange`` (the key,
whether a limit refused it). Once the body names the model, ``check_model`` refuses (403) a
model outside the key's or the team's list; ``visible_models`` filters ``GET /models``.
Everything is checked against the cached key row (``mpcapi.policy.keys``): no query per call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import attrs

from mpcapi.errors import ApiError
from mpcapi.exchange import Exchange
from mpcapi.policy.access import refusal_of, visible_models
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

    def check_model(self, exchange: Exchange, model: str) -> None:
        """Refuse (403 ``model_not_allowed``) a model outside the model list of the caller's
        key or of its team (see ``mpcapi.policy.access``); without a key, every model."""
        key = exchange.key
        if key is None or (key.models is None and (key.team is None or key.team.models is None)):
            return
        refused_by = refusal_of(key, model)
        if refused_by is not None:
            raise ApiError(
                403,
                "Forbidden",
                f"model {model!r} is not allowed for {refused_by}",
                code="model_not_allowed",
                param="model",
            )

    def visible_models(self, exchange: Exchange, answer: bytes) -> bytes:
        """LiteLLM's ``GET /models`` answer, listing only the models the caller may call."""
        return visible_models(answer, exchange.key)


__all__ = ["Admission", "Budgets"]
