"""The WebSocket endpoint ``/api/ws`` (alias ``/v1/ws``): streamed completions over one socket.

Messages are JSON text. The client sends ``{"id", "type": "chat.completions" | "completions",
"body"}``; the body is validated like the HTTP route's and always streamed from LiteLLM. The
server answers ``{"id", "type": "chunk", "data"}`` for each SSE event, then ``{"id", "type":
"done"}``, or one ``{"id", "type": "error", "status", "error", "message", "request_id"}``.
``{"id", "type": "cancel"}`` stops a request upstream and is answered ``{"id", "type":
"cancelled"}``. Many requests may be in flight on one socket; closing it cancels them all.
A bad message gets an error message and the socket stays open. Each request goes through
the HTTP routes' policy: client key, budget, rate limits and the response cache (an
optional ``"cache": "no-cache" | "no-store"`` in the message stands for ``Cache-Control``).

``WebSocketEndpoint`` is what the Klein route uses; ``WebSocketSession`` is one socket's
logic; ``GatewayWebSocketProtocol`` adapts it to autobahn; ``UpstreamStream`` reads one
LiteLLM event stream.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IRequest, IResponse
from twisted.web.resource import IResource
from zope.interface import implementer

from mpcapi.config.settings import Settings
from mpcapi.errors import ApiError, bad_gateway, bad_request, gateway_timeout, internal_error
from mpcapi.http.requestlog import STREAM_FORMAT
from mpcapi.http.streaming import has_text, is_usage_only
from mpcapi.ledger.ledger import asks_for_usage
from mpcapi.openai.sse import DONE, SSEEvent, SSEParser
from mpcapi.openai.usage import Usage, usage_of_chunk
from mpcapi.openai.validation import RequestValidator, parse_json_object
from mpcapi.policy.cache import ResponseCache, answer_of_chunks, cache_key, replay_of
from mpcapi.upstream.client import LiteLLMClient, UpstreamBody, check_upstream_status, error_message

if TYPE_CHECKING:
    from mpcapi.policy.keys import ClientKey, KeyAuthenticator
    from mpcapi.policy.limits import RateLimiter

log = Logger(namespace="mpcapi.request")
socket_log = Logger(namespace="mpcapi.websocket")

# Idle sockets are pinged this often; one that does not answer within the timeout is dropped.
PING_INTERVAL = 30.0
PING_TIMEOUT = 30.0
# Messages up to max_body_bytes are read; larger ones are counted and discarded (then answered
# 413) up to this many times the limit, beyond which autobahn closes the socket (1009).
HARD_LIMIT_FACTOR = 4
WS_FORMAT = STREAM_FORMAT + " type={ws_type}"


@attrs.frozen
class Operation:
    """What one message type does: the LiteLLM path and the schema of its body."""

    path: str
    schema: str


OPERATIONS = {
    "chat.completions": Operation("/chat/completions", "chat_completions"),
    "completions": Operation("/completions", "completions"),
}
CANCEL = "cancel"
# A message's "cache" field: what Cache-Control says on HTTP (see mpcapi.cache).
CACHE_DIRECTIVES = ("no-cache", "no-store")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def parse_message(payload: bytes) -> dict[str, Any]:
    """Decode one client message as a JSON object, or raise a 400 ``ApiError``."""
    try:
        return parse_json_object(payload)
    except ApiError as problem:
        raise bad_request(problem.message.replace("request body", "message", 1)) from None


def upstream_refusal(response: IResponse, answer: bytes) -> ApiError:
    """LiteLLM's own non-200 answer to the client's request, as an error to relay."""
    headers: dict[str, str] = {}
    retry_after = response.headers.getRawHeaders(b"retry-after")
    if retry_after:
        headers["Retry-After"] = retry_after[0].decode("latin-1")
    return ApiError(response.code, _phrase(response.code), error_message(answer), headers=headers)


def is_upgrade(request: IRequest) -> bool:
    """Whether ``request`` asks for a WebSocket (``Upgrade: websocket``)."""
    upgrade = request.getHeader(b"upgrade")
    if upgrade is None:
        return False
    raw = upgrade.encode("latin-1") if isinstance(upgrade, str) else upgrade
    return b"websocket" in [part.strip().lower() for part in raw.split(b",")]


def same_host(origin: str, host: str) -> bool:
    """Whether a browser's ``Origin`` names the host the client connected to (ports aside)."""
    try:
        origin_host = urlsplit(origin).hostname
        own_host = urlsplit("//" + host).hostname
    except ValueError:
        return False
    return origin_host is not None and origin_host == own_host


