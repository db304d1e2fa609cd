"""Label values that stay bounded: the operation (never the raw path), the method, why
LiteLLM failed, and caps on models, users and keys."""

from __future__ import annotations

from typing import Any

from mpcapi.exchange import WEBSOCKET, Exchange
from mpcapi.openai.routes import ROUTES

OTHER = "other"
ANONYMOUS = "anonymous"

OPENAI_ROUTES = (*(route.label for route in ROUTES), "/ws")
# Routes that are not API traffic: the dashboard's rates and errors leave them out.
SERVICE_ROUTES = (
    "/health",
    "/health/ready",
    "/metrics",
    "/api/stats",
    "/api/usage",
    "/openapi.json",
    "/dashboard",
)
# HTTP's, and WEBSOCKET's for the messages of a socket.
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", WEBSOCKET})
UPSTREAM_FAILURES = ("unreachable", "timeout", "status_5xx", "key_refused", "broken")
CACHE_RESULTS = ("hit", "miss", "bypass")
TOKEN_TYPES = ("prompt", "completion")


def route_of(exchange: Exchange) -> str:
    """The operation of a request: the route the app named, else one derived from a known
    path, else ``other`` (never the raw path: that would be unbounded)."""
    if exchange.route:
        return exchange.route
    path = exchange.path
    for prefix in ("/api", "/v1"):
        if path.startswith(prefix + "/") and path[len(prefix) :] in OPENAI_ROUTES:
            return path[len(prefix) :]
    if path in SERVICE_ROUTES:
        return str(path)
    if path.startswith("/dashboard/"):
        return "/dashboard"
    return OTHER


def is_api_traffic(route: str) -> bool:
    return route not in SERVICE_ROUTES


def failure_kind(exchange: Exchange) -> str | None:
    """Why LiteLLM failed this request, if it did (a stream that broke off counts too)."""
    failure = exchange.upstream_failure
    if failure is not None:
        return failure if failure in UPSTREAM_FAILURES else OTHER
    if exchange.streamed:
        if exchange.outcome == "timeout":
            return "timeout"
        if exchange.outcome == "upstream_error":
            return "broken"
    return None


class LabelCap:
    """The first ``limit`` values admitted keep their name; the rest are ``other``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._known: set[str] = set()

    def __call__(self, value: str, admit: bool = True) -> str:
        if value in self._known:
            return value
        if admit and len(self._known) < self._limit:
            self._known.add(value)
            return value
        return OTHER


def model_label(models: LabelCap, exchange: Exchange) -> str:
    """The model label of a call ("" without a model). A model becomes a label value once
    LiteLLM served it: made-up names stay "other", so clients cannot grow the series."""
    model = exchange.model
    if not model:
        return ""
    served = exchange.upstream_status == 200 or exchange.cache == "hit"
    return models(short(model), admit=served)


def short(value: Any, limit: int = 120) -> str:
    return str(value)[:limit]
