"""The forwarding pipeline: how every route of the route table is served over HTTP.

One ``Forwarding.serve`` for every ``Route`` (see ``mpcapi.openai.routes``), in order:
admission (client key, budget, rate limits), ownership of the stored object the route
names, validation of the body (a JSON body against the route's schema, an upload's
required fields), the response cache, then LiteLLM: a whole answer is relayed with its
status and headers (LiteLLM's own errors for the client's request pass through), an event
stream chunk by chunk (``mpcapi.http.streaming``), a binary answer as it arrives
(``mpcapi.http.passthrough``), an upload streamed from its file. What it learns goes on
the request's ``Exchange``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import orjson
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.server import Request

from mpcapi.config.live import LiveSettings
from mpcapi.errors import JSON_CONTENT_TYPE, bad_request, set_status, with_length
from mpcapi.exchange import Exchange
from mpcapi.http.passthrough import BodyRelay
from mpcapi.http.requestlog import exchange_of
from mpcapi.http.streaming import SSE_HEADERS, SSERelay
from mpcapi.openai.chunks import asks_for_usage, with_usage_requested
from mpcapi.openai.multipart import FormError, boundary_of, scan_form
from mpcapi.openai.replay import replay_of
from mpcapi.openai.routes import Route, Stored
from mpcapi.openai.usage import COST_HEADER
from mpcapi.openai.validation import RequestValidator
from mpcapi.policy.admission import Admission
from mpcapi.policy.cache import CACHE_HEADER, ResponseCache, cache_directives
from mpcapi.policy.limits import HEADER_NAMES
from mpcapi.policy.ownership import Ownership
from mpcapi.upstream.client import LiteLLMClient, check_upstream_status, relayed_headers

if TYPE_CHECKING:
    from mpcapi.ledger.ledger import UsageLedger


class _Call:
    """One call through the pipeline: its route, where it goes on LiteLLM, whose it is.
    (A plain class with slots: one is made per request.)"""

    __slots__ = ("authorization", "content_type", "exchange", "fixed", "owner", "path", "route")

    def __init__(
        self, route: Route, exchange: Exchange, authorization: bytes | None, owner: str | None
    ) -> None:
        self.route = route
        self.exchange = exchange
        self.authorization = authorization
        self.owner = owner  # the key whose stored objects it may see; None: no ownership
        self.path = route.upstream or route.path  # LiteLLM's path, with arguments and query
        self.fixed = True  # the route's own path: its URL is built once
        self.content_type: bytes | None = None  # an upload's (JSON otherwise)


@attrs.define
class Forwarding:
    """Serves one route of the table for one request (see the module doc)."""

    live: LiveSettings
    upstream: LiteLLMClient
    clock: IReactorTime
    admission: Admission
    cache: ResponseCache
    validator: RequestValidator = attrs.field(factory=RequestValidator)
    ledger: UsageLedger | None = None  # on: every stream asks LiteLLM for its usage
    keep_bodies: bool = False  # MPCAPI_LOG_BODIES: the bodies go on the exchange
    ownership: Ownership | None = None  # with client keys: who made each stored object

    async def serve(
        self, request: Request, route: Route, arguments: Mapping[str, str] | None = None
    ) -> bytes | None:
        """The answer's body (its status and headers set), or None once a relayed stream
        has finished the request itself. ``arguments`` are the URL's (a file's id …)."""
        exchange = exchange_of(request)
        exchange.route = route.label
        authorization = request.getHeader(b"authorization")
        if authorization is None and route.anthropic:  # Anthropic's SDKs send x-api-key
            api_key = request.getHeader(b"x-api-key")
            authorization = b"Bearer " + api_key if api_key else None
        limits = await self.admission.admit(exchange, authorization)
        set_header = request.responseHeaders.setRawHeaders
        for limit, value in limits.items():
            set_header(HEADER_NAMES[limit], [value.encode("ascii")])
        owner = exchange.key_id if self.ownership is not None and route.stored else None
        call = _Call(route, exchange, authorization, owner)
        if call.owner is not None and route.stored is not None and route.stored.param:
            await self._own(route.stored.kind, arguments, route.stored.param, call.owner)
        query = request.uri.partition(b"?")[2]
        if arguments or query:  # LiteLLM's path with the URL's arguments and query
            call.path = route.upstream_path(arguments)
            if query:
                call.path += "?" + query.decode("latin-1")
            call.fixed = False
        if route.body == "none":
            if arguments and route.model_argument:  # GET /models/{id}: a hidden one is 403
                exchange.model = arguments[route.model_argument]
                self.admission.check_model(exchange, exchange.model)
            return await self._forward(request, call, None)
        if route.body == "multipart":
            return await self._forward(request, call, self._upload(request, call))
        return await self._serve_json(request, call)

    async def _serve_json(self, request: Request, call: _Call) -> bytes | None:
        """A JSON body: validated, its model allowed, the objects it names owned, then the
        cache, then LiteLLM (streamed when it asks for a stream)."""
        route, exchange = call.route, call.exchange
        body = request.content.read() if request.content is not None else b""
        document = self.validator.validate(route.schema or route.name, body)
        model = document.get("model")
        exchange.model = model if isinstance(model, str) else None
        if exchange.model is not None:
            self.admission.check_model(exchange, exchange.model)  # 403 outside the key's models
        exchange.max_tokens = document.get("max_tokens")
        exchange.temperature = document.get("temperature")
        if self.keep_bodies:
            exchange.request_body = body
        if call.owner is not None and route.stored is not None:
            for field, kind in route.stored.refers:
                if isinstance(document.get(field), str):
                    await self._own(kind, document, field, call.owner)
        streamed = route.events is not None and document.get("stream") is True
        store_key: str | None = None
        if route.cacheable and self.cache.enabled:
            lookup = await self.cache.lookup(
                exchange,
                document,
                cache_directives(request.requestHeaders.getRawHeaders(b"cache-control") or []),
                call.authorization,
                (lambda cached: _event_stream(cached, document)) if streamed else _whole,
            )
            if lookup is not None:
                request.setHeader(CACHE_HEADER, (exchange.cache or "").encode("ascii"))
                if lookup.answer is not None:
                    set_status(request, 200)
                    headers = SSE_HEADERS if streamed else {b"content-type": JSON_CONTENT_TYPE}
                    for name, header in headers.items():
                        request.setHeader(name, header)
                    return with_length(request, lookup.answer)
                store_key = None if streamed else lookup.store_key
        if streamed:
            return await self._stream(request, call, body, document)
        answer = await self._forward(request, call, body)
        if store_key is not None and answer is not None and request.code == 200:
            self.cache.keep(store_key, answer)
        return answer

    async def _own(self, kind: str, values: Any, name: str, owner: str) -> None:
        """404 unless ``owner`` made the object whose id is ``values[name]``."""
        assert self.ownership is not None
        await self.ownership.check(kind, values[name], owner)

    def _upload(self, request: Request, call: _Call) -> IBodyProducer:
        """The multipart body, its required fields checked, streamed from its file."""
        content = request.content
        content_type = request.getHeader(b"content-type")
        try:
            boundary = boundary_of(content_type)
            if content is None:
                raise FormError("the request has no body")
            form = scan_form(content, boundary)
        except FormError as problem:
            raise bad_request(str(problem)) from None
        for field in call.route.form:
            if not form.fields.get(field):
                raise bad_request(f"the multipart field {field!r} is required", param=field)
        for field in call.route.files:
            if field not in form.files and f"{field}[]" not in form.files:
                raise bad_request(f"the multipart file {field!r} is required", param=field)
        model = form.fields.get("model")
        call.exchange.model = model or None
        if model:
            self.admission.check_model(call.exchange, model)
        call.content_type = content_type
        content.seek(0)
        return FileBodyProducer(content)

    async def _forward(self, request: Request, call: _Call, body: Any) -> bytes | None:
        """Send to LiteLLM and relay its answer; client errors pass through as they are."""
        route, exchange = call.route, call.exchange
        response = await self._send(request, call, body)
        code = response.code
        if route.binary and code == 200:
            return await self._relay_binary(request, route, exchange, response)
        answer = await self.upstream.read_body(response)
        self._check(code, response, answer)
        if code == 200 and route.usage is not None:
            costs = response.headers.getRawHeaders(COST_HEADER)
            exchange.usage = route.usage(answer, costs[0] if costs else None)
        if code == 200 and call.owner is not None and route.stored is not None:
            answer = await self._ownership_of_answer(route.stored, answer, call.owner)
        if code == 200 and route.lists_models:  # only the models the key may call
            answer = self.admission.visible_models(exchange, answer)
        if self.keep_bodies:
            exchange.response_body = answer
        return _relay(request, code, response, answer)

    async def _ownership_of_answer(self, stored: Stored, answer: bytes, owner: str) -> bytes:
        """Record the owner of a created object; cut a list to the owner's objects."""
        assert self.ownership is not None
        try:
            document = orjson.loads(answer)
        except ValueError:
            return answer
        if stored.access in ("create", "read"):
            # A read answers under a new id too (LiteLLM gives a response one on every
            # answer): the owner, who passed the check, owns that one as well.
            object_id = document.get("id") if isinstance(document, dict) else None
            if isinstance(object_id, str):
                await self.ownership.claim(stored.kind, object_id, owner)
            return answer
        if stored.access == "list":
            return orjson.dumps(await self.ownership.only_owned(stored.kind, document, owner))
        return answer

    async def _relay_binary(
        self, request: Request, route: Route, exchange: Exchange, response: IResponse
    ) -> bytes | None:
        request.setResponseCode(200)
        for name, values in relayed_headers(response).items():
            request.responseHeaders.setRawHeaders(name, values)
        if isinstance(response.length, int):
            request.setHeader(b"content-length", b"%d" % response.length)
        costs = response.headers.getRawHeaders(COST_HEADER)
        if route.usage is not None:  # a binary answer's usage is its cost header
            exchange.usage = route.usage(b"", costs[0] if costs else None)
        relay = BodyRelay(request, exchange, self.clock, self.live.current.litellm_timeout)
        response.deliverBody(relay)
        await relay.ended
        return None

    async def _stream(
        self, request: Request, call: _Call, body: bytes, document: dict[str, Any]
    ) -> bytes | None:
        route, exchange = call.route, call.exchange
        events = route.events
        assert events is not None
        # The ledger counts every stream: ask LiteLLM for usage, hide it if the client did not.
        hide_usage = (
            events.usage_on_request and self.ledger is not None and not asks_for_usage(document)
        )
        if hide_usage:
            body = json.dumps(with_usage_requested(document)).encode("utf-8")
        response = await self._send(request, call, body)
        code = response.code
        if code != 200:
            answer = await self.upstream.read_body(response)
            self._check(code, response, answer)
            return _relay(request, code, response, answer)
        request.setResponseCode(200)
        for name, value in SSE_HEADERS.items():
            request.setHeader(name, value)
        for name, values in relayed_headers(response).items():
            if name != b"content-type":
                request.responseHeaders.setRawHeaders(name, values)
        request.write(b"")  # the headers go out now, before the first event
        settings = self.live.current
        relay = SSERelay(
            request, exchange, self.clock, settings.litellm_timeout, hide_usage, events
        )
        response.deliverBody(relay)
        # The relay finishes the request itself; Klein must not finish it before.
        await relay.ended
        if call.owner is not None and route.stored is not None:
            assert self.ownership is not None
            for object_id in relay.object_ids:
                await self.ownership.claim(route.stored.kind, object_id, call.owner)
        return None

    async def _send(self, request: Request, call: _Call, body: Any) -> IResponse:
        exchange, route = call.exchange, call.route
        exchange.upstream_sent_at = sent_at = self.clock.seconds()
        passed = None
        if route.headers:
            get = request.requestHeaders.getRawHeaders
            passed = {name: values for name in route.headers if (values := get(name))}
        response = await self.upstream.send(
            route.method,
            call.path,
            body=body,
            # With client keys on, the client's key is ours to check, never LiteLLM's.
            authorization=None if self.admission.keys else call.authorization,
            request_id=exchange.request_id,
            trace=exchange.trace,
            fixed=call.fixed,
            content_type=call.content_type,
            passed=passed,
        )
        exchange.upstream_status = response.code
        exchange.upstream_seconds = self.clock.seconds() - sent_at
        return response

    def _check(self, code: int, response: IResponse, answer: bytes) -> None:
        if code < 400:  # only errors may stand for a failure of LiteLLM's
            return
        check_upstream_status(
            code,
            answer,
            our_key=bool(self.live.current.litellm_api_key),
            base_url=self.upstream.source(response),
        )


def _whole(cached: bytes) -> bytes:
    return cached


def _event_stream(cached: bytes, document: dict[str, Any]) -> bytes | None:
    """A cached answer replayed as the SSE stream a ``"stream": true`` request expects; None
    for an answer that cannot be streamed (it is forwarded instead)."""
    events = replay_of(cached, document)
    if events is None:
        return None
    return (
        b"".join(b"data: " + json.dumps(event).encode("utf-8") + b"\n\n" for event in events)
        + b"data: [DONE]\n\n"
    )


def _relay(request: Request, code: int, response: IResponse, answer: bytes) -> bytes:
    set_status(request, code)
    for name, values in relayed_headers(response).items():
        request.responseHeaders.setRawHeaders(name, values)
    return with_length(request, answer)


__all__ = ["Forwarding"]
