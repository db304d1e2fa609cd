"""``Exchange``: one API call (an HTTP request or a WebSocket message), from arrival to end.

The pipeline fills it in as the call goes (who called, which route and model, what LiteLLM
answered, the stream's events, usage, cache and limit decisions); when the call is over it
is handed, whole, to every observer (the log line, metrics, rate-limit token counts, the
usage ledger). Observers read typed attributes, never string keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from mpcapi.openai.usage import Usage

if TYPE_CHECKING:
    from mpcapi.errors import ErrorFormat
    from mpcapi.storage.keys import ClientKey
    from mpcapi.tracing.context import TraceContext

WEBSOCKET = "WS"  # the method of a WebSocket message's exchange


@attrs.define(eq=False)
class Exchange:
    """What MPC-API learns about one call while serving it."""

    request_id: str
    started: float  # the clock's seconds when the call arrived
    method: str = ""  # the HTTP method, or WEBSOCKET for a WebSocket message
    path: str = ""  # the path the client used (/api/chat/completions, /v1/ws …)
    client: str | None = None  # the client's address
    route: str | None = None  # the OpenAI operation (/chat/completions); None: not API traffic
    model: str | None = None
    max_tokens: int | None = None  # the request's, as sent (traces)
    temperature: float | None = None
    key: ClientKey | None = None  # the client key (limits, budget, owner) when auth is on
    error_format: ErrorFormat = "openai"  # the shape of MPC-API's own error answers
    # The answer
    status: int = 0
    bytes_sent: int = 0
    outcome: str = "completed"
    finished: float | None = None  # the clock's seconds when the call was over
    # LiteLLM's side
    upstream_status: int | None = None
    upstream_sent_at: float | None = None  # the clock's seconds when the LiteLLM call began
    upstream_seconds: float | None = None  # until LiteLLM's response headers
    upstream_failure: str | None = None  # see ApiError.upstream_failure
    usage: Usage | None = None
    # Policy decisions
    cache: str | None = None  # hit, miss or bypass, for cacheable calls
    rate_limited: bool = False
    # Stream facts, for calls answered with an event stream
    streamed: bool = False
    first_byte_at: float | None = None
    events: int = 0  # events relayed to the client
    content_deltas: int = 0  # events that carried text (what an abandoned stream produced)
    saw_done: bool = False  # the stream's end marker came
    stream_end: str | None = None  # how the relay saw the stream end (see http.streaming)
    # With MPCAPI_LOG_BODIES: the bodies as sent (the ledger and traces store them redacted)
    request_body: bytes | None = None
    response_body: bytes | None = None  # whole answers only
    # Tracing (when an OTLP endpoint is configured): the call's W3C trace context
    trace: TraceContext | None = None
    # WebSocket messages
    message_type: str | None = None
    message_id: str | None = None

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key is not None else None

    @property
    def user(self) -> str | None:
        return self.key.user if self.key is not None else None

    @property
    def duration_ms(self) -> float:
        end = self.finished if self.finished is not None else self.started
        return round((end - self.started) * 1000, 2)

    @property
    def ttfb_ms(self) -> float | None:
        if self.first_byte_at is None:
            return None
        return round((self.first_byte_at - self.started) * 1000, 2)

    @property
    def upstream_ms(self) -> float | None:
        if self.upstream_seconds is None:
            return None
        return round(self.upstream_seconds * 1000, 2)


# Called with every finished exchange (metrics, rate-limit token counts, the usage ledger).
ExchangeObserver = Callable[[Exchange], None]


__all__ = ["WEBSOCKET", "Exchange", "ExchangeObserver"]
