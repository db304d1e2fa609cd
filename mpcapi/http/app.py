"""The Klein app: thin routes over the forwarding pipeline, the health probes and the admin
surfaces.

Every OpenAI route of the route table (``mpcapi.openai.routes``) exists under ``/api`` (the
seed's base URL) and ``/v1`` (for clients that assume an OpenAI-style base URL), every
Anthropic route under ``/v1``, ``/api/v1`` and ``/anthropic/v1``, and all are served by the
one ``Forwarding`` pipeline. Nothing else of LiteLLM is reachable: its admin routes
(``/key/*``, ``/user/*``, ``/team/*``, ``/config/*`` …) are not in the table.
``Gateway`` is built by the composition root (``mpcapi.runtime.build``), which gives it
every collaborator.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import BaseConverter, RequestRedirect

from mpcapi import __version__
from mpcapi.config.live import LiveSettings
from mpcapi.config.settings import Settings
from mpcapi.errors import (
    JSON_CONTENT_TYPE,
    ApiError,
    bad_request,
    internal_error,
    method_not_allowed,
    not_found,
    render_error,
    set_status,
    with_length,
)
from mpcapi.exchange import ExchangeObserver
from mpcapi.http.adminapi import AdminApi, add_routes
from mpcapi.http.forwarding import Forwarding
from mpcapi.http.headers import CorsPolicy, ResponseHeaders
from mpcapi.http.requestlog import RequestLogging, exchange_of
from mpcapi.metrics.dashboard import SECURITY_HEADERS, load_assets
from mpcapi.metrics.metrics import Metrics, require_metrics_access
from mpcapi.openai.openapi import document_bytes
from mpcapi.openai.routes import OPENAI_PREFIXES, ROUTES, Route
from mpcapi.policy.keys import require_admin
from mpcapi.timestamps import iso_millis
from mpcapi.upstream.client import LiteLLMClient

if TYPE_CHECKING:
    from mpcapi.ledger.ledger import UsageLedger
    from mpcapi.tracing.context import TraceContext
    from mpcapi.websocket.endpoint import WebSocketEndpoint

log = Logger(namespace="mpcapi.app")

# The seed's base URL is /api; /v1 serves clients that assume an OpenAI-style base URL.
PREFIX = "/<any(api, v1):prefix>"


def query_arguments(request: Any) -> dict[str, str | None]:
    """The query parameters of ``GET /api/usage`` (the last of each); 400 on bad bytes."""
    arguments: dict[str, str | None] = {}
    for name, values in (request.args or {}).items():
        try:
            arguments[name.decode("utf-8")] = values[-1].decode("utf-8") if values else None
        except UnicodeDecodeError:
            raise bad_request("query parameters must be UTF-8") from None
    return arguments


def _json(request: Request, status: int, document: Any) -> bytes:
    set_status(request, status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    return with_length(request, json.dumps(document).encode("utf-8"))


class Gateway:
    """The HTTP face of MPC-API; ``resource()`` is what the Site serves."""

    app = Klein()

    def __init__(
        self,
        live: LiveSettings,
        clock: IReactorTime,
        upstream: LiteLLMClient,
        forwarding: Forwarding,
        metrics: Metrics,
        observers: list[ExchangeObserver],
        ledger: UsageLedger | None = None,
        websockets: Callable[[], WebSocketEndpoint] | None = None,
        trace_of: Callable[[IRequest], TraceContext] | None = None,
        admin_api: AdminApi | None = None,
    ) -> None:
        self.live = live
        self.clock = clock
        self.upstream = upstream
        self.forwarding = forwarding
        self.metrics = metrics
        self.observers = observers  # told of every finished exchange (after its log line)
        self.ledger = ledger  # the usage ledger (see mpcapi.ledger); None: off
        self._make_websockets = websockets
        self.trace_of = trace_of  # tracing on: a request's trace context (see mpcapi.tracing)
        self.admin_api = admin_api  # the /admin routes: keys and teams (see http.adminapi)
        self.dashboard_assets = load_assets()
        self._openapi: tuple[Settings, bytes] | None = None

    @functools.cached_property
    def websockets(self) -> WebSocketEndpoint:
        """The WebSocket endpoint, made on first use: autobahn, which it needs, would cost
        every worker some 6 MiB that deployments without WebSocket clients never use."""
        if self._make_websockets is None:
            raise not_found("WebSockets are not served here")
        return self._make_websockets()

    def resource(self) -> IResource:
        settings = self.live.current
        headed = ResponseHeaders(self.app.resource(), CorsPolicy(settings.cors_origins.split(",")))
        logged = RequestLogging(
            headed, self.clock, self.observers, settings.error_format, self.trace_of
        )
        return self.metrics.track_inflight(logged)

    @property
    def openapi(self) -> bytes:
        """``GET /openapi.json``: built from the routes and schemas for the settings in force
        (once, and again after a reload)."""
        settings = self.live.current
        if self._openapi is None or self._openapi[0] is not settings:
            self._openapi = (settings, document_bytes(self.app.url_map, settings))
        return self._openapi[1]

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
                "litellm_url": self.live.current.masked()["litellm_base_url"],
                "version": __version__,
            },
        )

    @app.route("/health/ready", methods=["GET"])
    async def ready(self, request: Request) -> bytes:
        """Probe every LiteLLM instance at once; ready when at least one is healthy."""
        started = self.clock.seconds()
        await self.upstream.probe_all(exchange_of(request).request_id)
        balancer = self.upstream.balancer
        ok = balancer.ready
        # "litellm" keeps the shape of the days of one instance; "upstreams" has each one.
        check: dict[str, Any] = {"url": self.live.current.masked()["litellm_base_url"]}
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

    # Observability (see mpcapi.metrics)

    @app.route("/metrics", methods=["GET"])
    def scrape(self, request: Request) -> bytes:
        require_metrics_access(request, self.live.current)
        body, content_type = self.metrics.exposition(request.getHeader(b"accept"))
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return with_length(request, body)

    @app.route("/api/stats", methods=["GET"])
    def stats(self, request: Request) -> bytes:
        require_admin(request, self.live.current)
        request.setHeader(b"cache-control", b"no-store")
        return _json(request, 200, self.metrics.stats())

    @app.route("/api/usage", methods=["GET"])
    async def usage(self, request: Request) -> bytes:
        require_admin(request, self.live.current)
        if self.ledger is None:
            raise ApiError(503, "Service Unavailable", "the usage ledger is not running")
        report = await self.ledger.report(query_arguments(request))
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

    # OpenAI routes: those of the route table are added below the class

    @app.route(f"{PREFIX}/ws", methods=["GET"])
    async def websocket(self, request: Request, prefix: str) -> IResource:
        """The WebSocket endpoint (see ``mpcapi.websocket``); 426 for plain HTTP."""
        # The upgrade needs a client key, like every route.
        authorization = request.getHeader(b"authorization")
        await self.forwarding.admission.authenticate(exchange_of(request), authorization)
        return self.websockets.resource(request)

    # Errors

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        error: ApiError = failure.value  # type: ignore[assignment]
        exchange = exchange_of(request)
        exchange.upstream_failure = error.upstream_failure
        return render_error(request, error, exchange)

    @app.handle_errors(NotFound)
    def unknown_route(self, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("utf-8", "replace")
        error = not_found(f"no route {request.method.decode('ascii', 'replace')} {path}")
        return render_error(request, error, exchange_of(request))

    @app.handle_errors(MethodNotAllowed)
    def wrong_method(self, request: IRequest, failure: Failure) -> bytes:
        allowed = sorted(getattr(failure.value, "valid_methods", None) or [])
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        error = method_not_allowed(f"{method} is not allowed on {path}", allowed)
        return render_error(request, error, exchange_of(request))

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
        exchange = exchange_of(request)
        if failure.check(CancelledError):  # the client left; nobody to answer
            return b""
        log.failure(
            "unhandled error, request_id={request_id}", failure, request_id=exchange.request_id
        )
        return render_error(request, internal_error(), exchange)


def _forwarded(route: Route) -> Callable[..., Any]:
    # Hands Klein the pipeline's coroutine itself: no coroutine of its own to resume.
    def serve(
        self: Gateway, request: Request, prefix: str = "", **arguments: str
    ) -> Coroutine[Any, Any, bytes | None]:
        return self.forwarding.serve(request, route, arguments)

    serve.__name__ = serve.__qualname__ = route.name
    return serve


class _ResponseId(BaseConverter):
    """A stored response's id: any path segment but ``input_tokens``, which is the route
    ``POST /responses/input_tokens`` (so its Allow header and 405 name only POST)."""

    regex = r"(?!input_tokens$)[^/]+"
    part_isolating = True


Gateway.app.url_map.converters["response_id"] = _ResponseId

# Every route of the table, served by the one pipeline, below each of its prefixes.
for _route in ROUTES:
    _serve = _forwarded(_route)
    if _route.prefixes == OPENAI_PREFIXES:
        _urls = [f"{PREFIX}{_route.path}"]
    else:
        _urls = [prefix + _route.path for prefix in _route.prefixes]
    for _url in _urls:
        Gateway.app.route(_url, methods=[_route.method], endpoint=_route.name)(_serve)


def _admin_api(gateway: Gateway) -> AdminApi:
    if gateway.admin_api is None:
        raise not_found("the admin API is not served here")
    return gateway.admin_api


# The admin API's routes: keys and teams (see mpcapi.http.adminapi).
add_routes(Gateway.app, _admin_api)
