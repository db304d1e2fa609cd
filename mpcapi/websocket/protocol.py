"""autobahn's side of the WebSocket: frames in, messages out, flow control, the origin check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

if TYPE_CHECKING:
    from mpcapi.websocket.endpoint import WebSocketEndpoint
    from mpcapi.websocket.session import WebSocketSession


def same_host(origin: str, host: str) -> bool:
    """Whether a browser's ``Origin`` names the host the client connected to (ports aside)."""
    try:
        origin_host = urlsplit(origin).hostname
        own_host = urlsplit("//" + host).hostname
    except ValueError:
        return False
    return origin_host is not None and origin_host == own_host


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
            traceparent=request.headers.get("traceparent"),
            tracestate=request.headers.get("tracestate"),
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
        if self._received > self.factory.endpoint.max_body_bytes:
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


__all__ = ["GatewayWebSocketFactory", "GatewayWebSocketProtocol", "same_host"]
