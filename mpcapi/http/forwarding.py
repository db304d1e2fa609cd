"""The forwarding pipeline: how every OpenAI route of the route table is served over HTTP.

One ``Forwarding.serve`` for every ``Route`` (see ``mpcapi.openai.routes``), in order:
admission (client key, budget, rate limits), validation of the body against the route's
schema, the response cache, then LiteLLM: a whole answer is relayed with its status and
headers (LiteLLM's own errors for the client's request pass through), an event stream is
relayed chunk by chunk (``mpcapi.http.streaming``). What it learns goes on the request's
``Exchange``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from mpcapi.config.live import LiveSettings
from mpcapi.errors import JSON_CONTENT_TYPE, set_status, with_length
from mpcapi.exchange import Exchange
from mpcapi.http.requestlog import exchange_of
from mpcapi.http.streaming import SSE_HEADERS, SSERelay
from mpcapi.openai.chunks import asks_for_usage, with_usage_requested
from mpcapi.openai.replay import replay_of
from mpcapi.openai.routes import Route
from mpcapi.openai.usage import COST_HEADER
from mpcapi.openai.validation import RequestValidator
from mpcapi.policy.admission import Admission
from mpcapi.policy.cache import CACHE_HEADER, ResponseCache, cache_directives
from mpcapi.policy.limits import HEADER_NAMES
from mpcapi.upstream.client import LiteLLMClient, check_upstream_status, relayed_headers

if TYPE_CHECKING:
    from mpcapi.ledger.ledger import UsageLedger


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

    async def serve(self, request: Request, route: Route) -> bytes | None:
        """The answer's body (its status and headers set), or None once a relayed stream
        has finished the request itself."""
        exchange = exchange_of(request)
        exchange.route = route.path
        authorization = request.getHeader(b"authorization")
        limits = await self.admission.admit(exchange, authorization)
        set_header = request.responseHeaders.setRawHeaders
        for limit, value in limits.items():
            set_header(HEADER_NAMES[limit], [value.encode("ascii")])
        if route.schema is None:
            return await self._forward(request, exchange, route, None, authorization)
        body = request.content.read() if request.content is not None else b""
        document = self.validator.validate(route.schema, body)
        exchange.model = document["model"]
        self.admission.check_model(exchange, exchange.model)  # 403 outside the key's models
        exchange.max_tokens = document.get("max_tokens")
        exchange.temperature = document.get("temperature")
        if self.keep_bodies:
            exchange.request_body = body
        streamed = route.streams and document.get("stream") is True
        store_key: str | None = None
        if route.cacheable and self.cache.enabled:
            lookup = await self.cache.lookup(
                exchange,
                document,
                cache_directives(request.requestHeaders.getRawHeaders(b"cache-control") or []),
                authorization,
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
            return await self._stream(request, exchange, route, body, document, authorization)
        answer = await self._forward(request, exchange, route, body, authorization)
        if store_key is not None and request.code == 200:
            self.cache.keep(store_key, answer)
        return answer

    async def _forward(
        self,
        request: Request,
        exchange: Exchange,
        route: Route,
        body: bytes | None,
        authorization: bytes | None,
    ) -> bytes:
        """Send to LiteLLM and relay its answer; client errors pass through as they are."""
        response = await self._send(exchange, route, body, authorization)
        answer = await self.upstream.read_body(response)
        code = response.code
        self._check(code, response, answer)
        if code == 200 and route.usage is not None:
            costs = response.headers.getRawHeaders(COST_HEADER)
            exchange.usage = route.usage(answer, costs[0] if costs else None)
        if code == 200 and route.path == "/models":  # only the models the key may call
            answer = self.admission.visible_models(exchange, answer)
        if self.keep_bodies:
            exchange.response_body = answer
        return _relay(request, code, response, answer)

    async def _stream(
        self,
        request: Request,
        exchange: Exchange,
        route: Route,
        body: bytes,
        document: dict[str, Any],
        authorization: bytes | None,
    ) -> bytes | None:
        # The ledger counts every stream: ask LiteLLM for usage, hide it if the client did not.
        hide_usage = self.ledger is not None and not asks_for_usage(document)
        if hide_usage:
            body = json.dumps(with_usage_requested(document)).encode("utf-8")
        response = await self._send(exchange, route, body, authorization)
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
        relay = SSERelay(request, exchange, self.clock, settings.litellm_timeout, hide_usage)
        response.deliverBody(relay)
        # The relay finishes the request itself; Klein must not finish it before.
        await relay.ended
        return None

    async def _send(
        self, exchange: Exchange, route: Route, body: bytes | None, authorization: bytes | None
    ) -> IResponse:
        exchange.upstream_sent_at = sent_at = self.clock.seconds()
        response = await self.upstream.send(
            route.method,
            route.path,
            body=body,
            # With client keys on, the client's key is ours to check, never LiteLLM's.
            authorization=None if self.admission.keys else authorization,
            request_id=exchange.request_id,
            trace=exchange.trace,
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
