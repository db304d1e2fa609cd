"""Finished exchanges for observer tests, written as the log line's fields name them."""

from __future__ import annotations

from typing import Any

from mpcapi.exchange import Exchange
from mpcapi.openai.usage import Usage
from tests.support.keys import client_key

STARTED = 1000.0


def exchange(
    *,
    duration_ms: float = 0.0,
    upstream_ms: float | None = None,
    ttfb_ms: float | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    cost_usd: float | None = None,
    key_id: str | None = None,
    user: str | None = None,
    events: int | None = None,
    started: float = STARTED,
    request_id: str = "r",
    **fields: Any,
) -> Exchange:
    """An ``Exchange`` that ended ``duration_ms`` after ``started``; tokens make its usage,
    ``key_id`` its key, ``events`` (or ``ttfb_ms``) makes it a stream."""
    found = Exchange(request_id=request_id, started=started, **fields)
    found.finished = started + duration_ms / 1000
    if upstream_ms is not None:
        found.upstream_seconds = upstream_ms / 1000
    if ttfb_ms is not None:
        found.first_byte_at = started + ttfb_ms / 1000
    if prompt_tokens is not None or completion_tokens is not None:
        found.usage = Usage(prompt_tokens or 0, completion_tokens or 0, cost_usd)
    if key_id is not None:
        found.key = client_key(key_id, user or "")
    if events is not None or ttfb_ms is not None:
        found.streamed = True
        found.events = events or 0
    return found
