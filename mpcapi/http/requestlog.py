"""Per-request context: the request id, and one log event when the request is over.

``RequestLogging`` wraps the Klein resource: it gives every request a ``RequestRecord``
(reachable through ``record_of``), sets ``x-request-id`` on every response, and emits
one ``twisted.logger`` event when the response is finished or the client went away.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from mpcapi.errors import bad_request, render_error
from mpcapi.http.streaming import SSERelay
from mpcapi.openai.usage import Usage

if TYPE_CHECKING:
    from mpcapi.policy.keys import ClientKey

log = Logger(namespace="mpcapi.request")

_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
_ATTRIBUTE = "_mpcapi_record"

REQUEST_FORMAT = (
    "{method} {path} {status} {duration_ms}ms request_id={request_id} model={model} "
    "upstream_status={upstream_status} bytes={bytes_sent} outcome={outcome}"
)
STREAM_FORMAT = REQUEST_FORMAT + " ttfb_ms={ttfb_ms} events={events}"


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


@attrs.define
class RequestRecord:
    """What we learn about one request while serving it; logged at its end."""

    request_id: str
    started: float
    route: str | None = None  # the OpenAI operation, e.g. "/chat/completions"
    model: str | None = None
    upstream_status: int | None = None
    upstream_seconds: float | None = None  # until LiteLLM's response headers
    upstream_failure: str | None = None  # see ApiError.upstream_failure
    usage: Usage | None = None
    stream: SSERelay | None = None
    outcome: str = "completed"
    key_id: str | None = None  # the client key's id (never the key) when auth is on
    user: str | None = None  # the key's owner
    cache: str | None = None  # hit, miss or bypass, for cacheable requests
    rate_limited: bool = False
    client_key: ClientKey | None = None  # the key's row (limits, budget) when auth is on

    def final_usage(self) -> Usage | None:
        return self.stream.usage if self.stream is not None else self.usage


def record_of(request: IRequest) -> RequestRecord:
    record: RequestRecord = getattr(request, _ATTRIBUTE)
    return record


def log_fields(request: Any, record: RequestRecord, now: float) -> dict[str, Any]:
    """The structured fields of a request's log event."""
    fields: dict[str, Any] = {
        "method": request.method.decode("ascii", "replace"),
        "path": request.path.decode("utf-8", "replace"),
        "status": request.code,
        "duration_ms": round((now - record.started) * 1000, 2),
        "request_id": record.request_id,
        "model": record.model,
        "upstream_status": record.upstream_status,
        "bytes_sent": request.sentLength,
        "outcome": record.outcome,
        "client": _client_address(request),
        "route": record.route,
        "key_id": record.key_id,
        "user": record.user,
        "cache": record.cache,
        "rate_limited": record.rate_limited,
    }
    if record.upstream_seconds is not None:
        fields["upstream_ms"] = round(record.upstream_seconds * 1000, 2)
    if record.upstream_failure is not None:
        fields["upstream_failure"] = record.upstream_failure
    usage = record.final_usage()
    if usage is not None:
        fields["prompt_tokens"] = usage.prompt_tokens
        fields["completion_tokens"] = usage.completion_tokens
        fields["cost_usd"] = usage.cost_usd
    stream = record.stream
    if stream is not None:
        first = stream.first_byte_at
        fields["ttfb_ms"] = round((first - record.started) * 1000, 2) if first else None
        fields["events"] = stream.events
        fields["content_deltas"] = stream.content_deltas
        if stream.outcome is not None and (record.outcome != "client_abort" or stream.saw_done):
            fields["outcome"] = stream.outcome.value
    return fields


def _client_address(request: Any) -> str | None:
    peer = request.getClientAddress()
    return getattr(peer, "host", None)


# Called with the fields of every finished request (metrics, the usage ledger).
RequestObserver = Callable[[dict[str, Any]], None]


class RequestLogging(Resource):
    """Wraps a leaf resource with the request id and the per-request log event."""

    isLeaf = True

    def __init__(
        self,
        wrapped: IResource,
        clock: IReactorTime,
        observers: Sequence[RequestObserver] = (),
    ) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._clock = clock
        self._observers = list(observers)

    def render(self, request: Any) -> Any:
        now = self._clock.seconds()
        record = RequestRecord(request_id=request_id_for(request, now), started=now)
        setattr(request, _ATTRIBUTE, record)
        request.setHeader(b"x-request-id", record.request_id.encode("ascii"))
        request.notifyFinish().addBoth(self._finished, request, record)
        if not _utf8(request.path):  # Klein would answer this in plain text
            message = "request path is not valid UTF-8"
            return render_error(request, bad_request(message), record.request_id)
        result = self._wrapped.render(request)
        return NOT_DONE_YET if result is NOT_DONE_YET else result

    def _finished(self, result: object, request: Any, record: RequestRecord) -> None:
        if isinstance(result, Failure):
            record.outcome = "client_abort"
        fields = log_fields(request, record, self._clock.seconds())
        log.info(STREAM_FORMAT if record.stream else REQUEST_FORMAT, **fields)
        for observe in self._observers:
            try:
                observe(fields)
            except Exception:
                log.failure("request observer {observer!r} failed", observer=observe)


def _utf8(raw: bytes) -> bool:
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
