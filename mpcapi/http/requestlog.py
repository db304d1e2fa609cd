"""Per-call context: the request id, the ``Exchange``, and one log event when it is over.

``RequestLogging`` wraps the Klein resource: it gives every request an ``Exchange``
(reachable through ``exchange_of``), sets ``x-request-id`` on every response, and when the
response is finished or the client went away, ``report``s the exchange: one
``twisted.logger`` event, then every observer. WebSocket messages are reported the same way.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from mpcapi.errors import ErrorFormat, bad_request, render_error
from mpcapi.exchange import WEBSOCKET, Exchange, ExchangeObserver
from mpcapi.openai.routes import anthropic_path

if TYPE_CHECKING:
    from mpcapi.tracing.context import TraceContext

log = Logger(namespace="mpcapi.request")

_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")

REQUEST_FORMAT = (
    "{method} {path} {status} {duration_ms}ms request_id={request_id} model={model} "
    "upstream_status={upstream_status} bytes={bytes_sent} outcome={outcome}"
)
STREAM_FORMAT = REQUEST_FORMAT + " ttfb_ms={ttfb_ms} events={events}"
WEBSOCKET_FORMAT = STREAM_FORMAT + " type={ws_type}"
TRACE_SUFFIX = " trace_id={trace_id}"  # with tracing on


# The request's attribute that holds its ``Exchange`` (see ``exchange_of``): a plain
# attribute, read several times per request, where a component lookup costs a dozen calls.
EXCHANGE_ATTRIBUTE = "mpcapi_exchange"


def request_id_for(request: IRequest, now: float | None = None) -> str:
    """The client's ``x-request-id`` when it is sane, otherwise a fresh one."""
    given = request.getHeader(b"x-request-id")
    if given is not None:
        raw = given.encode("latin-1") if isinstance(given, str) else given
        if _SANE_REQUEST_ID.match(raw):
            return raw.decode("ascii")
    return new_request_id(time.time() if now is None else now)


# Seeded from os.urandom when the module loads (each worker is its own process).
_random_bits = random.Random().getrandbits


def new_request_id(now: float) -> str:
    """32 hex digits: the time in milliseconds, then 80 random bits (as a UUIDv7 orders
    them). Ids made later sort later, so the ledger's primary key grows at its end instead
    of at random places. The random part only has to be unique, not secret: the generator
    seeded from the system's at start costs no system call per request."""
    return f"{int(now * 1000) & 0xFFFFFFFFFFFF:012x}{_random_bits(80):020x}"


def exchange_of(request: IRequest) -> Exchange:
    """The ``Exchange`` that ``RequestLogging`` gave ``request``."""
    exchange: Exchange = getattr(request, EXCHANGE_ATTRIBUTE, None)  # type: ignore[assignment]
    return exchange


def log_fields(exchange: Exchange) -> dict[str, Any]:
    """The structured fields of an exchange's log event."""
    fields: dict[str, Any] = {
        "method": exchange.method,
        "path": exchange.path,
        "status": exchange.status,
        "duration_ms": exchange.duration_ms,
        "request_id": exchange.request_id,
        "model": exchange.model,
        "upstream_status": exchange.upstream_status,
        "bytes_sent": exchange.bytes_sent,
        "outcome": exchange.outcome,
        "client": exchange.client,
        "route": exchange.route,
        "key_id": exchange.key_id,
        "user": exchange.user,
        "cache": exchange.cache,
        "rate_limited": exchange.rate_limited,
    }
    if exchange.trace is not None:
        fields["trace_id"] = exchange.trace.trace_id_hex
    if exchange.upstream_seconds is not None:
        fields["upstream_ms"] = exchange.upstream_ms
    if exchange.upstream_failure is not None:
        fields["upstream_failure"] = exchange.upstream_failure
    usage = exchange.usage
    if usage is not None:
        fields["prompt_tokens"] = usage.prompt_tokens
        fields["completion_tokens"] = usage.completion_tokens
        fields["cost_usd"] = usage.cost_usd
    if exchange.streamed:
        fields["ttfb_ms"] = exchange.ttfb_ms
        fields["events"] = exchange.events
        fields["content_deltas"] = exchange.content_deltas
    if exchange.method == WEBSOCKET:
        fields["ws_type"] = exchange.message_type
        fields["ws_id"] = exchange.message_id[:128] if exchange.message_id is not None else None
    return fields


def report(exchange: Exchange, observers: Sequence[ExchangeObserver]) -> None:
    """A finished exchange: its log event, then every observer (one failing is logged)."""
    if exchange.method == WEBSOCKET:
        text = WEBSOCKET_FORMAT
    else:
        text = STREAM_FORMAT if exchange.streamed else REQUEST_FORMAT
    if exchange.trace is not None:
        text += TRACE_SUFFIX
    log.info(text, **log_fields(exchange))
    for observe in observers:
        try:
            observe(exchange)
        except Exception:
            log.failure("exchange observer {observer!r} failed", observer=observe)


class RequestLogging(Resource):
    """Wraps a leaf resource with the request id, the ``Exchange`` and its report."""

    isLeaf = True

    def __init__(
        self,
        wrapped: IResource,
        clock: IReactorTime,
        observers: Sequence[ExchangeObserver] = (),
        error_format: ErrorFormat = "openai",
        trace_of: Callable[[IRequest], TraceContext] | None = None,
    ) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._clock = clock
        self._observers = list(observers)
        self._error_format = error_format
        self._trace_of = trace_of

    def render(self, request: Any) -> Any:
        now = self._clock.seconds()
        path = request.path.decode("utf-8", "replace")
        exchange = Exchange(
            request_id=request_id_for(request, now),
            started=now,
            method=request.method.decode("ascii", "replace"),
            path=path,
            client=getattr(request.getClientAddress(), "host", None),
            error_format="anthropic" if anthropic_path(path) else self._error_format,
        )
        if self._trace_of is not None:
            exchange.trace = self._trace_of(request)
        setattr(request, EXCHANGE_ATTRIBUTE, exchange)
        request.setHeader(b"x-request-id", exchange.request_id.encode("ascii"))
        request.notifyFinish().addBoth(self._finished, request, exchange)
        if not _utf8(request.path):  # Klein would answer this in plain text
            message = "request path is not valid UTF-8"
            return render_error(request, bad_request(message), exchange)
        result = self._wrapped.render(request)
        return NOT_DONE_YET if result is NOT_DONE_YET else result

    def _finished(self, result: object, request: Any, exchange: Exchange) -> None:
        if isinstance(result, Failure):
            exchange.outcome = "client_abort"
        exchange.finished = self._clock.seconds()
        exchange.status = request.code
        exchange.bytes_sent = request.sentLength
        end = exchange.stream_end
        if end is not None and (exchange.outcome != "client_abort" or exchange.saw_done):
            exchange.outcome = end
        report(exchange, self._observers)


def _utf8(raw: bytes) -> bool:
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
