"""The Klein app: thin routes over validation, the LiteLLM client and the SSE relay.

Every OpenAI route exists under ``/api`` (the seed's base URL) and ``/v1`` (for clients
that assume an OpenAI-style base URL).
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest, IResponse
from twisted.web.resource import IResource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from mpcapi import __version__
from mpcapi.config.settings import Settings
from mpcapi.errors import (
    JSON_CONTENT_TYPE,
    ApiError,
    internal_error,
    method_not_allowed,
    not_found,
    render_error,
    set_status,
    with_length,
)
from mpcapi.http.headers import CorsPolicy, ResponseHeaders
from mpcapi.http.requestlog import RequestLogging, record_of
from mpcapi.http.streaming import SSE_HEADERS, SSERelay
from mpcapi.ledger.ledger import (
    UsageLedger,
    asks_for_usage,
    request_arguments,
    with_usage_requested,
)
from mpcapi.metrics.dashboard import SECURITY_HEADERS, load_assets
from mpcapi.metrics.metrics import Metrics, require_metrics_access
from mpcapi.openai.openapi import document_bytes
from mpcapi.openai.usage import usage_of_answer
from mpcapi.openai.validation import RequestValidator
from mpcapi.policy.cache import ResponseCache
from mpcapi.policy.keys import KeyAuthenticator, require_admin
from mpcapi.policy.limits import RateLimiter
from mpcapi.storage.redis import RedisClient
from mpcapi.timestamps import iso_millis
from mpcapi.upstream.client import LiteLLMClient, check_upstream_status, relayed_headers

if TYPE_CHECKING:
    from mpcapi.websocket.endpoint import WebSocketEndpoint

log = Logger(namespace="mpcapi.app")

# The seed's base URL is /api; /v1 serves clients that assume an OpenAI-style base URL.
PREFIX = "/<any(api, v1):prefix>"


def _json(request: Request, status: int, document: Any) -> bytes:
    set_status(request, status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    return with_length(request, json.dumps(document).encode("utf-8"))


class Gateway:
    """The HTTP face of MPC-API; ``resource()`` is what the Site serves."""

    app = Klein()

    def __init__(
        self,
        settings: Settings,
        upstream: LiteLLMClient,
        clock: IReactorTime,
        validator: RequestValidator | None = None,
        keys: KeyAuthenticator | None = None,
        metrics: Metrics | None = None,
        ledger: UsageLedger | None = None,
    ) -> None:
        self.metrics = metrics or Metrics(clock)  # see mpcapi.metrics
        self.ledger = ledger  # the usage ledger and budgets (see mpcapi.ledger); None: off
        self.dashboard_assets = load_assets()
        self.settings = settings
        self.upstream = upstream
        self.clock = clock
        self.validator = validator or RequestValidator()
        self.keys = keys  # checks client keys; None when MPCAPI_AUTH=off
        if ledger is not None:
            ledger.report_queue = self.metrics.usage_queue.set
            ledger.report_refused = self.metrics.usage_refused.inc
        # Rate limits and the response cache, in Redis when redis_url is set (see limits, cache).
        self.redis = RedisClient.from_settings(settings, clock)
        if self.redis is not None:
            self.redis.report_failure = self.metrics.redis_failed
        self.limiter = RateLimiter.from_settings(settings, clock, self.redis)
        self.cache = ResponseCache.from_settings(settings, clock, self.redis)
        # GET /openapi.json: built once, from the routes above and the validator's schemas.
        self.openapi = document_bytes(self.app.url_map, settings)

    @functools.cached_property
    def websockets(self) -> WebSocketEndpoint:
        """The WebSocket endpoint, made on first use: autobahn, which it needs, would cost
        every worker some 6 MiB that deployments without WebSocket clients never use."""
        from mpcapi.websocket.endpoint import WebSocketEndpoint

        endpoint = WebSocketEndpoint(self.settings, self.upstream, self.clock, self.validator)
        endpoint.keys = self.keys
        if self.ledger is not None:  # WebSocket requests have their rows too
            endpoint.observers.append(self.ledger.observe)
            endpoint.check_budget = self.ledger.check_budget
            endpoint.counts_usage = True
        # WebSocket messages go through the same limits and cache as HTTP requests.
        endpoint.limiter, endpoint.cache = self.limiter, self.cache
        endpoint.observers.append(self.limiter.count_tokens)
        return endpoint

    def resource(self) -> IResource:
        observers = [self.limiter.count_tokens, self.metrics.observe]
        if self.ledger is not None:
            observers.append(self.ledger.observe)
        headed = ResponseHeaders(
            self.app.resource(), CorsPolicy(self.settings.cors_origins.split(","))
        )
        logged = RequestLogging(headed, self.clock, observers)
        return self.metrics.track_inflight(logged)

    # Health

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        return _json(
            request,
            200,
            {
                "status": "ok",
                "service": "mpc-api",
                "timestamp": iso_millis(self.clock.seconds()),
                "litellm_url": self.settings.masked()["litellm_base_url"],
                "version": __version__,
            },
        )

    @app.route("/health/ready", methods=["GET"])
    async def ready(self, request: Request) -> bytes:
        """Probe every LiteLLM instance at once; ready when at least one is healthy."""
        started = self.clock.seconds()
        await self.upstream.probe_all(record_of(request).request_id)
        balancer = self.upstream.balancer
        ok = balancer.ready
        # "litellm" keeps the shape of the days of one instance; "upstreams" has each one.
        check: dict[str, Any] = {"url": self.settings.masked()["litellm_base_url"]}
        answered = [u for u in balancer.instances if u.healthy] or balancer.instances
        if answered[0].status is not None:
            check["status"] = answered[0].status
        if not ok:
            check["error"] = "; ".join(str(u.error) for u in balancer.instances)
        check["latency_ms"] = round((self.clock.seconds() - started) * 1000, 2)
        return _json(
            request,
            200 if ok else 503,
            {
                "status": "ready" if ok else "unavailable",
                "service": "mpc-api",
                "litellm": check,
                "upstreams": balancer.report(),
            },
        )

    @app.route("/openapi.json", methods=["GET"])
    def openapi_document(self, request: Request) -> bytes:
        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        return with_length(request, self.openapi)

    # Observability (see mpcapi.metrics and mpcapi.dashboard)

    @app.route("/metrics", methods=["GET"])
    def scrape(self, request: Request) -> bytes:
        require_metrics_access(request, self.settings)
        body, content_type = self.metrics.exposition(request.getHeader(b"accept"))
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return with_length(request, body)

    @app.route("/api/stats", methods=["GET"])
    def stats(self, request: Request) -> bytes:
        require_admin(request, self.settings)
        request.setHeader(b"cache-control", b"no-store")
        return _json(request, 200, self.metrics.stats())

    @app.route("/api/usage", methods=["GET"])
    async def usage(self, request: Request) -> bytes:
        require_admin(request, self.settings)
        if self.ledger is None:
            raise ApiError(503, "Service Unavailable", "the usage ledger is not running")
        report = await self.ledger.report(request_arguments(request))
        request.setHeader(b"cache-control", b"no-store")
        return _json(request, 200, report)

    @app.route("/dashboard", methods=["GET"])
    def dashboard_redirect(self, request: Request) -> bytes:
        request.setResponseCode(301)
        request.setHeader(b"location", b"/dashboard/")
        return with_length(request, b"")

    @app.route("/dashboard/", defaults={"name": "index.html"}, methods=["GET"])
    @app.route("/dashboard/<string:name>", methods=["GET"])
    def dashboard(self, request: Request, name: str) -> bytes:
        if name not in self.dashboard_assets:
            raise not_found(f"no dashboard file {name}")
        content_type, body = self.dashboard_assets[name]
        request.setHeader(b"content-type", content_type)
        for header, value in SECURITY_HEADERS.items():
            request.setHeader(header, value)
        return with_length(request, body)

    # OpenAI routes

    @app.route(f"{PREFIX}/models", methods=["GET"])
    async def models(self, request: Request, prefix: str) -> bytes:
        record_of(request).route = "/models"
        await self._admit(request)
        return await self._forward(request, "GET", "/models", None)

    @app.route(f"{PREFIX}/chat/completions", methods=["POST"])
    async def chat_completions(self, request: Request, prefix: str) -> bytes | None:
        return await self._post(request, "/chat/completions", "chat_completions", streams=True)

    @app.route(f"{PREFIX}/completions", methods=["POST"])
    async def completions(self, request: Request, prefix: str) -> bytes | None:
        return await self._post(request, "/completions", "completions", streams=True)

    @app.route(f"{PREFIX}/embeddings", methods=["POST"])
    async def embeddings(self, request: Request, prefix: str) -> bytes | None:
        return await self._post(request, "/embeddings", "embeddings", streams=False)

    @app.route(f"{PREFIX}/ws", methods=["GET"])
    async def websocket(self, request: Request, prefix: str) -> IResource:
        """The WebSocket endpoint (see ``mpcapi.websocket``); 426 for plain HTTP."""
        await self._authenticate(request)  # the upgrade needs a client key, like every route
        return self.websockets.resource(request)

    async def _post(self, request: Request, path: str, schema: str, streams: bool) -> bytes | None:
        """Validate the body, then forward its original bytes (streamed when asked)."""
        body = request.content.read() if request.content is not None else b""
        record = record_of(request)
        record.route = path
        await self._admit(request)
        document = self.validator.validate(schema, body)
        record.model = document["model"]
        if self.ledger is not None:
            self.ledger.note_bodies(record.request_id, body, None)
        cached = await self.cache.lookup(request, path, document)
        if cached is not None:
            return cached
        if streams and document.get("stream") is True:
            return await self._stream(request, path, body, document)
        answer = await self._forward(request, "POST", path, body)
        self.cache.store_answer(request, answer)
        return answer

    async def _admit(self, request: Request) -> None:
        """The policy in front of every OpenAI route: who is calling (client keys), then
        whether they may (rate limits). Raises the ApiError that refuses the request."""
        await self._authenticate(request)
        if self.ledger is not None:  # a key whose budget is spent: 429
            await self.ledger.check_budget(record_of(request).client_key)
        # Rate limits (after the client key is known): sets x-ratelimit-*, raises a 429.
        await self.limiter.check(request)

    async def _authenticate(self, request: Request) -> None:
        """With client keys on: the caller's key (401 without a valid one), on the record."""
        if self.keys is None:
            return
        key = await self.keys.authenticate(request.getHeader(b"authorization"))
        record = record_of(request)
        record.client_key, record.key_id, record.user = key, key.id, key.user

    async def _forward(self, request: Request, method: str, path: str, body: bytes | None) -> bytes:
        """Send to LiteLLM and relay its answer; client errors pass through as they are."""
        response = await self._send(request, method, path, body)
        answer = await self.upstream.read_body(response)
        self._check(response, answer)
        if response.code == 200:
            record_of(request).usage = usage_of_answer(answer, response)
        if self.ledger is not None:
            self.ledger.note_bodies(record_of(request).request_id, None, answer)
        return self._relay(request, response, answer)

    async def _stream(
        self, request: Request, path: str, body: bytes, document: dict[str, Any]
    ) -> bytes | None:
        # The ledger counts every stream: ask LiteLLM for usage, hide it if the client did not.
        hide_usage = self.ledger is not None and not asks_for_usage(document)
        if hide_usage:
            body = with_usage_requested(document)
        response = await self._send(request, "POST", path, body)
        if response.code != 200:
            answer = await self.upstream.read_body(response)
            self._check(response, answer)
            return self._relay(request, response, answer)
        request.setResponseCode(200)
        for name, value in SSE_HEADERS.items():
            request.setHeader(name, value)
        for name, values in relayed_headers(response).items():
            if name != b"content-type":
                request.responseHeaders.setRawHeaders(name, values)
        request.write(b"")  # the headers go out now, before the first event
        relay = SSERelay(request, self.clock, self.settings.litellm_timeout, hide_usage)
        record_of(request).stream = relay
        response.deliverBody(relay)
        # The relay finishes the request itself; Klein must not finish it before.
        await relay.ended
        return None

    async def _send(
        self, request: Request, method: str, path: str, body: bytes | None
    ) -> IResponse:
        record = record_of(request)
        sent_at = self.clock.seconds()
        response = await self.upstream.send(
            method,
            path,
            body=body,
            # With client keys on, the client's key is ours to check, never LiteLLM's.
            authorization=None if self.keys else request.getHeader(b"authorization"),
            request_id=record.request_id,
        )
        record.upstream_status = response.code
        record.upstream_seconds = self.clock.seconds() - sent_at
        return response

    def _check(self, response: IResponse, answer: bytes) -> None:
        check_upstream_status(
            response.code,
            answer,
            our_key=bool(self.settings.litellm_api_key),
            base_url=self.upstream.source(response),
        )

    @staticmethod
    def _relay(request: Request, response: IResponse, answer: bytes) -> bytes:
        set_status(request, response.code)
        for name, values in relayed_headers(response).items():
            request.responseHeaders.setRawHeaders(name, values)
        return with_length(request, answer)

    # Errors

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        error: ApiError = failure.value  # type: ignore[assignment]
        record = record_of(request)
        record.upstream_failure = error.upstream_failure
        return render_error(request, error, record.request_id)

    @app.handle_errors(NotFound)
    def unknown_route(self, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("utf-8", "replace")
        error = not_found(f"no route {request.method.decode('ascii', 'replace')} {path}")
        return render_error(request, error, record_of(request).request_id)

    @app.handle_errors(MethodNotAllowed)
    def wrong_method(self, request: IRequest, failure: Failure) -> bytes:
        allowed = sorted(getattr(failure.value, "valid_methods", None) or [])
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        error = method_not_allowed(f"{method} is not allowed on {path}", allowed)
        return render_error(request, error, record_of(request).request_id)

    @app.handle_errors(RequestRedirect)
    def canonical_url(self, request: IRequest, failure: Failure) -> bytes:
        """werkzeug's redirect to a route's canonical URL (``/dashboard/index.html`` ->
        ``/dashboard/``): a 308 with a relative Location, never a 500."""
        target = urlsplit(failure.value.new_url)  # type: ignore[union-attr]
        location = target.path + (f"?{target.query}" if target.query else "")
        set_status(request, 308)
        request.setHeader(b"location", location.encode("ascii", "replace"))
        return with_length(request, b"")

    @app.handle_errors(Exception)
    def bug(self, request: IRequest, failure: Failure) -> bytes:
        record = record_of(request)
        if failure.check(CancelledError):  # the client left; nobody to answer
            return b""
        log.failure(
            "unhandled error, request_id={request_id}", failure, request_id=record.request_id
        )
        return render_error(request, internal_error(), record.request_id)
