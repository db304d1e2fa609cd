"""``WebSocketSession``: one socket's messages, each an API call through the same policy.

Each request message gets an ``Exchange`` (as an HTTP request does), goes through the same
``Admission`` (client key, budget, rate limits) and the same response cache step, is always
streamed from LiteLLM, and is reported like an HTTP request when it ends (one log event,
then the observers: metrics, token counts, the usage ledger).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpcapi.errors import ApiError, bad_request, internal_error, phrase
from mpcapi.exchange import WEBSOCKET, Exchange
from mpcapi.http.requestlog import new_request_id, report
from mpcapi.openai.chunks import asks_for_usage, with_usage_requested
from mpcapi.openai.events import StreamReader
from mpcapi.openai.replay import answer_of_chunks, replay_of
from mpcapi.openai.routes import BY_PATH, Route
from mpcapi.openai.validation import parse_json_object
from mpcapi.tracing.context import trace_context
from mpcapi.upstream.client import check_upstream_status, error_message
from mpcapi.websocket.stream import UpstreamStream

if TYPE_CHECKING:
    from twisted.web.iweb import IResponse

    from mpcapi.config.settings import Settings
    from mpcapi.websocket.endpoint import WebSocketEndpoint

log = Logger(namespace="mpcapi.request")
socket_log = Logger(namespace="mpcapi.websocket")

# A request message's "type": the route it calls.
OPERATIONS = {
    "chat.completions": BY_PATH["/chat/completions"],
    "completions": BY_PATH["/completions"],
    "responses": BY_PATH["/responses"],
}
CANCEL = "cancel"
# A message's "cache" field: what Cache-Control says on HTTP (see mpcapi.policy.cache).
CACHE_DIRECTIVES = ("no-cache", "no-store")


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
    return ApiError(response.code, phrase(response.code), error_message(answer), headers=headers)


@attrs.define(eq=False)
class Message:
    """One request message in flight: its exchange, and what its way through LiteLLM needs."""

    exchange: Exchange
    route: Route | None = None
    document: dict[str, Any] | None = None  # the client's body, as the cache keys it
    cache_control: str | None = None  # the message's "cache" directive
    hide_usage: bool = False  # usage asked for by us, not by the client: not relayed
    pending: defer.Deferred[None] | None = None
    stream: UpstreamStream | None = None
    store_key: str | None = None  # where the answer goes once it is complete
    chunks: list[Any] = attrs.field(factory=list)  # the answer so far, while it is to be stored
    reader: StreamReader = attrs.field(factory=StreamReader)  # its family's (see openai.events)


class WebSocketSession:
    """One socket: dispatches the client's messages and keeps its requests in flight."""

    def __init__(
        self,
        endpoint: WebSocketEndpoint,
        send: Callable[[bytes], None],
        path: str,
        authorization: bytes | None,
        client: str,
        client_key_header: bytes | None = None,
        trace: tuple[str | None, str | None] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._clock = endpoint.clock
        self._send_bytes = send
        self.path = path
        self._authorization = authorization  # forwarded to LiteLLM (no LITELLM_API_KEY)
        self.client_key_header = client_key_header  # with client keys: checked for each request
        self._client = client
        # Tracing on: the upgrade's traceparent and tracestate, which each message continues.
        self._trace = trace
        self.calls: dict[str, Message] = {}  # the requests in flight, by their id
        self.paused = False
        self.messages = 0
        self.opened = self._clock.seconds()
        self._closed = False

    @property
    def settings(self) -> Settings:
        """The settings in force (a reload applies to the next request)."""
        return self._endpoint.live.current

    # From the client

    def received(self, payload: bytes, is_binary: bool) -> None:
        """One complete message from the client."""
        message = self._new_message()
        try:
            body = self._read(message, payload, is_binary)
        except ApiError as problem:
            self.fail(message, problem, "refused")
            return
        if body is not None:
            self._start(message, body)

    def oversized(self) -> None:
        """A message over the limit was discarded unread."""
        message = self._new_message()
        limit = self._endpoint.max_body_bytes
        problem = ApiError(413, "Payload Too Large", f"message exceeds the limit of {limit} bytes")
        self.fail(message, problem, "refused")

    def closed(self) -> None:
        """The socket is gone: stop every request in flight."""
        if self._closed:
            return
        self._closed = True
        for message in list(self.calls.values()):
            self._abort(message, "client_abort")
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
        for message in self.calls.values():
            if message.stream is not None:
                message.stream.pause()

    def resume(self) -> None:
        self.paused = False
        for message in list(self.calls.values()):
            if message.stream is not None:
                message.stream.resume()

    def _new_message(self) -> Message:
        self.messages += 1
        now = self._clock.seconds()
        exchange = Exchange(
            request_id=new_request_id(now),
            started=now,
            method=WEBSOCKET,
            path=self.path,
            client=self._client,
            streamed=True,
        )
        if self._trace is not None:
            exchange.trace = trace_context(*self._trace)
        return Message(exchange)

    def _read(self, message: Message, payload: bytes, is_binary: bool) -> bytes | None:
        """Check one message; return the body to send upstream (nothing for a cancel)."""
        exchange = message.exchange
        if is_binary:
            raise bad_request("binary messages are not supported; send JSON as text")
        parsed = parse_message(payload)
        message_id = parsed.get("id")
        if not isinstance(message_id, str):
            raise bad_request('"id" is required and must be a string')
        exchange.message_id = message_id
        kind = parsed.get("type")
        if kind == CANCEL:
            self.cancel(message_id)
            return None
        route = OPERATIONS.get(kind) if isinstance(kind, str) else None
        if route is None or route.schema is None:
            known = ", ".join([*OPERATIONS, CANCEL])
            raise bad_request(f'"type" must be one of: {known}')
        exchange.message_type = kind
        if message_id in self.calls:
            raise ApiError(409, "Conflict", f"a request with id {message_id!r} is in flight")
        body = parsed.get("body")
        if not isinstance(body, dict):
            raise bad_request('"body" is required and must be a JSON object')
        directive = parsed.get("cache")
        if directive is not None and directive not in CACHE_DIRECTIVES:
            raise bad_request('"cache" must be "no-cache" or "no-store"')
        message.cache_control, message.document = directive, body
        model = body.get("model")
        exchange.model = model if isinstance(model, str) else None
        exchange.route, message.route = route.label, route
        assert route.events is not None  # every operation streams
        message.reader = route.events.reader()
        stores = route.cacheable and self._endpoint.cache.enabled and directive != "no-store"
        # The ledger counts every stream, and a stored answer keeps its usage: ask for it.
        wants_usage = self._endpoint.counts_usage or stores
        if route.events.usage_on_request and wants_usage and not asks_for_usage(body):
            message.hide_usage = True
            body = with_usage_requested(body)
        raw = json.dumps({**body, "stream": True}, separators=(",", ":")).encode("utf-8")
        self._endpoint.validator.validate(route.schema, raw)
        return raw

    def cancel(self, message_id: str) -> None:
        """Stop the request ``message_id``; a request that is over already is left alone."""
        message = self.calls.get(message_id)
        if message is not None:
            self._send(message, {"id": message_id, "type": "cancelled"})
            self._abort(message, "client_cancel")

    # Towards LiteLLM

    def _start(self, message: Message, body: bytes) -> None:
        message_id = message.exchange.message_id
        assert message_id is not None
        self.calls[message_id] = message
        message.pending = defer.Deferred.fromCoroutine(self._run(message, body))
        message.pending.addErrback(self._failed, message)

    async def _run(self, message: Message, body: bytes) -> None:
        endpoint = self._endpoint
        exchange = message.exchange
        # As on HTTP: the client key (a key revoked while its socket is open stops working),
        # its budget, the rate limits (over a limit: 429 with retry_after).
        await endpoint.admission.admit(exchange, self.client_key_header)
        route = message.route
        assert route is not None
        ownership, owner, document = endpoint.ownership, exchange.key_id, message.document
        if ownership and owner and route.stored is not None and document is not None:
            for field, kind in route.stored.refers:  # someone else's previous_response_id
                if isinstance(document.get(field), str):
                    await ownership.check(kind, document[field], owner)
        if exchange.model is not None:
            endpoint.admission.check_model(exchange, exchange.model)
        if route.cacheable and await self._replayed(message):
            return
        exchange.upstream_sent_at = self._clock.seconds()
        response = await endpoint.upstream.send(
            route.method,
            route.path,
            body=body,
            authorization=self._authorization,
            request_id=exchange.request_id,
            trace=exchange.trace,
        )
        exchange.upstream_status = response.code
        if response.code != 200:
            answer = await endpoint.upstream.read_body(response)
            check_upstream_status(
                response.code,
                answer,
                our_key=bool(self.settings.litellm_api_key),
                base_url=endpoint.upstream.source(response),
            )
            raise upstream_refusal(response, answer)
        timeout = self.settings.litellm_timeout
        message.stream = UpstreamStream(self, message, self._clock, timeout)
        response.deliverBody(message.stream)

    async def _replayed(self, message: Message) -> bool:
        """Answer ``message`` from the response cache when it can (chunks, then ``done``);
        otherwise note where its answer is to be stored."""
        document = message.document
        if document is None:
            return False
        directives = [message.cache_control] if message.cache_control else []
        lookup = await self._endpoint.cache.lookup(
            message.exchange,
            document,
            directives,
            self._authorization or self.client_key_header,  # the upgrade's
            lambda cached: replay_of(cached, document),
        )
        if lookup is None:
            return False
        message.store_key = lookup.store_key
        if lookup.answer is None:
            return False
        for event in lookup.answer:
            self.chunk(message, event)
        message.exchange.usage = None  # a hit spends no tokens, as on HTTP
        self.done(message)
        return True

    def _failed(self, failure: Failure, message: Message) -> None:
        if not self._current(message):
            return  # cancelled, or the socket is gone: nobody waits for an answer
        if failure.check(ApiError):
            problem: ApiError = failure.value  # type: ignore[assignment]
            outcome = {504: "timeout", 401: "refused", 403: "refused", 503: "refused"}.get(
                problem.status, "upstream_error"
            )
            if problem.status == 429 and message.exchange.upstream_status is None:
                outcome = "refused"  # our own limits or budget, not LiteLLM's 429
            self.fail(message, problem, outcome)
            return
        log.failure(
            "unhandled error in a WebSocket request, request_id={request_id}",
            failure,
            request_id=message.exchange.request_id,
        )
        self.fail(message, internal_error(), "error")

    def _abort(self, message: Message, outcome: str) -> None:
        """Stop ``message`` upstream without a word to the client; log it."""
        self._forget(message)
        message.exchange.outcome = outcome
        if message.stream is not None:
            message.stream.cancel()
        else:
            message.exchange.status = 499  # before LiteLLM answered (nginx's "client closed")
            if message.pending is not None:
                message.pending.cancel()
        self._report(message)

    # Towards the client (called by UpstreamStream too)

    def chunk(self, message: Message, data: Any, event: str = "message") -> None:
        exchange = message.exchange
        if message.store_key is not None:
            message.chunks.append(data)
        if isinstance(data, dict):
            reader = message.reader
            text, usage_only = reader.take(event, data)
            if reader.usage is not None:
                exchange.usage = reader.usage
                if message.hide_usage and usage_only:
                    return
            if text:
                exchange.content_deltas += 1
        exchange.events += 1
        if exchange.first_byte_at is None:
            exchange.first_byte_at = self._clock.seconds()
        self._send(message, {"id": exchange.message_id, "type": "chunk", "data": data})

    def done(self, message: Message) -> None:
        self._store(message)
        claiming = self._claim(message)
        if claiming is None:
            self._say_done(message)
        else:  # "done" once the owner is recorded: the client may use the id at once
            claiming.addBoth(lambda _: self._say_done(message))

    def _say_done(self, message: Message) -> None:
        if not self._current(message):
            return  # cancelled, or the socket closed, while its owner was being recorded
        exchange = message.exchange
        answer: dict[str, Any] = {"id": exchange.message_id, "type": "done"}
        if exchange.cache is not None:  # what x-mpcapi-cache says on HTTP
            answer["cache"] = exchange.cache
        self._send(message, answer)
        self._finish(message)

    def _claim(self, message: Message) -> defer.Deferred[Any] | None:
        """Record the key that created a stored object (a response), as on HTTP; None when
        there is nothing to record."""
        ownership, route = self._endpoint.ownership, message.route
        owner = message.exchange.key_id
        ids = message.reader.object_ids
        if ownership is None or route is None or route.stored is None or not owner or not ids:
            return None
        kind = route.stored.kind

        async def claim_all() -> None:
            for object_id in ids:
                await ownership.claim(kind, object_id, owner)

        claiming = defer.Deferred.fromCoroutine(claim_all())
        claiming.addErrback(lambda failure: log.failure("could not record an owner", failure))
        return claiming

    def _store(self, message: Message) -> None:
        """Keep a complete answer in the response cache, as a non-streamed answer."""
        if message.store_key is None:
            return
        answer = answer_of_chunks(message.chunks)
        message.chunks = []
        if answer is not None:
            self._endpoint.cache.keep(message.store_key, json.dumps(answer).encode("utf-8"))

    def fail(self, message: Message, problem: ApiError, outcome: str) -> None:
        exchange = message.exchange
        answer: dict[str, Any] = {
            "id": exchange.message_id,
            "type": "error",
            "status": problem.status,
            "error": problem.error,
            "message": problem.message,
            "request_id": exchange.request_id,
        }
        if problem.details:
            answer["details"] = list(problem.details)
        if "Retry-After" in problem.headers:
            answer["retry_after"] = problem.headers["Retry-After"]
        self._send(message, answer)
        exchange.status, exchange.outcome = problem.status, outcome
        self._finish(message)

    def _send(self, message: Message, answer: dict[str, Any]) -> None:
        data = json.dumps(answer, separators=(",", ":")).encode("utf-8")
        message.exchange.bytes_sent += len(data)
        if not self._closed:
            self._send_bytes(data)

    def _current(self, message: Message) -> bool:
        message_id = message.exchange.message_id
        return message_id is not None and self.calls.get(message_id) is message

    def _finish(self, message: Message) -> None:
        self._forget(message)
        self._report(message)

    def _forget(self, message: Message) -> None:
        if self._current(message):
            del self.calls[message.exchange.message_id]  # type: ignore[arg-type]

    def _report(self, message: Message) -> None:
        exchange = message.exchange
        exchange.finished = self._clock.seconds()
        if not exchange.status:
            exchange.status = 200
        report(exchange, self._endpoint.observers)


__all__ = ["OPERATIONS", "Message", "WebSocketSession", "parse_message", "upstream_refusal"]
