"""LiteLLM's response bodies: counted in their instance until they end, read with an
inactivity timeout, collected whole, or handed on chunk by chunk (``UpstreamBody``, which the
SSE relay and the WebSocket stream build on)."""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.iweb import IResponse
from zope.interface import implementer

from mpcapi.errors import bad_gateway, gateway_timeout
from mpcapi.upstream.balancer import Upstream


@implementer(IResponse)
class CountedResponse:
    """LiteLLM's response, counted in its instance's ``in_flight`` until its body ends;
    ``upstream`` is the instance that sent it. (Its fields are copied, not proxied: treq's
    response is a proxy already, and every field is read a few times per request.)"""

    __slots__ = (
        "_response",
        "code",
        "headers",
        "length",
        "phrase",
        "previousResponse",
        "request",
        "upstream",
        "version",
    )

    def __init__(self, response: IResponse, upstream: Upstream | None) -> None:
        self._response = response
        self.upstream = upstream
        self.version = response.version
        self.code = response.code
        self.phrase = response.phrase
        self.headers = response.headers
        self.length = response.length
        self.request = response.request
        self.previousResponse = response.previousResponse

    def deliverBody(self, protocol: IProtocol) -> None:
        if self.upstream is not None:
            protocol = _CountedBody(protocol, self.upstream)
        self._response.deliverBody(protocol)

    def setPreviousResponse(self, response: IResponse) -> None:
        self._response.setPreviousResponse(response)
        self.previousResponse = response


@implementer(IProtocol)
class _CountedBody:
    """Hands a body to ``protocol``; its end (complete, broken, aborted) ends the count."""

    __slots__ = ("_protocol", "_upstream", "dataReceived")

    def __init__(self, protocol: IProtocol, upstream: Upstream) -> None:
        self._protocol = protocol
        self._upstream: Upstream | None = upstream
        # Chunks go straight to the protocol: no extra call per chunk.
        self.dataReceived = protocol.dataReceived

    def makeConnection(self, transport: ITransport) -> None:
        self._protocol.makeConnection(transport)

    def connectionMade(self) -> None:
        self._protocol.connectionMade()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.in_flight -= 1
        self._protocol.connectionLost(reason)


class UpstreamBody(Protocol):
    """Reads one LiteLLM response body, watching for silence.

    ``_start_timer`` arms an inactivity timer that ``_touch_timer`` pushes back on each
    chunk; silence longer than ``idle_timeout`` calls the subclass's ``_timed_out``.
    ``_close_upstream`` drops the LiteLLM connection (cancelling a Deferred does not).
    """

    def __init__(self, clock: IReactorTime, idle_timeout: float) -> None:
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall | None = None

    def _start_timer(self) -> None:
        self._timer = self._clock.callLater(self._idle_timeout, self._silence)

    def _touch_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _silence(self) -> None:
        self._timer = None
        self._timed_out()

    def _timed_out(self) -> None:
        raise NotImplementedError

    def _pause_upstream(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).pauseProducing()

    def _resume_upstream(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).resumeProducing()

    def _close_upstream(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()


class BodyCollector(UpstreamBody):
    """Accumulates a response body; cancelling ``done`` closes the upstream connection."""

    def __init__(self, clock: IReactorTime, idle_timeout: float, source: str) -> None:
        super().__init__(clock, idle_timeout)
        self._source = source
        self._chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        self._start_timer()

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)
        self._touch_timer()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self._stop_timer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(
                bad_gateway(
                    f"LiteLLM at {self._source} broke off its answer: {reason.value}", "broken"
                )
            )

    def _timed_out(self) -> None:
        self.done.errback(
            gateway_timeout(f"LiteLLM at {self._source} sent nothing for {self._idle_timeout:g} s")
        )
        self._close_upstream()

    def _cancel(self, _: defer.Deferred[bytes]) -> None:
        self._stop_timer()
        self._close_upstream()


__all__ = ["BodyCollector", "CountedResponse", "UpstreamBody"]