@attrs.define(eq=False)
class Call:
    """One client message and, for a request, its way through LiteLLM; logged at its end."""

    request_id: str
    started: float
    id: str | None = None
    kind: str | None = None
    model: str | None = None
    upstream_status: int | None = None
    status: int = 200
    outcome: str = "completed"
    events: int = 0
    bytes_sent: int = 0
    first_event_at: float | None = None
    pending: defer.Deferred[None] | None = None
    stream: UpstreamStream | None = None
    # For the usage ledger (see mpcapi.ledger): its operation, tokens, text chunks, key.
    route: str | None = None
    usage: Usage | None = None
    content_deltas: int = 0
    hide_usage: bool = False  # usage asked for by us, not by the client: not relayed
    key: ClientKey | None = None
    # For the rate limits and the response cache (see mpcapi.limits, mpcapi.cache).
    rate_limited: bool = False
    document: dict[str, Any] | None = None  # the client's body, as the cache keys it
    cache_control: str | None = None  # the message's "cache" directive
    cache: str | None = None  # hit, miss or bypass, when the cache is on
    store_key: str | None = None  # where the answer goes once it is complete
    chunks: list[Any] = attrs.field(factory=list)  # the answer so far, while it is to be stored


class WebSocketEndpoint:
    """The Klein route's helper: one autobahn factory for every socket of the daemon."""

    keys: KeyAuthenticator | None = None  # with MPCAPI_AUTH=keys: every message's key is checked
    limiter: RateLimiter | None = None  # the HTTP routes' rate limits, for every message too
    cache: ResponseCache | None = None  # and their response cache
    counts_usage = False  # the usage ledger is on: every stream asks LiteLLM for its usage

    def __init__(
        self,
        settings: Settings,
        upstream: LiteLLMClient,
        clock: IReactorTime,
        validator: RequestValidator,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.clock = clock
        self.validator = validator
        # Called with each finished request's fields, like RequestLogging's (the usage ledger).
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        self.check_budget: Callable[[ClientKey | None], Awaitable[None]] | None = None
        self.factory = GatewayWebSocketFactory(self, server="mpc-api", reactor=clock)
        self.factory.setProtocolOptions(
            webStatus=False,
            maxMessagePayloadSize=HARD_LIMIT_FACTOR * settings.max_body_bytes,
            autoPingInterval=PING_INTERVAL,
            autoPingTimeout=PING_TIMEOUT,
        )

    def resource(self, request: IRequest) -> IResource:
        """The resource that takes the connection over; 426 for a plain HTTP request."""
        if not is_upgrade(request):
            raise ApiError(
                426,
                "Upgrade Required",
                "this endpoint speaks WebSocket; connect with a WebSocket client",
                headers={"Upgrade": "websocket"},
            )
        resource: IResource = WebSocketResource(self.factory)
        return resource

    def session(
        self, send: Callable[[bytes], None], path: str, authorization: bytes | None, client: str
    ) -> WebSocketSession:
        if self.settings.auth == "keys":  # the upgrade's client key is ours, not LiteLLM's
            session = WebSocketSession(self, send, path, None, client)
            session.client_key_header = authorization
            return session
        return WebSocketSession(self, send, path, authorization, client)


class WebSocketSession:
    """One socket: dispatches the client's messages and keeps its requests in flight."""

    def __init__(
        self,
        endpoint: WebSocketEndpoint,
        send: Callable[[bytes], None],
        path: str,
        authorization: bytes | None,
        client: str,
    ) -> None:
        self._endpoint = endpoint
        self.settings = endpoint.settings
        self._clock = endpoint.clock
        self._send_bytes = send
        self.path = path
        self._authorization = authorization
        self.client_key_header: bytes | None = None  # checked again for each request
        self._client = client
        self.calls: dict[str, Call] = {}
        self.paused = False
        self.messages = 0
        self.opened = self._clock.seconds()
        self._closed = False

    # From the client

    def received(self, payload: bytes, is_binary: bool) -> None:
        """One complete message from the client."""
        self.messages += 1
        call = Call(request_id=uuid.uuid4().hex, started=self._clock.seconds())
        try:
            operation, body = self._read(call, payload, is_binary)
        except ApiError as problem:
            self.fail(call, problem, "refused")
            return
        if operation is not None and body is not None:
            self._start(call, operation, body)

    def oversized(self) -> None:
        """A message over the limit was discarded unread."""
        self.messages += 1
        call = Call(request_id=uuid.uuid4().hex, started=self._clock.seconds())
        limit = self._endpoint.settings.max_body_bytes
        problem = ApiError(413, "Payload Too Large", f"message exceeds the limit of {limit} bytes")
        self.fail(call, problem, "refused")

    def closed(self) -> None:
        """The socket is gone: stop every request in flight."""
        if self._closed:
            return
        self._closed = True
        for call in list(self.calls.values()):
            self._abort(call, "client_abort")
        socket_log.info(
            "WS {path} closed after {duration_ms}ms messages={messages}",
            path=self.path,
            duration_ms=round((self._clock.seconds() - self.opened) * 1000, 2),
            messages=self.messages,
            client=self._client,
        )

    def pause(self) -> None:
        """The client reads slower than LiteLLM writes: hold every upstream stream."""
        self.paused = True
        for call in self.calls.values():
            if call.stream is not None:
                call.stream.pause()

    def resume(self) -> None:
        self.paused = False
        for call in list(self.calls.values()):
            if call.stream is not None:
                call.stream.resume()

    def _read(
        self, call: Call, payload: bytes, is_binary: bool
    ) -> tuple[Operation | None, bytes | None]:
        """Check one message; return what to send upstream (nothing for a cancel)."""
        if is_binary:
            raise bad_request("binary messages are not supported; send JSON as text")
        message = parse_message(payload)
        message_id = message.get("id")
        if not isinstance(message_id, str):
            raise bad_request('"id" is required and must be a string')
        call.id = message_id
        kind = message.get("type")
        if kind == CANCEL:
            self.cancel(message_id)
            return None, None
        operation = OPERATIONS.get(kind) if isinstance(kind, str) else None
        if operation is None:
            known = ", ".join([*OPERATIONS, CANCEL])
            raise bad_request(f'"type" must be one of: {known}')
        call.kind = kind
        if message_id in self.calls:
            raise ApiError(409, "Conflict", f"a request with id {message_id!r} is in flight")
        body = message.get("body")
        if not isinstance(body, dict):
            raise bad_request('"body" is required and must be a JSON object')
        directive = message.get("cache")
        if directive is not None and directive not in CACHE_DIRECTIVES:
            raise bad_request('"cache" must be "no-cache" or "no-store"')
        call.cache_control, call.document = directive, body
        model = body.get("model")
        call.model = model if isinstance(model, str) else None
        call.route = operation.path
        cache = self._endpoint.cache
        stores = cache is not None and cache.enabled and directive != "no-store"
        # The ledger counts every stream, and a stored answer keeps its usage: ask for it.
        if (self._endpoint.counts_usage or stores) and not asks_for_usage(body):
            call.hide_usage = True
            options = body.get("stream_options")
            options = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            body = {**body, "stream_options": options}
        raw = json.dumps({**body, "stream": True}, separators=(",", ":")).encode("utf-8")
        self._endpoint.validator.validate(operation.schema, raw)
        return operation, raw

    def cancel(self, message_id: str) -> None:
        """Stop the request ``message_id``; a request that is over already is left alone."""
        call = self.calls.get(message_id)
        if call is not None:
            self._send(call, {"id": message_id, "type": "cancelled"})
            self._abort(call, "client_cancel")

    # Towards LiteLLM

    def _start(self, call: Call, operation: Operation, body: bytes) -> None:
        assert call.id is not None
        self.calls[call.id] = call
        call.pending = defer.Deferred.fromCoroutine(self._run(call, operation.path, body))
        call.pending.addErrback(self._failed, call)

    async def _run(self, call: Call, path: str, body: bytes) -> None:
        endpoint = self._endpoint
        await self._admit(call)
        if await self._replayed(call):
            return
        response = await endpoint.upstream.send(
            "POST",
            path,
            body=body,
            authorization=self._authorization,
            request_id=call.request_id,
        )
        call.upstream_status = response.code
        if response.code != 200:
            answer = await endpoint.upstream.read_body(response)
            check_upstream_status(
                response.code,
                answer,
                our_key=bool(endpoint.settings.litellm_api_key),
                base_url=endpoint.upstream.source(response),
            )
            raise upstream_refusal(response, answer)
        call.stream = UpstreamStream(self, call, self._clock, endpoint.settings.litellm_timeout)
        response.deliverBody(call.stream)

    async def _admit(self, call: Call) -> None:
        """The policy in front of every request, as on HTTP: the client key, its budget,
        then the rate limits. Raises the ApiError that refuses the request."""
        endpoint = self._endpoint
        if endpoint.keys is not None:  # a key revoked while its socket is open stops working
            call.key = await endpoint.keys.authenticate(self.client_key_header)
        if endpoint.check_budget is not None:  # a key whose budget is spent: 429
            await endpoint.check_budget(call.key)
        if endpoint.limiter is not None:  # over a limit: 429 with retry_after
            try:
                await endpoint.limiter.admit(call.key, self._client)
            except ApiError:
                call.rate_limited = True
                raise

    async def _replayed(self, call: Call) -> bool:
        """Answer ``call`` from the response cache when it can (chunks, then ``done``);
        otherwise note where its answer is to be stored."""
        cache = self._endpoint.cache
        if cache is None or not cache.enabled or call.document is None or call.route is None:
            return False
        key = call.key
        authorization = self._authorization or self.client_key_header  # the upgrade's
        scope = cache.scope_for(
            key.user if key else None, key.id if key else None, self._client, authorization
        )
        store_key = cache_key(scope, call.route, call.document)
        if call.cache_control != "no-store":
            call.store_key = store_key
        if call.cache_control == "no-cache":
            self._cache_outcome(call, cache, "bypass")
            return False
        cached = await cache.fetch(store_key)
        events = replay_of(cached, call.document) if cached is not None else None
        if events is None:
            self._cache_outcome(call, cache, "miss")
            return False
        call.store_key = None
        self._cache_outcome(call, cache, "hit")
        for event in events:
            self.chunk(call, event)
        call.usage = None  # a hit spends no tokens, as on HTTP
        self.done(call)
        return True

    @staticmethod
    def _cache_outcome(call: Call, cache: ResponseCache, outcome: str) -> None:
        call.cache = outcome
        cache.count(outcome)

    def _failed(self, failure: Failure, call: Call) -> None:
        if not self._current(call):
            return  # cancelled, or the socket is gone: nobody waits for an answer
        if failure.check(ApiError):
            problem: ApiError = failure.value  # type: ignore[assignment]
            outcome = {504: "timeout", 401: "refused", 503: "refused"}.get(
                problem.status, "upstream_error"
            )
            if problem.status == 429 and call.upstream_status is None:
                outcome = "refused"  # our own limits or budget, not LiteLLM's 429
            self.fail(call, problem, outcome)
            return
        log.failure(
            "unhandled error in a WebSocket request, request_id={request_id}",
            failure,
            request_id=call.request_id,
        )
        self.fail(call, internal_error(), "error")

    def _abort(self, call: Call, outcome: str) -> None:
        """Stop ``call`` upstream without a word to the client; log it."""
        self._forget(call)
        call.outcome = outcome
        if call.stream is not None:
            call.stream.cancel()
        else:
            call.status = 499  # before LiteLLM answered (nginx's "client closed request")
            if call.pending is not None:
                call.pending.cancel()
        self._log(call)

    # Towards the client (called by UpstreamStream too)

    def chunk(self, call: Call, data: Any) -> None:
        if call.store_key is not None:
            call.chunks.append(data)
        if isinstance(data, dict):
            usage = usage_of_chunk(data)
            if usage is not None:
                call.usage = usage
                if call.hide_usage and is_usage_only(data):
                    return
            choices = data.get("choices")
            if isinstance(choices, list) and any(has_text(choice) for choice in choices):
                call.content_deltas += 1
        call.events += 1
        if call.first_event_at is None:
            call.first_event_at = self._clock.seconds()
        self._send(call, {"id": call.id, "type": "chunk", "data": data})

    def done(self, call: Call) -> None:
        self._store(call)
        message: dict[str, Any] = {"id": call.id, "type": "done"}
        if call.cache is not None:  # what x-mpcapi-cache says on HTTP
            message["cache"] = call.cache
        self._send(call, message)
        self._finish(call)

    def _store(self, call: Call) -> None:
        """Keep a complete answer in the response cache, as a non-streamed answer."""
        cache = self._endpoint.cache
        if call.store_key is None or cache is None:
            return
        answer = answer_of_chunks(call.chunks)
        call.chunks = []
        if answer is not None:
            cache.keep(call.store_key, json.dumps(answer).encode("utf-8"))

    def fail(self, call: Call, problem: ApiError, outcome: str) -> None:
        message: dict[str, Any] = {
            "id": call.id,
            "type": "error",
            "status": problem.status,
            "error": problem.error,
            "message": problem.message,
            "request_id": call.request_id,
        }
        if problem.details:
            message["details"] = list(problem.details)
        if "Retry-After" in problem.headers:
            message["retry_after"] = problem.headers["Retry-After"]
        self._send(call, message)
        call.status, call.outcome = problem.status, outcome
        self._finish(call)

    def _send(self, call: Call, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode("utf-8")
        call.bytes_sent += len(data)
        if not self._closed:
            self._send_bytes(data)

    def _current(self, call: Call) -> bool:
        return call.id is not None and self.calls.get(call.id) is call

    def _finish(self, call: Call) -> None:
        self._forget(call)
        self._log(call)

    def _forget(self, call: Call) -> None:
        if call.id is not None and self.calls.get(call.id) is call:
            del self.calls[call.id]

    def _log(self, call: Call) -> None:
        now = self._clock.seconds()
        first = call.first_event_at
        log.info(
            WS_FORMAT,
            method="WS",
            path=self.path,
            status=call.status,
            duration_ms=round((now - call.started) * 1000, 2),
            request_id=call.request_id,
            model=call.model,
            upstream_status=call.upstream_status,
            bytes_sent=call.bytes_sent,
            outcome=call.outcome,
            client=self._client,
            ttfb_ms=round((first - call.started) * 1000, 2) if first is not None else None,
            events=call.events,
            ws_type=call.kind,
            ws_id=call.id[:128] if call.id is not None else None,
            cache=call.cache,
            rate_limited=call.rate_limited,
        )
        if self._endpoint.observers:
            self._observe(call, now)

    def _observe(self, call: Call, now: float) -> None:
        """Hand the finished request to the observers (the usage ledger)."""
        first = call.first_event_at
        fields: dict[str, Any] = {
            "request_id": call.request_id,
            "method": "WS",
            "path": self.path,
            "route": call.route,
            "status": call.status,
            "duration_ms": round((now - call.started) * 1000, 2),
            "model": call.model,
            "upstream_status": call.upstream_status,
            "outcome": call.outcome,
            "client": self._client,
            "key_id": call.key.id if call.key is not None else None,
            "user": call.key.user if call.key is not None else None,
            "ttfb_ms": round((first - call.started) * 1000, 2) if first is not None else None,
            "events": call.events,
            "content_deltas": call.content_deltas,
            "cache": call.cache,
            "rate_limited": call.rate_limited,
        }
        if call.usage is not None:
            fields["prompt_tokens"] = call.usage.prompt_tokens
            fields["completion_tokens"] = call.usage.completion_tokens
            fields["cost_usd"] = call.usage.cost_usd
        for observe in self._endpoint.observers:
            try:
                observe(fields)
            except Exception:
                log.failure("WebSocket request observer {observer!r} failed", observer=observe)


class UpstreamStream(UpstreamBody):
    """Reads one LiteLLM event stream and hands its events to the session.

    Silence longer than ``idle_timeout`` (while the client keeps up) is a 504; an end
    without ``data: [DONE]`` is a 502. ``cancel`` closes the upstream connection.
    """

    def __init__(
        self, session: WebSocketSession, call: Call, clock: IReactorTime, idle_timeout: float
    ) -> None:
        super().__init__(clock, idle_timeout)
        self._session = session
        self._call = call
        self._parser = SSEParser()
        self._paused = False
        self.over = False

    def connectionMade(self) -> None:
        if self._session.paused:
            self.pause()
        else:
            self._start_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.over:
            return
        self._touch_timer()
        for event in self._parser.feed(data):
            self._event(event)
            if self.over:
                return

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if self.over:
            return
        if reason.check(ResponseDone):
            why = "LiteLLM closed the stream without [DONE]"
        else:
            why = f"LiteLLM broke off the stream: {reason.value}"
        self._fail(bad_gateway(why, "broken"), "upstream_error")

    def cancel(self) -> None:
        self._stop()
        self._close_upstream()

    def pause(self) -> None:
        self._paused = True
        self._stop_timer()  # a slow client is not a silent LiteLLM
        self._pause_upstream()

    def resume(self) -> None:
        if not self._paused or self.over:
            return
        self._paused = False
        self._start_timer()
        self._resume_upstream()

    def _event(self, event: SSEEvent) -> None:
        if event.data == DONE:
            self._stop()
            self._session.done(self._call)
            return
        try:
            chunk = json.loads(event.data)
        except ValueError:
            self._fail(
                bad_gateway("LiteLLM sent an event that is not JSON", "broken"), "upstream_error"
            )
            self._close_upstream()
            return
        problem = self._reported_error(chunk)
        if problem is not None:
            self._fail(problem, "upstream_error")
            self._close_upstream()
            return
        self._session.chunk(self._call, chunk)

    def _reported_error(self, chunk: Any) -> ApiError | None:
        """The error of an ``{"error": {...}}`` event LiteLLM sends when a provider fails."""
        if not isinstance(chunk, dict) or "error" not in chunk or "choices" in chunk:
            return None
        detail = chunk["error"]
        code = detail.get("code") if isinstance(detail, dict) else None
        try:
            status = int(code)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            status = 502
        if not 400 <= status < 500:
            status = 502
        body = json.dumps(chunk).encode("utf-8")
        settings = self._session.settings
        try:
            check_upstream_status(
                status,
                body,
                our_key=bool(settings.litellm_api_key),
                base_url=settings.masked()["litellm_base_url"],
            )
        except ApiError as problem:
            return problem
        return ApiError(status, _phrase(status), error_message(body))

    def _timed_out(self) -> None:
        self._fail(gateway_timeout(f"LiteLLM sent nothing for {self._idle_timeout:g} s"), "timeout")
        self._close_upstream()

    def _fail(self, problem: ApiError, outcome: str) -> None:
        self._stop()
        self._session.fail(self._call, problem, outcome)

    def _stop(self) -> None:
        self.over = True
        self._stop_timer()


@implementer(IPushProducer)
class GatewayWebSocketProtocol(WebSocketServerProtocol):
    """autobahn's side of one socket: frames in, messages out, flow control."""

    factory: GatewayWebSocketFactory
    session: WebSocketSession | None = None
    _received = 0
    _oversized = False

    def onConnect(self, request: ConnectionRequest) -> None:
        origin = request.origin
        if origin and not same_host(origin, request.headers.get("host", "")):
            # A web page of another site: with LITELLM_API_KEY set it would spend our key.
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "cross-origin WebSocket refused")
        authorization = request.headers.get("authorization")
        peer = self.transport.getPeer() if self.transport is not None else None
        self.session = self.factory.endpoint.session(
            send=self._send_text,
            path=request.path,
            authorization=authorization.encode("latin-1") if authorization else None,
            client=getattr(peer, "host", None) or str(self.peer),
        )

    def onOpen(self) -> None:
        # Twisted Web's HTTPChannel registered itself as the producer of this connection
        # before autobahn took the connection over; the socket's flow control is ours now.
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.registerProducer(self, True)

    # Messages, read frame by frame so that an oversized one is discarded, not kept.

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._received = 0
        self._oversized = False

    def onMessageFrameData(self, payload: bytes) -> None:
        self._received += len(payload)
        if self._received > self.factory.endpoint.settings.max_body_bytes:
            if not self._oversized:
                self._oversized = True
                self.message_data = []
                self.frame_data = []
            return
        super().onMessageFrameData(payload)

    def onMessageEnd(self) -> None:
        if self._oversized:
            self.message_data = []
            self._oversized = False
            if self.session is not None:
                self.session.oversized()
            return
        super().onMessageEnd()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is not None:
            self.session.received(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            self.session.closed()

    def _send_text(self, data: bytes) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(data, isBinary=False)

    # IPushProducer: the client's connection tells us to slow down.

    def pauseProducing(self) -> None:
        if self.session is not None:
            self.session.pause()

    def resumeProducing(self) -> None:
        if self.session is not None:
            self.session.resume()

    def stopProducing(self) -> None:
        if self.session is not None:
            self.session.closed()


class GatewayWebSocketFactory(WebSocketServerFactory):
    """Builds a ``GatewayWebSocketProtocol`` for each socket; knows its endpoint."""

    protocol = GatewayWebSocketProtocol  # type: ignore[assignment]

    def __init__(self, endpoint: WebSocketEndpoint, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.endpoint = endpoint


__all__ = [
    "OPERATIONS",
    "GatewayWebSocketFactory",
    "GatewayWebSocketProtocol",
    "UpstreamStream",
    "WebSocketEndpoint",
    "WebSocketSession",
    "is_upgrade",
    "parse_message",
]
