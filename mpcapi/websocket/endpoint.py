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

``WebSocketEndpoint`` is what the Klein route uses; ``session.WebSocketSession`` is one
socket's logic; ``protocol.GatewayWebSocketProtocol`` adapts it to autobahn;
``stream.UpstreamStream`` reads one LiteLLM event stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from mpcapi.config.live import LiveSettings
from mpcapi.errors import ApiError
from mpcapi.exchange import ExchangeObserver
from mpcapi.openai.validation import RequestValidator
from mpcapi.policy.admission import Admission
from mpcapi.policy.cache import ResponseCache
from mpcapi.policy.ownership import Ownership
from mpcapi.upstream.client import LiteLLMClient
from mpcapi.websocket.protocol import GatewayWebSocketFactory
from mpcapi.websocket.session import WebSocketSession

# Idle sockets are pinged this often; one that does not answer within the timeout is dropped.
PING_INTERVAL = 30.0
PING_TIMEOUT = 30.0
# Messages up to max_body_bytes are read; larger ones are counted and discarded (then answered
# 413) up to this many times the limit, beyond which autobahn closes the socket (1009).
HARD_LIMIT_FACTOR = 4


def is_upgrade(request: IRequest) -> bool:
    """Whether ``request`` asks for a WebSocket (``Upgrade: websocket``)."""
    upgrade = request.getHeader(b"upgrade")
    if upgrade is None:
        return False
    raw = upgrade.encode("latin-1") if isinstance(upgrade, str) else upgrade
    return b"websocket" in [part.strip().lower() for part in raw.split(b",")]


class WebSocketEndpoint:
    """The Klein route's helper: one autobahn factory for every socket of the daemon."""

    def __init__(
        self,
        live: LiveSettings,
        upstream: LiteLLMClient,
        clock: IReactorTime,
        validator: RequestValidator,
        admission: Admission,
        cache: ResponseCache,
        observers: Sequence[ExchangeObserver] = (),
        counts_usage: bool = False,
        traced: bool = False,
        ownership: Ownership | None = None,
    ) -> None:
        self.live = live
        self.upstream = upstream
        self.clock = clock
        self.validator = validator
        self.admission = admission  # the HTTP routes' key, budget and limits, for every message
        self.cache = cache  # and their response cache
        self.observers = list(observers)  # told of every finished message, as for HTTP
        self.counts_usage = counts_usage  # the ledger is on: every stream asks for its usage
        self.traced = traced  # tracing is on: every message is a span of the upgrade's trace
        self.ownership = ownership  # with client keys: who made each stored response
        # Read at start, as the HTTP body limit is (a reload does not change it).
        self.max_body_bytes = live.current.max_body_bytes
        self.factory = GatewayWebSocketFactory(self, server="mpc-api", reactor=clock)
        self.factory.setProtocolOptions(
            webStatus=False,
            maxMessagePayloadSize=HARD_LIMIT_FACTOR * self.max_body_bytes,
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
        self,
        send: Callable[[bytes], None],
        path: str,
        authorization: bytes | None,
        client: str,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> WebSocketSession:
        trace = (traceparent, tracestate) if self.traced else None
        if self.admission.keys is not None:  # the upgrade's client key is ours, not LiteLLM's
            return WebSocketSession(
                self, send, path, None, client, client_key_header=authorization, trace=trace
            )
        return WebSocketSession(self, send, path, authorization, client, trace=trace)


__all__ = ["WebSocketEndpoint", "is_upgrade"]
