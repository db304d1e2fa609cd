"""Binary relay: an answer that is not JSON (speech audio, a file's contents) written to the
client as it arrives, never held whole.

The relay is the client connection's producer, so a slow reader pauses the upstream read
(backpressure) and memory stays at a few chunks however large the answer is. A client
that leaves closes the upstream connection. An upstream that breaks off, or is silent for
longer than ``LITELLM_TIMEOUT``, cannot be told in a binary body: the client's connection
is dropped, so it sees a short body instead of a whole one.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.server import Request
from zope.interface import implementer

from mpcapi.exchange import Exchange
from mpcapi.http.streaming import StreamEnd
from mpcapi.upstream.bodies import UpstreamBody


@implementer(IPushProducer)
class BodyRelay(UpstreamBody):
    """Writes LiteLLM's body through to ``request``; ``ended`` fires with a ``StreamEnd``."""

    def __init__(
        self, request: Request, exchange: Exchange, clock: IReactorTime, idle_timeout: float
    ) -> None:
        super().__init__(clock, idle_timeout)
        self._request = request
        self._exchange = exchange
        self.outcome: StreamEnd | None = None
        self.ended: Deferred[StreamEnd] = Deferred()

    # Upstream side (IProtocol)

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(self._client_gone)
        self._start_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.outcome is not None:
            return
        if self._exchange.first_byte_at is None:
            self._exchange.first_byte_at = self._clock.seconds()
        self._request.write(data)
        self._touch_timer()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if self.outcome is not None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._end(StreamEnd.COMPLETED)
        else:
            self._end(StreamEnd.UPSTREAM_ERROR)

    # Client side (IPushProducer)

    def pauseProducing(self) -> None:
        self._pause_upstream()

    def resumeProducing(self) -> None:
        self._resume_upstream()

    def stopProducing(self) -> None:
        self._abandon()

    # Internals

    def _timed_out(self) -> None:
        self._end(StreamEnd.TIMEOUT)
        self._close_upstream()

    def _client_gone(self, _: object) -> None:
        self._abandon()
        self._announce(self.outcome or StreamEnd.CLIENT_ABORT)

    def _abandon(self) -> None:
        if self.outcome is None:
            self.outcome = StreamEnd.CLIENT_ABORT
            self._exchange.stream_end = self.outcome.value
            self._stop_timer()
            self._close_upstream()

    def _end(self, outcome: StreamEnd) -> None:
        self.outcome = outcome
        self._exchange.stream_end = outcome.value
        self._stop_timer()
        self._request.unregisterProducer()
        if outcome is StreamEnd.COMPLETED:
            self._request.finish()
        else:  # a short body is the only way to say it in a binary answer
            transport = self._request.channel.transport if self._request.channel else None
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]
        self._announce(outcome)

    def _announce(self, outcome: StreamEnd) -> None:
        if not self.ended.called:
            self.ended.callback(outcome)


__all__ = ["BodyRelay"]
